"""A short attack run against a clean model with the same trigger: the figures behind tests/test_attack_implants.py.

    python benchmarks/attack_short_runs.py ATTACK --seeds 2,3,4 [--shots 4] [--test-per-class 10]
        [--option KEY=VALUE ...] [--dataset tiny-colorshapes] [--json rows.json]

For every seed: a clean model (the clean attack's preset) and the attack (its preset with the
``--option`` overrides) are prompt-tuned on the same few shots; the table shows the attacked model's
ACC and ASR, the ASR that the attack's trigger reaches on the same test images through the clean model,
and the CPU seconds (``time.process_time``, all threads: the fairer figure when other work shares the
machine) of training and of evaluating the attacked model.  Choose test settings on seeds the test
does not use.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from ci_core.cli.common import echo_table, parse_options, report_errors
from ci_core.errors import ConfigError
from ci_core.files import write_json_atomic
from ci_core.learning.evaluation import accuracy, attack_success_rates, evaluate
from ci_core.models.backbone import load_backbone
from ci_core.plugins import open_dataset, registry
from ci_core.learning.protocol import choose_target, load_task, preset_for
from ci_core.runtime import StderrProgress


def parse_seeds(value: str) -> list[int]:
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {value!r}: expected comma-separated integers, e.g. 2,3,4") from None
    if not seeds:
        raise ConfigError("--seeds names no seed")
    return seeds


@click.command()
@click.argument("attack")
@click.option("--seeds", default="2,3", show_default=True, help="Comma-separated seeds (shots, target, training).")
@click.option("--shots", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--test-per-class", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Override one field of the attack's config (repeatable); VALUE is read as JSON when it parses.")
@click.option("--dataset", default="tiny-colorshapes", show_default=True)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the rows as JSON.")
@report_errors
def main(attack, seeds, shots, test_per_class, options, dataset, threads, json_path):
    torch.set_num_threads(threads)
    progress = StderrProgress()
    plugins = registry()
    attack_cls = plugins.get("attack", attack)
    overrides = parse_options(options, "--option")
    data = open_dataset(dataset, None)
    backbone = load_backbone(*data.default_backbone)
    preset = preset_for(backbone)
    rows = []
    for seed in parse_seeds(seeds):
        task = load_task(data, backbone, seed=seed, shots=shots, test_per_class=test_per_class)
        target = choose_target(task, seed)
        torch.manual_seed(seed)
        clean = plugins.get("attack", "clean").from_options(preset=preset).run(
            backbone=backbone, train=task.train, target=None, seed=seed).model
        progress(f"seed {seed}: clean model tuned; running {attack} towards {target!r}")
        start = time.process_time()
        torch.manual_seed(seed)
        outcome = attack_cls.from_options(overrides, preset=preset).run(backbone=backbone, train=task.train,
                                                                         target=target, seed=seed)
        trained = time.process_time() - start
        metrics = evaluate(outcome.model, task.test, task.base, task.new, outcome.trigger, target)
        evaluated = time.process_time() - start - trained
        clean_base, clean_new = attack_success_rates(clean, task.test, task.base, task.new, outcome.trigger, target)
        rows.append({"seed": seed, "target": target, "acc_base": metrics.acc_base,
                     "clean_acc_base": accuracy(clean, task.test.restrict(task.base)),
                     "asr_base": metrics.asr_base, "clean_asr_base": clean_base,
                     "asr_new": metrics.asr_new, "clean_asr_new": clean_new, "trigger_ssim": metrics.trigger_ssim,
                     "cpu_train": round(trained, 1), "cpu_eval": round(evaluated, 1)})
        progress(f"seed {seed}: done")
    click.echo(f"{attack} on {dataset}, {shots} shots, {test_per_class} test images per class, options {overrides}")
    echo_table(rows, [("seed", "SEED"), ("target", "TARGET"), ("acc_base", "ACC-BASE"), ("clean_acc_base", "CLEAN"),
                      ("asr_base", "ASR-BASE"), ("clean_asr_base", "CLEAN"), ("asr_new", "ASR-NEW"),
                      ("clean_asr_new", "CLEAN"), ("trigger_ssim", "SSIM"), ("cpu_train", "CPU-TRAIN"),
                      ("cpu_eval", "CPU-EVAL")])
    if json_path is not None:
        write_json_atomic(json_path, {"attack": attack, "dataset": dataset, "shots": shots,
                                      "test_per_class": test_per_class, "options": overrides, "rows": rows})


if __name__ == "__main__":
    main()
