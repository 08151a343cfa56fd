"""What limits a repair: each repairer setting on every backdoored prompt-tuned model of a store, side by side.

For every backdoored model of a ``ci-bench run`` store whose bundle a prompt
repairer can take and that has a ci scan of all its classes (at ``--scan-seed``),
this fine-tunes a copy with each repairer setting given by ``--setting``, on the
same clean set a repair cell uses (``--repair-shots`` of the model's own few-shot
images per base class, drawn by ``--seed``), and prints the attack's own
trigger's ASR on base and on new classes and the base ACC, before and after.
It also prints how far the scan's trigger for its top class reaches on its own
(its ASR on the base and new test images of the model before repair): a repair
can only unlearn what the trigger it is given reaches.  And it prints the floor:
the attack's own trigger's ASR on a clean model of the same dataset (the
store's floor cell of the model where it has one, else its clean model of the
lowest seed).  An l-inf trigger optimised towards a
class moves a clean model towards it too; a prompt-only repair, which cannot
change the frozen image encoder, is not expected to go far below that.

Settings beyond the repairer's own options: ``shots=N`` (the defender's clean
images per base class) and ``oracle=true`` (stamp the attack's own trigger and
target instead of the scan's).

    python benchmarks/repair_limits.py STORE --setting ci-trigger --setting ci-trigger:track_steps=1 \\
        [--attacks badclip,siba] [--datasets tiny-colorshapes]

Nothing is written to the store.  A setting is REPAIRER[:KEY=VALUE,...] with the
repairer's tiny preset under the options.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ci_core.learning.evaluation import attack_success_rates, evaluate
from ci_core.harness.cells import repair_set
from ci_core.harness.store import Store
from ci_core.models.backbone import load_backbone
from ci_core.models.bundle import load_bundle, read_meta
from ci_core.plugins import load_trigger, registry
from ci_core.learning.protocol import load_task, preset_for
from ci_core.runtime import seed_everything
from ci_core.scanning.scan_triggers import ScanTriggers, choose_trigger


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--setting {text!r}: expected REPAIRER[:KEY=VALUE,...]")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--setting", action="append", default=[], help="REPAIRER[:KEY=VALUE,...] (repeatable; "
                        "none: only the models' figures before repair)")
    parser.add_argument("--attacks", help="comma-separated attacks (default: every backdoored one)")
    parser.add_argument("--datasets", help="comma-separated datasets (default: all)")
    parser.add_argument("--scan-seed", type=int, default=0)
    parser.add_argument("--repair-shots", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="the repair's seed (clean subset and fine-tuning)")
    args = parser.parse_args(argv)
    settings = [parse_setting(s) for s in args.setting]
    attacks = set(args.attacks.split(",")) if args.attacks else None
    datasets = set(args.datasets.split(",")) if args.datasets else None

    store = Store.open(args.store)
    plugins = registry()
    scans = {}
    for scan in store.cells("scan"):
        if scan.detector == "ci" and scan.spec.seed == args.scan_seed and scan.spec.classes == "all" and scan.reference:
            scans.setdefault(scan.model, scan)
    backbone = None
    floors = {floor.model: floor for floor in store.cells("floor")}  # model key -> its floor cell
    clean_models = {}  # per dataset, the clean model of the lowest seed
    for model in sorted(store.cells("model"), key=lambda m: m.seed, reverse=True):
        if model.attack == "clean" and not model.control:
            clean_models[model.dataset] = model
    print("attack dataset seed target | scan top, its trigger's ASR base/new | the attack's trigger on a clean model "
          "of the dataset, ASR base/new\n    setting: ASR base before->after, ASR new before->after, base ACC "
          "before->after, seconds")
    for model in sorted(store.cells("model"), key=lambda m: (m.attack, m.dataset, m.seed)):
        if model.target is None or (attacks and model.attack not in attacks) or (datasets and model.dataset not in datasets):
            continue
        bundle = store.bundle_path("model", model.key)
        if read_meta(bundle)["kind"] != "cocoop" or model.key not in scans:
            continue
        ident = model.spec.backbone
        if backbone is None:
            backbone = load_backbone(ident.name, "builtin", device="cpu")
        loaded, meta = load_bundle(bundle, backbone)
        truth = load_trigger(store.trigger_path(model.key))
        dataset = plugins.get("dataset", model.dataset).open(None)
        task = load_task(dataset, backbone, seed=model.spec.seed, shots=model.spec.shots,
                         test_per_class=model.spec.test_per_class)
        clean = repair_set(task.train, args.repair_shots, args.seed)
        triggers = ScanTriggers.read(store.scan_folder(scans[model.key].key))
        top = triggers.pick("top")
        reach = attack_success_rates(loaded, task.test, task.base, task.new, top.trigger, top.name)
        before = evaluate(loaded, task.test, task.base, task.new, truth, model.target)
        head = (f"{model.attack} {model.dataset} {model.seed} {model.target!r} | {top.name!r} "
                f"{'-' if reach[0] is None else f'{reach[0]:.2f}'}/{reach[1]:.2f}")
        if model.key in floors:  # the store's floor cell (the clean model of the same seed where it has one)
            floor = floors[model.key]
            head += (f" | on clean seed {floor.clean_seed}: {floor.metrics.get('asr_base') or 0:.3f}/"
                     f"{floor.metrics.get('asr_new') or 0:.3f}")
        elif model.dataset in clean_models:  # the floor: what the attack's own trigger does to a clean model
            reference = clean_models[model.dataset]
            clean_model, _ = load_bundle(store.bundle_path("model", reference.key), backbone)
            floor = attack_success_rates(clean_model, task.test, task.base, task.new, truth, model.target)
            head += f" | on clean seed {reference.seed}: {floor[0]:.3f}/{floor[1]:.3f}"
        print(head, flush=True)
        for name, options in settings:
            label = name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
            options = dict(options)
            shots = options.pop("shots", args.repair_shots)  # the defender's clean images per base class
            subset = clean if shots == args.repair_shots else repair_set(task.train, shots, args.seed)
            oracle = options.pop("oracle", False)  # the attack's own trigger and target instead of the scan's
            repairer = plugins.get("repairer", name).from_options(options, preset=preset_for(backbone))
            picked = choose_trigger(repairer, triggers)
            trigger, target = (truth, model.target) if oracle else (
                picked.trigger if picked else None, picked.name if picked else triggers.target)
            seed_everything(args.seed)
            start = time.perf_counter()
            repaired = repairer.repair(model=loaded, trigger=trigger, target=target, clean=subset, seed=args.seed)
            seconds = time.perf_counter() - start
            after = evaluate(repaired, task.test, task.base, task.new, truth, model.target)
            print(f"    {label:40s} base {before.asr_base:.3f}->{after.asr_base:.3f}  new {before.asr_new:.3f}->"
                  f"{after.asr_new:.3f}  ACC {before.acc_base:.3f}->{after.acc_base:.3f}  {seconds:.0f}s", flush=True)
        del loaded
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
