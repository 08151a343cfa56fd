"""``ci-bench``: the researcher's entry point (plugins, attack, demo, images, run, report, prior)."""

from __future__ import annotations

import shlex
from pathlib import Path

import attrs
import click

from ci_core.harness import CellOptions, LocalExecutor, RayExecutor, Store, SweepSettings, plan_sweep, run_sweep, write_report
from ci_core.harness.priors import book_from_scans
from ci_core.harness.report import parse_combination
from ci_core.harness.report.scored import stored_scans
from ci_core.harness.plan import REPAIR_DETECTOR, variant_label
from ci_core.cli.common import (StderrProgress, backbone_options, choose_backbone, configure_threads, data_root_option,
                                echo_table, parse_options, report_errors, resolve_device, resolve_runtime,
                                runtime_options)
from ci_core.data.datasets import TINY_DATASETS
from ci_core.data.labeled import SPLITS, base_new_split, write_labelled_folder
from ci_core.data.ood import BUILTIN as BUILTIN_POOL
from ci_core.data.ood import load_own_images, load_pool
from ci_core.errors import ConfigError
from ci_core.interfaces import Stopwatch, to_json
from ci_core.models.backbone import TINY_MODEL, architecture, load_backbone
from ci_core.models.weights import BUILTIN
from ci_core.files import check_output_folder, publishing, write_json_atomic
from ci_core.plugins import KINDS, open_dataset, registry
from ci_core.scanning.combined import COMBINATION_SUMMARY, DEFAULT_COMBINATION
from ci_core.scanning.reference import ReferenceCache, default_cache_dir, run_reference
from ci_core.scanning.scan import CLEAN, scan
from ci_core.scanning.variance_prior import MIN_PRIOR_MODELS, PriorBook, describe_setting
from ci_core.scanning.two_scan_report import OOD_SCAN, OWN_SCAN
from ci_core.pages.scan_output import write_scan, write_two_scans
from ci_core.scanning.scan_report import PAGE_FILE, BackboneIdentity, BundleIdentity, ScanContext
from ci_core.learning.protocol import (MAX_POOL, MIN_OWN_PER_CLASS, MODEL_BUNDLE, POOL_SIZES, SCAN_SEED, choose_scorers,
                                       choose_target, load_task, own_images_per_class, pool_sizes, preset_for,
                                       REFERENCE_SCORER, sample_candidates, train_and_save)

DEMO_MARKER = "demo.json"
DEMO_OUTPUT = "demo"
OWN_IMAGES_DIR = "own-images"  # the demo auditor's own images of the deployed classes, inside the demo's output


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


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("ci-demo"), show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows as JSON.")
@click.option("--dataset", default="tiny-colorshapes", show_default=True)
@data_root_option
@click.option("--attacks", default="clean,badclip", show_default=True,
              help="Comma-separated attacks, or 'all' for every registered attack.")
@click.option("--seed", default=1, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--ood-only", is_flag=True,
              help="One scan per model, on the OOD pool (the paper's setting), without the second scan of the base "
                   "classes on the dataset's own validation images.")
