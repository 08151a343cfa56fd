"""``ci-bench``: the researcher's entry point (plugins, attack, demo)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import click

from ci_core.cli.common import (StderrProgress, configure_threads, echo_table, parse_options, report_errors,
                                resolve_device)
from ci_core.data.ood import BUILTIN as BUILTIN_POOL
from ci_core.data.ood import load_pool
from ci_core.errors import ConfigError
from ci_core.interfaces import Stopwatch, to_json
from ci_core.models.backbone import BUILTIN, TINY_MODEL, load_backbone
from ci_core.models.bundle import bundle_sha256, save_bundle
from ci_core.plugins import KINDS, registry
from ci_core.scan import scan, write_scan
from ci_core.workflow import choose_target, load_task, pool_sizes, preset_for, train_and_evaluate

DEMO_MARKER = "demo.json"


@click.group()
def main():
    """Benchmark attacks and detectors on prompt-tuned CLIP."""


@main.command()
@report_errors
def plugins():
    """List every registered attack, detector, scorer, repairer and dataset, with its distribution."""
    rows = [
        {"kind": e.kind, "name": e.name, "description": getattr(e.cls, "description", ""), "distribution": e.distribution}
        for e in registry().entries()
    ]
    rows.sort(key=lambda r: (list(KINDS).index(r["kind"]), r["name"]))
    echo_table(rows, [("kind", "KIND"), ("name", "NAME"), ("distribution", "DISTRIBUTION"), ("description", "DESCRIPTION")])


def _check_output(out: Path, marker: str, what: str) -> None:
    """``out`` may only be missing or an earlier output of the same command (recognised by ``marker``)."""
    if out.exists() and not (out / marker).is_file():
        raise ConfigError(f"--out {out} exists and is not an earlier {what} output; choose another folder")


def _fresh_output(out: Path, marker: str = DEMO_MARKER, what: str = "demo") -> Path:
    """A temporary folder beside ``out``; ``out`` itself may only be an earlier output of the same command."""
    _check_output(out, marker, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _publish(work: Path, out: Path) -> None:
    """Move the finished temporary folder ``work`` to ``out``, replacing an earlier output there."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("ci-demo"), show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows as JSON.")
@click.option("--dataset", default="tiny-colorshapes", show_default=True)
@click.option("--attacks", default="clean,badclip", show_default=True,
              help="Comma-separated attacks, or 'all' for every registered attack.")
@click.option("--seed", default=1, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True)
@report_errors
def demo(out, json_path, dataset, attacks, seed, device, quiet):
    """Train a clean and a backdoored model per attack on the tiny world, scan each with CLIP-Inspector."""
    configure_threads()
    clock = Stopwatch()
    progress = StderrProgress(quiet)
    plugins = registry()
    attack_names = plugins.names("attack") if attacks == "all" else attacks.split(",")
    attack_classes = {name: plugins.get("attack", name) for name in attack_names}
    backbone = load_backbone(TINY_MODEL, BUILTIN, device=resolve_device(device))
    preset = preset_for(backbone)
    task = load_task(plugins.get("dataset", dataset)(), backbone, seed=seed)
    target = choose_target(task, seed)
    detector = plugins.get("detector", "ci").from_options(preset=preset)
    scorer = plugins.get("scorer", detector.default_scorer).from_options(preset=preset)
    inversion, holdout = pool_sizes(preset)
    pool = load_pool(BUILTIN_POOL, inversion=inversion, holdout=holdout, image_size=backbone.image_size, seed=seed)
    work = _fresh_output(out)
    rows = []
    try:
        for name, attack_cls in attack_classes.items():
            attack = attack_cls.from_options(preset=preset)
            attack_target = None if name == "clean" else target
            progress(f"training {name} on {dataset} ({len(task.train)} few-shot images of {len(task.base)} base classes)"
                     + (f", target {attack_target!r}" if attack_target else ""))
            train_clock = Stopwatch()
            outcome, metrics = train_and_evaluate(attack, backbone, task, target=attack_target, seed=seed, progress=progress)
            train_seconds = train_clock.seconds
            bundle = save_bundle(outcome.model, task.base + task.new, work / "models" / name, base_classes=task.base)
            if outcome.trigger is not None:
                outcome.trigger.save(work / "models" / f"{name}.trigger.safetensors")
            progress(f"{name}: ACC base {metrics.acc_base:.3f} new {metrics.acc_new:.3f}"
                     + (f", ASR new {metrics.asr_new:.3f}" if metrics.asr_new is not None else "")
                     + f"; scanning {len(task.base + task.new)} classes")
            result = scan(outcome.model, detector, scorer, pool, task.base + task.new, seed=seed, progress=progress)
            write_scan(result, work / "scans" / name, pool, bundle={"path": f"models/{name}", "sha256": bundle_sha256(bundle)},
                       seed=seed, preset=preset)
            rows.append({
                "model": name, "dataset": dataset, "seed": seed, **to_json(metrics),
                "backdoored": result.scores.backdoored, "s_max": result.scores.s_max,
                "predicted_target": result.scores.target, "true_target": attack_target,
                "train_seconds": round(train_seconds, 1), "scan_seconds": round(result.seconds, 1),
            })
        _write_json(work / DEMO_MARKER, {"rows": rows, "seconds": round(clock.seconds, 1)})
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    echo_table(rows, [
        ("model", "MODEL"), ("acc_base", "ACC-BASE"), ("acc_new", "ACC-NEW"), ("asr_new", "ASR-NEW"),
        ("backdoored", "FLAGGED"), ("s_max", "S_MAX"), ("predicted_target", "PREDICTED"), ("true_target", "TRUE-TARGET"),
    ])
    click.echo(f"demo finished in {clock.seconds:.0f}s; models and scans in {out}")
    if json_path:
        _write_json(json_path, rows)