@backbone_options(f"the bundled tiny CLIP ({TINY_MODEL}, {BUILTIN})")
@runtime_options
@click.option("--quiet", is_flag=True)
@report_errors
def demo(out, json_path, dataset, data_root, attacks, seed, ood_only, backbone, pretrained, device, max_text_batch,
         bf16, quiet):
    """Train a clean and a backdoored model per attack on the tiny world, scan each with CLIP-Inspector.

    Each model is scanned twice, as `ci-scan --own-images` scans a delivered model, and judged by both scans
    (Bonferroni over their p-values): on the OOD pool, inverting the paper's benchmark candidates (50 classes
    drawn by --seed with the backdoor's target among them, or every class of a dataset with at most 50); and on
    the auditor's own images of the classes it deploys (the base classes' validation images, written to
    OUT/own-images). --ood-only keeps the first scan only.
    """
    configure_threads()
    clock = Stopwatch()
    progress = StderrProgress(quiet)
    runtime = resolve_runtime(device, max_text_batch, bf16)
    check_output_folder(out, DEMO_OUTPUT)
    plugins = registry()
    attack_names = plugins.names("attack") if attacks == "all" else attacks.split(",")
    attack_classes = {name: plugins.get("attack", name) for name in attack_names}
    dataset_obj = open_dataset(dataset, data_root)
    backbone = load_backbone(*choose_backbone(backbone, pretrained, (TINY_MODEL, BUILTIN)), device=runtime.device,
                             text_encoding=runtime.text_encoding)
    preset = preset_for(backbone)
    task = load_task(dataset_obj, backbone, seed=seed, progress=progress)
    target = choose_target(task, seed)
    detector = plugins.get("detector", "ci").from_options(preset=preset)
    decider, also = choose_scorers(plugins, detector, preset=preset)
    inversion, holdout = pool_sizes(preset)
    pool = load_pool(BUILTIN_POOL, inversion=inversion, holdout=holdout, image_size=backbone.image_size, seed=seed)
    cache = ReferenceCache(default_cache_dir())
    # The demo's scans sample their candidates from the seed, so the demo itself is what reproduces them.
    command = shlex.join(["ci-bench", "demo", "--out", str(out), "--dataset", dataset, "--attacks", ",".join(attack_names),
                          "--seed", str(seed)] + (["--ood-only"] if ood_only else [])
                         + (["--data-root", str(data_root)] if data_root else [])
                         + (["--backbone", backbone.name, "--pretrained", str(backbone.pretrained)]
                            if backbone.name != TINY_MODEL or backbone.pretrained != BUILTIN else []))
    rows = []
    with publishing(out, DEMO_OUTPUT) as work:
        own = None if ood_only else _demo_own_images(dataset_obj, task, work, Path(out) / OWN_IMAGES_DIR, preset,
                                                     image_size=backbone.image_size, seed=seed, progress=progress)
        for name, attack_cls in attack_classes.items():
            attack = attack_cls.from_options(preset=preset)
            attack_target = None if name == "clean" else target
            progress(f"training {name} on {dataset} ({len(task.train)} few-shot images of {len(task.base)} base classes)"
                     + (f", target {attack_target!r}" if attack_target else ""))
            trained = train_and_save(attack, backbone, task, work / "models" / name, target=attack_target, seed=seed,
                                     progress=progress)
            metrics = trained.metrics
            progress(f"{name}: ACC base {metrics.acc_base:.3f} new {metrics.acc_new:.3f}"
                     + (f", ASR new {metrics.asr_new:.3f}" if metrics.asr_new is not None else ""))
            plans = [(OOD_SCAN, pool, sample_candidates(task.base + task.new, seed=seed, target=attack_target))]
            if own is not None:
                plans.append((OWN_SCAN, *own))
            scans, figures = [], {}
            for scan_name, scan_pool, classes in plans:
                progress(f"{name}: scanning {len(classes)} classes on {scan_pool.source}")
                reference = run_reference(backbone, trained.template, detector, scan_pool, classes, seed=seed,
                                          cache=cache, progress=progress)
                result = scan(trained.outcome.model, detector, decider, scan_pool, classes, seed=seed,
                              reference=reference, also=also, base_classes=task.base, progress=progress)
                scans.append((scan_name, result, scan_pool))
                figures[scan_name] = {**result.summary(), "scan_seconds": round(result.seconds, 1),
                                      "reference_seconds": round(reference.seconds, 1),
                                      "reference_cached": reference.cached}
            context = ScanContext(
                bundle=BundleIdentity(path=f"models/{name}/{MODEL_BUNDLE}", sha256=trained.bundle_sha256),
                backbone=BackboneIdentity.of(backbone.identity()), seed=seed, preset=preset,
                device=str(runtime.device), command=command)
            ood = figures[OOD_SCAN]
            if own is None:
                write_scan(scans[0][1], work / "scans" / name, pool, context)
                verdict = {key: ood[key] for key in ("verdict", "backdoored", "p_value", "predicted_target")}
            else:
                pair = write_two_scans(scans, work / "scans" / name, context, alpha=float(decider.config.alpha),
                                       combination=DEFAULT_COMBINATION)
                verdict = {"verdict": pair.verdict, "backdoored": pair.verdict != CLEAN, "p_value": pair.p_value,
                           "predicted_target": pair.target}
            rows.append({
                "model": name, "dataset": dataset, "seed": seed, **to_json(metrics), **verdict,
                "true_target": attack_target, "ood_p_value": ood["p_value"],
                "own_p_value": figures[OWN_SCAN]["p_value"] if own is not None else None,
                "paper_scorer": ood["paper_scorer"], "paper_s_max": ood["paper_s_max"],
                "paper_flagged": ood["paper_flagged"], "train_seconds": round(trained.seconds, 1), "scans": figures,
            })
        write_json_atomic(work / DEMO_MARKER, {"rows": rows, "seconds": round(clock.seconds, 1)})
    echo_table(rows, [
        ("model", "MODEL"), ("acc_base", "ACC-BASE"), ("acc_new", "ACC-NEW"), ("asr_new", "ASR-NEW"),
        ("verdict", "VERDICT"), ("p_value", "P"), ("predicted_target", "PREDICTED"), ("true_target", "TRUE-TARGET"),
        *([] if ood_only else [("ood_p_value", "P-OOD"), ("own_p_value", "P-OWN")]),
        ("paper_s_max", "PAPER-S_MAX"), ("paper_flagged", "PAPER-K=2"),
    ])
    click.echo(f"verdict: {decider.name} ({decider.description})"
               + ("" if ood_only else f", on two scans: {COMBINATION_SUMMARY[DEFAULT_COMBINATION]} at alpha "
                                      f"{float(decider.config.alpha):g}")
               + "; PAPER: the paper's scorer (s_max >= k on the OOD scan) beside it")
    for row in rows:
        click.echo(f"{row['model']}: {row['verdict']}; page: {Path(out).absolute() / 'scans' / row['model'] / PAGE_FILE}")
    click.echo(f"demo finished in {clock.seconds:.0f}s; models and scans in {out}"
               + ("" if ood_only else f"; the own images in {Path(out) / OWN_IMAGES_DIR}"))
    if json_path:
        write_json_atomic(json_path, rows)


def _demo_own_images(dataset_obj, task, work: Path, shown_as: Path, preset, *, image_size: int, seed: int,
                     progress) -> tuple:
    """The demo auditor's own images of the classes it deploys: the base classes' validation images, written to
    ``work/own-images`` as `ci-bench images` writes them and read back as `ci-scan --own-images` reads them."""
    drawn = dataset_obj.load("val", image_size=image_size, seed=seed,
                             shots=own_images_per_class(len(task.base), preset)).restrict(task.base)
    (work / OWN_IMAGES_DIR).mkdir()
    write_labelled_folder(drawn, work / OWN_IMAGES_DIR)
    inversion, holdout = pool_sizes(preset)
    if len(drawn) < inversion + holdout:  # a real dataset's validation split may be smaller: |D|:|T| kept at 2:1
        inversion = len(drawn) * inversion // (inversion + holdout)
        holdout = len(drawn) - inversion
        progress(f"the own scan: {len(drawn)} validation images of {len(task.base)} base classes, so "
                 f"|D| {inversion} and |T| {holdout}")
    own_pool, classes = load_own_images(work / OWN_IMAGES_DIR, task.base + task.new, inversion=inversion,
                                        holdout=holdout, image_size=image_size, seed=seed, progress=progress)
    # Named by where the folder will be once the demo's output is in place, not by the temporary folder.
    return attrs.evolve(own_pool, source=own_pool.source.replace(str(work / OWN_IMAGES_DIR), str(shown_as), 1)), classes


ATTACK_MARKER = "metrics.json"
ATTACK_OUTPUT = "attack"


@main.command()
@click.argument("name")
@click.option("--dataset", required=True, help="A registered dataset (see `ci-bench plugins`).")
@data_root_option
@click.option("--test-per-class", type=int, default=None,
              help="Test images per class for ACC and ASR (default: the whole test split); the same sample for "
                   "every seed, to keep CPU runs on large datasets short.")
@click.option("--target", default=None, help="The backdoor's target class (a base class; default: drawn by --seed).")
@click.option("--seed", default=1, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--shots", default=16, show_default=True, type=click.IntRange(min=1),
              help="Few-shot training images per base class.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Override one field of the attack's config (repeatable); VALUE is read as JSON when it parses.")