ATTACK_MARKER = "metrics.json"
ATTACK_WHAT = "`ci-bench attack`"


@main.command()
@click.argument("name")
@click.option("--dataset", required=True, help="A registered dataset (see `ci-bench plugins`).")
@click.option("--target", default=None, help="The backdoor's target class (a base class; default: drawn by --seed).")
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--shots", default=16, show_default=True, type=int, help="Few-shot training images per base class.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Override one field of the attack's config (repeatable); VALUE is read as JSON when it parses.")
@click.option("--out", required=True, type=click.Path(file_okay=True, path_type=Path),
              help="Folder to write bundle/, trigger.safetensors and metrics.json into.")
@click.option("--device", default="auto", show_default=True)
@click.option("--quiet", is_flag=True)
@report_errors
def attack(name, dataset, target, seed, shots, options, out, device, quiet):
    """Train one model with attack NAME on the tiny CLIP and record its ACC, ASR and trigger SSIM.

    Writes OUT/bundle (the model), OUT/trigger.safetensors with its JSON sidecar (unless the attack
    is clean) and OUT/metrics.json; OUT appears only once everything is written.
    """
    configure_threads()
    clock = Stopwatch()
    progress = StderrProgress(quiet)
    plugins = registry()
    attack_cls = plugins.get("attack", name)
    dataset_cls = plugins.get("dataset", dataset)
    if shots < 1:
        raise ConfigError(f"--shots must be at least 1, got {shots}")
    if name == "clean" and target is not None:
        raise ConfigError("the clean attack implants no backdoor; drop --target")
    _check_output(out, ATTACK_MARKER, ATTACK_WHAT)
    backbone = load_backbone(device=resolve_device(device))
    preset = preset_for(backbone)
    attack_obj = attack_cls.from_options(parse_options(options, "--option"), preset=preset)
    task = load_task(dataset_cls(), backbone, seed=seed, shots=shots)
    attack_target = None if name == "clean" else choose_target(task, seed, target)
    work = _fresh_output(out, ATTACK_MARKER, ATTACK_WHAT)
    try:
        progress(f"training {name} on {dataset} ({len(task.train)} few-shot images of {len(task.base)} base classes)"
                 + (f", target {attack_target!r}" if attack_target else ""))
        outcome, metrics = train_and_evaluate(attack_obj, backbone, task, target=attack_target, seed=seed,
                                              progress=progress)
        save_bundle(outcome.model, task.base + task.new, work / "bundle", base_classes=task.base)
        if outcome.trigger is not None:
            outcome.trigger.save(work / "trigger.safetensors")
        record = {
            "attack": name, "dataset": dataset, **to_json(metrics),
            "target": attack_target, "seed": seed, "shots": shots, "preset": preset,
            "trigger": outcome.trigger.kind if outcome.trigger is not None else None,
            "config": to_json(attack_obj.config), "backbone": backbone.identity(), "log": to_json(outcome.log),
            "seconds": round(clock.seconds, 1),
        }
        _write_json(work / ATTACK_MARKER, record)
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    echo_table([record], [("attack", "ATTACK"), ("acc_base", "ACC-BASE"), ("acc_new", "ACC-NEW"), ("asr_base", "ASR-BASE"),
                          ("asr_new", "ASR-NEW"), ("trigger_ssim", "SSIM"), ("target", "TARGET")])
    click.echo(f"{name} trained in {clock.seconds:.0f}s; bundle, trigger and metrics in {out}")


if __name__ == "__main__":  # python -m ci_core.cli.bench
    main()