@click.option("--out", required=True, type=click.Path(file_okay=True, path_type=Path),
              help="Folder to write bundle/, trigger.safetensors and metrics.json into.")
@backbone_options("the dataset's (the tiny CLIP on the tiny world, ViT-B-16 with openai weights otherwise)")
@runtime_options
@click.option("--quiet", is_flag=True)
@report_errors
def attack(name, dataset, data_root, test_per_class, target, seed, shots, options, out, backbone, pretrained, device,
           max_text_batch, bf16, quiet):
    """Train one model with attack NAME on DATASET's backbone and record its ACC, ASR and trigger SSIM.

    Writes OUT/bundle (the model), OUT/trigger.safetensors with its JSON sidecar (unless the attack
    is clean) and OUT/metrics.json; OUT appears only once everything is written.
    """
    configure_threads()
    clock = Stopwatch()
    progress = StderrProgress(quiet)
    runtime = resolve_runtime(device, max_text_batch, bf16)
    plugins = registry()
    attack_cls = plugins.get("attack", name)
    if test_per_class is not None and test_per_class < 1:
        raise ConfigError(f"--test-per-class must be at least 1, got {test_per_class}")
    dataset_obj = open_dataset(dataset, data_root)
    if name == "clean" and target is not None:
        raise ConfigError("the clean attack implants no backdoor; drop --target")
    check_output_folder(out, ATTACK_OUTPUT)
    architecture, weights = choose_backbone(backbone, pretrained, dataset_obj.default_backbone)
    preset = preset_for(architecture)
    attack_obj = attack_cls.from_options(parse_options(options, "--option"), preset=preset)  # checked before the load
    backbone = load_backbone(architecture, weights, device=runtime.device, text_encoding=runtime.text_encoding)
    task = load_task(dataset_obj, backbone, seed=seed, shots=shots, test_per_class=test_per_class, progress=progress)
    attack_target = None if name == "clean" else choose_target(task, seed, target)
    with publishing(out, ATTACK_OUTPUT) as work:
        progress(f"training {name} on {dataset} ({len(task.train)} few-shot images of {len(task.base)} base classes)"
                 + (f", target {attack_target!r}" if attack_target else ""))
        trained = train_and_save(attack_obj, backbone, task, work, target=attack_target, seed=seed,
                                 progress=progress)
        summary = trained.record()
        record = {
            "attack": name, "dataset": dataset, **summary.pop("metrics"), **summary,
            "seed": seed, "shots": shots, "test_per_class": test_per_class, "preset": preset,
            "config": to_json(attack_obj.config), "backbone": backbone.identity(), "seconds": round(clock.seconds, 1),
        }
        write_json_atomic(work / ATTACK_MARKER, record)
    echo_table([record], [("attack", "ATTACK"), ("acc_base", "ACC-BASE"), ("acc_new", "ACC-NEW"), ("asr_base", "ASR-BASE"),
                          ("asr_new", "ASR-NEW"), ("trigger_ssim", "SSIM"), ("target", "TARGET")])
    click.echo(f"{name} trained in {clock.seconds:.0f}s; bundle, trigger and metrics in {out}")


IMAGES_OUTPUT = "images"


@main.command()
@click.argument("dataset")
@data_root_option
@click.option("--split", type=click.Choice(SPLITS), default="val", show_default=True)
@click.option("--classes", "which", type=click.Choice(("base", "new", "all")), default="base", show_default=True,
              help="The dataset's base classes (the ones a model is tuned on and an organisation deploys), its new "
                   "ones, or all.")
@click.option("--per-class", type=click.IntRange(1, 10_000), default=None,
              help=f"Images per class (the dataset's split may hold fewer). Default: enough for `ci-scan "
                   f"--own-images` at its default pool sizes on the dataset's backbone (|D| + |T| over the classes), "
                   f"at least {MIN_OWN_PER_CLASS}.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Which images of the split (the train split is sampled by it; val and test are fixed).")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@report_errors
def images(dataset, data_root, split, which, per_class, seed, out):
    """Write DATASET's images of its base (or new, or all) classes to OUT, one subfolder per class.

    The layout `ci-scan --own-images` reads: an auditor's own labelled images of the classes it deploys,
    here drawn from a registered dataset (the tiny world's, for the demo and the tests).
    """
    dataset_obj = open_dataset(dataset, data_root)
    base, new = base_new_split(dataset_obj.classnames)
    classes = {"base": base, "new": new, "all": dataset_obj.classnames}[which]
    image_size = architecture(dataset_obj.default_backbone[0]).image_size
    per_class = per_class or own_images_per_class(len(classes), preset_for(dataset_obj.default_backbone[0]))
    check_output_folder(out, IMAGES_OUTPUT)
    drawn = dataset_obj.load(split, image_size=image_size, seed=seed, shots=per_class).restrict(classes)
    with publishing(out, IMAGES_OUTPUT) as work:
        count = write_labelled_folder(drawn, work)
    click.echo(f"{count} {split} images of {len(classes)} {which} classes of {dataset} ({image_size} px) in {out}")


# --------------------------------------------------------------------------- sweeps


def _split(value: str | None, flag: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in (value or "").split(",") if item.strip())
    if value is not None and not items:
        raise ConfigError(f"{flag}: expected a comma-separated list, got {value!r}")
    return items


def _ints(value: str | None, flag: str) -> tuple[int, ...]:
    items = _split(value, flag)
    try:
        return tuple(int(item) for item in items)
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated whole numbers, got {value!r}") from None


def _seed_list(value: str | None, flag: str) -> tuple[int, ...]:
    """Comma-separated seeds and ranges A-B (inclusive), e.g. '1,2,11-20'."""
    seeds: list[int] = []
    for item in _split(value, flag):
        first, dash, last = item.partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise ConfigError(f"{flag}: expected comma-separated whole numbers or ranges A-B, got {item!r}") from None
        if high < low or high - low > 10_000:
            raise ConfigError(f"{flag}: the range {item!r} must go upwards and hold at most 10001 seeds")
        seeds.extend(range(low, high + 1))
    return tuple(seeds)


def _scan_seed(value: str) -> int | None:
    if value == "model":
        return None
    seeds = _seed_list(value, "--scan-seed")
    if len(seeds) != 1:
        raise ConfigError(f"--scan-seed: expected one whole number or 'model', got {value!r}")
    return seeds[0]


def _controls(value: str | None, attacks: tuple[str, ...], plugins) -> tuple[str, ...]:
    """--controls: 'all' = every attack of the sweep that has a clean control."""
    if value == "all":
        return tuple(name for name in attacks if plugins.get("attack", name).control_options)
    return _split(value, "--controls")


def _names(value: str, flag: str, registered: list[str]) -> tuple[str, ...]:
    return tuple(registered) if value == "all" else _split(value, flag)


def _plugin_options(pairs: tuple[str, ...], flag: str) -> dict[str, dict]:
    """NAME.KEY=VALUE pairs grouped by plugin NAME; VALUE is read as JSON when it parses."""
    grouped: dict[str, dict] = {}
    for pair in pairs:
        target, sep, value = pair.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or not name or not key:
            raise ConfigError(f"{flag} {pair!r}: expected NAME.KEY=VALUE, e.g. clean.epochs=2")
        grouped.setdefault(name, {}).update(parse_options((f"{key}={value}",), flag))
    return grouped


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The store: results are filed here by the hash of their config; rerun to resume.")
@click.option("--attacks", default="all", show_default=True, help="Comma-separated attacks, or 'all' registered.")
@click.option("--detectors", default="all", show_default=True, help="Comma-separated detectors, or 'all' registered.")
@click.option("--datasets", default="tiny", show_default=True,
              help="Comma-separated datasets; 'tiny' = the tiny world's, 'all' = every registered one.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds (one model per seed).")
@click.option("--shots", default=16, show_default=True, type=click.IntRange(min=1),
              help="Few-shot training images per base class.")
@click.option("--test-per-class", type=click.IntRange(min=1), default=None,
              help="Test images per class for ACC and ASR (default: the whole test split).")
@data_root_option
@click.option("--ood", default=BUILTIN_POOL, show_default=True, help="OOD image folder, or 'builtin' (the tiny world's).")
@click.option("--pool-sizes", help=f"Ablation: comma-separated inversion-set sizes |D| (default: {POOL_SIZES[None][0]}; "
                                   f"{POOL_SIZES['tiny'][0]} on the tiny CLIP).")
@click.option("--holdout", type=click.IntRange(1, MAX_POOL),
              help=f"Held-out OOD images |T| for ASR (default {POOL_SIZES[None][1]}; {POOL_SIZES['tiny'][1]} on the "
                   "tiny CLIP).")
@click.option("--batch-sizes", help="Ablation: comma-separated inversion batch sizes (detectors with a batch_size option).")
@click.option("--losses", help="Ablation: comma-separated inversion losses, e.g. margin,ce,logit (detectors with a loss option).")
@click.option("--inversion-data", default="ood", show_default=True,
              help="Ablation: 'ood', 'id' (D is the dataset's own validation images, T the OOD held-out set), "
                   "'id-only' (D and T both the dataset's validation images), 'task' (D and T the dataset's "
                   "train and validation images of the scanned classes only; with --candidate-classes base, the "
                   "auditor's own images of the classes it deploys), or several, e.g. 'ood,id-only'.")
@click.option("--candidate-classes", default="all", show_default=True,
              help="Which classes each scan inverts: 'all' (up to 50 of the dataset's classes, the paper's "
                   "benchmark), 'base' (the classes the model was tuned on, which the organisation deploys), or "
                   "'all,base' (one scan of each).")
@click.option("--attack-option", "attack_options", multiple=True, metavar="NAME.KEY=VALUE",
              help="Override a field of attack NAME's config (repeatable), e.g. clean.epochs=2.")
@click.option("--detector-option", "detector_options", multiple=True, metavar="NAME.KEY=VALUE",
              help="Override a field of detector NAME's config (repeatable), e.g. ci.epsilon=0.0314.")
@click.option("--scorer-option", "scorer_options", multiple=True, metavar="NAME.KEY=VALUE",
              help="Override a field of scorer NAME's config (repeatable), e.g. ci.k=2.5.")
@click.option("--repairers", default=None,
              help="Comma-separated repairers, or 'all', e.g. ci-trigger,clean-only,random-delta,wrong-class-delta: "
                   "repair every backdoored model with the trigger of its ci scan (needs ci in --detectors; default: "
                   "no repairs). Adds cells only: the models and scans of the sweep keep their keys.")
@click.option("--repair-shots", default=4, show_default=True, type=click.IntRange(min=1),
              help="Labelled clean images per base class for a repair, drawn from the model's training images.")
@click.option("--repairer-option", "repairer_options", multiple=True, metavar="NAME.KEY=VALUE",
              help="Override a field of repairer NAME's config (repeatable), e.g. ci-trigger.epochs=1.")
@click.option("--controls", default=None, metavar="ATTACKS",
              help="Comma-separated attacks of the sweep, or 'all': each also gets a clean control per dataset and "
                   "seed, trained on the attack's own schedule with its backdoor off (its control_options, e.g. "
                   "poison_rate=0) and scanned like the attacked models.")
@click.option("--clean-seeds", default=None, metavar="SEEDS",
              help="Extra clean models (the clean attack) for these seeds on every dataset, e.g. 11-20 or 11,12: "
                   "cheap negatives for the false-positive rate.")
@click.option("--scan-seed", default=str(SCAN_SEED), show_default=True, metavar="SEED|model",
              help="The seed of every scan and reference scan (candidates, pool, trigger initialisation), as an auditor "
                   "scans every model with one seed: one reference per dataset and detector setting serves all the "
                   "models. 'model' scans each model with its own seed (one reference per seed, as stores before 0.4).")
@click.option("--no-reference", is_flag=True,
              help="No reference scans of the untuned backbone; only the detectors' own scorers then apply.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--ray-address", help="An existing Ray cluster (default: start a local one for this run).")
@click.option("--ray-cpus", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPUs of the local Ray cluster.")
@click.option("--cpus-per-cell", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPUs each Ray task reserves.")
@click.option("--threads", type=click.IntRange(min=1), help="Torch threads inside each cell (default: local = this process's, "
                                          "Ray = --cpus-per-cell).")
@click.option("--backbone", default=TINY_MODEL, show_default=True, help="open_clip architecture.")
@click.option("--pretrained", default=BUILTIN, show_default=True, help="Its weights: builtin, an open_clip tag or a file.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the cells and whether the store holds them; run nothing.")
@click.option("--verbose", is_flag=True, help="Also print each cell's own progress (epochs, classes).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@report_errors
def run(out, attacks, detectors, datasets, seeds, shots, test_per_class, data_root, ood, pool_sizes, holdout, batch_sizes, losses, inversion_data, candidate_classes,
        attack_options, detector_options, scorer_options, repairers, repair_shots, repairer_options, controls,
        clean_seeds, scan_seed, no_reference, executor,
        ray_address, ray_cpus, cpus_per_cell, threads, backbone, pretrained, device, dry_run, verbose, quiet):
    """Cross attacks x datasets x seeds (one model each) with every detector (one scan each), into the store OUT.

    With --repairers, every backdoored model is also repaired by each repairer
    (one repair each) with the trigger of its ci scan at the default ablation
    setting; models of attacks whose bundles a repairer cannot take (zero-shot
    ones) are left out, and the dry run and the report say so.

    Finished cells are never redone: rerunning the same command after an
    interruption, or with --repairers added, runs only what is missing (and
    retries failed cells).  Then `ci-bench report OUT` writes the tables and figures.
    """
    configure_threads()
    progress = StderrProgress(quiet)
    plugins = registry()
    tiny = [cls.name for cls in TINY_DATASETS if cls.name in plugins.names("dataset")]
    attack_names = _names(attacks, "--attacks", plugins.names("attack"))
    settings = SweepSettings(
        attacks=attack_names,
        detectors=_names(detectors, "--detectors", plugins.names("detector")),
        datasets=tuple(tiny) if datasets == "tiny" else _names(datasets, "--datasets", plugins.names("dataset")),
        seeds=_seed_list(seeds, "--seeds"), shots=shots, test_per_class=test_per_class,
        data_root=str(data_root) if data_root is not None else None, ood=ood, pool_sizes=_ints(pool_sizes, "--pool-sizes"),
        holdout=holdout, batch_sizes=_ints(batch_sizes, "--batch-sizes"), losses=_split(losses, "--losses"),
        inversion_data=_split(inversion_data, "--inversion-data"),
        candidate_classes=_split(candidate_classes, "--candidate-classes"),
        attack_options=_plugin_options(attack_options, "--attack-option"),
        detector_options=_plugin_options(detector_options, "--detector-option"),
        scorer_options=_plugin_options(scorer_options, "--scorer-option"),
        repairers=_names(repairers, "--repairers", plugins.names("repairer")) if repairers is not None else (),
        repair_shots=repair_shots, repairer_options=_plugin_options(repairer_options, "--repairer-option"),
        controls=_controls(controls, attack_names, plugins), clean_seeds=_seed_list(clean_seeds, "--clean-seeds"),
        reference=not no_reference, scan_seed=_scan_seed(scan_seed),
    )
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    if ray_address and executor != "ray":
        raise ConfigError("--ray-address needs --executor ray")
    if executor == "local":
        resolve_device(device)  # a bad --device fails here, not once per cell
    backbone_obj = load_backbone(backbone, pretrained, device="cpu")
    plan = plan_sweep(settings, backbone_obj, plugins)
    if dry_run:
        store = Store.open(out) if (out / "store.json").exists() else None
        rows = [{"kind": c.kind, "label": c.label, "key": c.key,
                 "stored": bool(store and store.is_done(c.kind, c.key))} for c in plan.cells()]
        echo_table(rows, [("kind", "KIND"), ("label", "CELL"), ("stored", "STORED"), ("key", "KEY")])
        if plan.repair_setting is not None:
            click.echo(f"repairs use the {REPAIR_DETECTOR} scan at [{variant_label(plan.repair_setting)}]")
        for skipped in plan.skipped_repairs:
            click.echo(f"no repair cells for {skipped.attack} ({', '.join(skipped.repairers)}): {skipped.reason}")
        click.echo(f"{len(rows)} cells ({plan.counts()}), {sum(r['stored'] for r in rows)} already stored in {out}")
        return
    store = Store.open(out, create=True)
    clock = Stopwatch()
    runner = (RayExecutor(ray_address, local_cpus=ray_cpus, cpus_per_cell=cpus_per_cell) if executor == "ray"
              else LocalExecutor())
    options = CellOptions(device=device, threads=threads, verbose=verbose and not quiet)
    with runner:
        summary = run_sweep(store, plan, runner, options, progress)
    declined = (f", {len(summary.declined)} with nothing to do (recorded under {out}/declined)"
                if summary.declined else "")
    click.echo(f"sweep finished in {clock.seconds:.0f}s: {summary.done} cells run, {summary.reused} reused from the "
               f"store{declined}, {len(summary.failed)} failed; `ci-bench report {out}` writes the tables")
    if summary.failed:
        raise click.ClickException(f"{len(summary.failed)} cell(s) failed (recorded under {out}/failed): "
                                   + "; ".join(f"{o['label']}: {o['error']}" for o in summary.failed[:5]))


@main.command()
@click.argument("store_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write report.md, report.json and the PNG figures (default: STORE_DIR/report).")
@click.option("--scorer-option", "scorer_options", multiple=True, metavar="NAME.KEY=VALUE",
              help="Score the stored evidence with scorer NAME configured so, e.g. ref-outlier.alpha=0.05 or ci.k=2.5.")
@click.option("--combine", "combinations", multiple=True, metavar="[paired:]DATA/CLASSES+DATA/CLASSES",
              help="Also judge every model by its scans of these kinds together (repeatable), the calibrated "
                   "scorer's p-values Bonferroni over them, e.g. ood/all+task/base: the OOD scan of every class and "
                   "the base classes on the dataset's own images; with 'paired:' two scans are read by the paired "
                   "test, the same class easy to reach in both (docs/verdicts.md).")
@click.option("--variance-prior", "prior_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A variance prior book (ci-bench prior): the calibrated scorer moderates each scan's residual "
                   "spread by the spread of clean tuned models of the same setting (docs/verdicts.md).")
@click.option("--quiet", is_flag=True, help="Do not print the Markdown.")
@report_errors
def report(store_dir, out, scorer_options, combinations, prior_file, quiet):
    """Tables and figures (Markdown, JSON, PNG) from the finished cells of the store STORE_DIR."""
    combine = [parse_combination(text) for text in combinations]
    priors = PriorBook.read(prior_file) if prior_file is not None else None
    folder, markdown = write_report(Store.open(store_dir), out, _plugin_options(scorer_options, "--scorer-option"),
                                    combine, priors)
    if not quiet:
        click.echo(markdown)
    click.echo(f"report written to {folder}")


@main.command()
@click.argument("store_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The variance prior book to write (JSON).")
@click.option("--scorer-option", "scorer_options", multiple=True, metavar="KEY=VALUE",
              help=f"Option of the calibrated scorer ({REFERENCE_SCORER}) the prior is for (default: its defaults); "
                   "the book records them, and a scorer configured otherwise cannot read it.")
@report_errors
def prior(store_dirs, out, scorer_options):
    """Fit a variance prior per scan setting on the clean tuned models of the stores STORE_DIRS.

    Each clean model (attack 'clean', not a control) scanned with a reference gives the residual variance of the
    calibrated scorer's fit; the scans of one setting (backbone, classes, pool sizes and kind, seed, detector and
    its config, the scorer's statistic) fit one scaled inverse chi-square prior (limma's moments).  Tune and scan
    at least five clean models per setting, with seeds no provider's model uses: `ci-bench run --attacks clean
    --clean-seeds ...` (docs/verdicts.md, "A sixth freeze")."""
    scorer = registry().get("scorer", REFERENCE_SCORER).from_options(parse_options(scorer_options, "--scorer-option"))
    scans = [stored for root in store_dirs for stored in stored_scans(Store.open(root))[1]]
    book, short = book_from_scans(scans, scorer)
    book.write(out)
    for line in short:
        click.echo(f"left out (fewer than {MIN_PRIOR_MODELS}): {line}")
    for setting, fitted, models in book.entries.values():
        df = "a known variance (d0 infinite)" if fitted.df is None else f"d0 {fitted.df:.1f}"
        click.echo(f"{describe_setting(setting)}: s0^2 {fitted.variance:.3g}, {df}, from {len(models)} clean models")
    click.echo(f"variance prior book written to {out} ({len(book.entries)} settings)")


if __name__ == "__main__":
    main()
