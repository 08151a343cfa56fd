"""``ci-repair``: fine-tune a flagged model with a scan's trigger, and write the repaired model as a new bundle.

The defender's labelled clean set comes from ``--data``: ``builtin`` takes the
registered dataset whose class names are the bundle's (a tiny-world dataset, or
with ``--data-root`` one of the CoOp-layout datasets under that root), a
folder is read as ``DIR/train/<class>/`` and ``DIR/test/<class>/`` image
folders.  The repair uses ``--shots`` training images per base class; ACC and
ASR are measured before and after on the test images, ASR with the scan's
trigger for ĉ (and with a ground-truth trigger, given ``--trigger``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import click
import torch

from ci_core.cli.common import (StderrProgress, backbone_options, configure_threads, data_root_option, echo_table,
                                parse_options, report_errors, resolve_runtime, runtime_options)
from ci_core.data.datasets import LabeledImages, base_new_split
from ci_core.data.images import IMAGE_SUFFIXES, UNREADABLE, describe_unreadable, read_image
from ci_core.data.labeled import is_one_path_part
from ci_core.errors import ConfigError, DataError
from ci_core.learning.evaluation import accuracy, attack_success_rates
from ci_core.files import write_json_atomic
from ci_core.interfaces import to_json
from ci_core.models.backbone import TINY_MODEL
from ci_core.models.bundle import load_bundle, read_meta, save_bundle
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.plugins import registry
from ci_core.scanning.scan_triggers import ScanTriggers, check_flagged, check_same_bundle, choose_trigger
from ci_core.triggers import Trigger
from ci_core.plugins import load_trigger
from ci_core.learning.protocol import preset_for

BUILTIN = "builtin"
# The most images per class --shots and --test-images may ask for: far above the few-shot protocol (1 to 16) and
# the CoOp datasets' test splits (ImageNet's has 50 per class, Food-101's 250), and a bound on what the built-in
# datasets render on demand.
MAX_PER_CLASS = 1000


# --------------------------------------------------------------------------- the clean data


def builtin_dataset(classnames: Sequence[str], data_root: Path | None = None):
    """The registered dataset whose class names are exactly ``classnames`` (in order).

    Datasets that read files are considered only when their folder is under ``data_root``; one that
    is there but cannot be opened is passed over and named in the error if nothing matches.
    """
    plugins = registry()
    passed_over = []
    for name in plugins.names("dataset"):
        cls = plugins.get("dataset", name)
        if cls.needs_data_root and (data_root is None or not cls.present(data_root)):
            continue
        try:
            dataset = cls.open(data_root)
            if tuple(dataset.classnames) == tuple(classnames):
                return dataset
        except DataError as exc:
            passed_over.append(f"{name} ({exc})")
    hint = "pass --data DIR with the labelled images" + ("" if data_root else ", or --data-root DIR with the CoOp-layout datasets")
    unopened = f"; could not open: {'; '.join(passed_over)}" if passed_over else ""
    raise DataError(f"no registered dataset has the bundle's {len(classnames)} classes ({', '.join(classnames[:5])}"
                    f"{', ...' if len(classnames) > 5 else ''}); {hint}{unopened}")


def _inside(path: Path, base: Path) -> bool:
    """Whether ``path``, every symbolic link resolved, lies inside ``base`` (itself resolved)."""
    return path.resolve().is_relative_to(base)


def _class_folder(split_dir: Path, name: str) -> Path:
    """The folder of class ``name`` directly inside ``split_dir``: ``name`` itself, or with spaces as underscores.

    Class names come from the bundle, which the auditor does not write: a name that is not one plain folder
    name ('/', '..', an absolute path) is refused, and so is a folder whose symbolic links lead out of
    ``split_dir``.
    """
    candidates = tuple(dict.fromkeys((name, name.replace(" ", "_"))))
    for candidate in candidates:
        if not is_one_path_part(candidate):
            raise DataError(f"{split_dir}: class {name!r} cannot name a class folder (a folder name holds no '/', "
                            "'\\' or NUL and is not '.' or '..'); give the labelled images with --data builtin "
                            "or rename the class")
    base = split_dir.resolve()
    for candidate in candidates:
        folder = split_dir / candidate
        try:
            found = folder.is_dir()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise DataError(f"{split_dir}: class {name!r} cannot name a class folder ({exc.strerror})") from None
        if found:
            if not _inside(folder, base):
                raise DataError(f"{folder}: a symbolic link to {folder.resolve()}, outside {split_dir}; class "
                                f"folders are read only inside the --data folder")
            return folder
    raise DataError(f"{split_dir}: no folder for class {name!r} (looked for "
                    f"{' and '.join(repr(c) for c in candidates)})")


def load_class_folders(root: Path, split: str, classnames: Sequence[str], *, image_size: int,
                       per_class: int | None, seed: int) -> LabeledImages:
    """Images of ``root/split/<class>/`` for every class of ``classnames``; ``per_class`` samples that many by ``seed``.

    Every file read lies inside ``root/split/`` once symbolic links are resolved; an unreadable or
    oversized image (``ci_core.data.images.check_image_size``) is an error that names it.
    """
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"--data {root}: expected a folder {split}/ holding one folder of images per class")
    base = split_dir.resolve()
    images, labels = [], []
    for label, name in enumerate(classnames):
        folder = _class_folder(split_dir, name)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if per_class is not None:
            if len(files) < per_class:
                raise DataError(f"{folder}: found {len(files)} image{'s' * (len(files) != 1)} of class {name!r}, but the "
                                f"repair needs {per_class} per class (--shots {per_class} for train/, --test-images "
                                "for test/); add images or ask for fewer")
            random.Random(f"{seed}:{name}").shuffle(files)
            files = files[:per_class]
        if not files:
            raise DataError(f"{folder} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
        for path in files:
            if not _inside(path, base):
                raise DataError(f"{path}: a symbolic link to {path.resolve()}, outside {split_dir}; images are read "
                                "only inside the --data folder")
            try:
                images.append(read_image(path, image_size))
            except UNREADABLE as exc:
                raise DataError(f"{path}: unreadable image ({describe_unreadable(exc)})") from exc
            labels.append(label)
    return LabeledImages(torch.stack(images), torch.tensor(labels), tuple(classnames))


def load_data(data: str, classnames: Sequence[str], base: Sequence[str], *, image_size: int, shots: int,
              test_images: int | None, seed: int, data_root: Path | None = None) -> tuple[LabeledImages, LabeledImages]:
    """(the few-shot clean training set of the base classes, the test images of every class)."""
    if data == BUILTIN:
        dataset = builtin_dataset(classnames, data_root)
        clean = dataset.load("train", image_size=image_size, seed=seed, shots=shots).restrict(base)
        test = dataset.load("test", image_size=image_size, seed=seed, shots=test_images)
        return clean, test
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"--data {data}: not a folder (and not 'builtin')")
    clean = load_class_folders(root, "train", base, image_size=image_size, per_class=shots, seed=seed)
    test = load_class_folders(root, "test", classnames, image_size=image_size, per_class=test_images, seed=seed)
    return clean, test


# --------------------------------------------------------------------------- measuring


def measure(model: PromptTunedCLIP, test: LabeledImages, base: Sequence[str], new: Sequence[str],
            triggers: dict[str, tuple[Trigger, str]]) -> dict:
    """ACC on base and new classes; for each named (trigger, target), ASR on base and on new classes plus the target."""
    base, new = tuple(base), tuple(new)
    row = {"acc_base": accuracy(model, test.restrict(base)),
           "acc_new": accuracy(model, test.restrict(new)) if new else None}
    for label, (trigger, target) in triggers.items():  # the protocol of every ASR in the toolkit
        row[f"asr_base_{label}"], row[f"asr_new_{label}"] = attack_success_rates(model, test, base, new, trigger, target)
    return row


# --------------------------------------------------------------------------- the command


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--report", required=True, type=click.Path(path_type=Path),
              help="The ci-scan output folder of BUNDLE (or its report.json); of a two-scan folder (--own-images), "
                   "the scan on your own images, judged by the pair's verdict.")
@click.option("--data", required=True,
              help="'builtin' (the registered dataset with the bundle's classes: a tiny-world one, or a CoOp-layout one "
                   "under --data-root) or DIR with train/<class>/ and test/<class>/.")
@data_root_option
@click.option("--repairer", default="ci-trigger", show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The repaired bundle (must not exist).")
@click.option("--shots", default=4, show_default=True, type=click.IntRange(min=1, max=MAX_PER_CLASS),
              help="Labelled clean images per base class for the fine-tuning.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Repairer option, e.g. epochs=2.")
@click.option("--trigger", "true_trigger", type=click.Path(dir_okay=False, path_type=Path),
              help="A ground-truth trigger (.safetensors with its .json sidecar): also measure its ASR.")
@click.option("--trigger-target", help="The ground-truth trigger's target class (default: the scan's target).")
@click.option("--test-images", type=click.IntRange(min=1, max=MAX_PER_CLASS),
              help="Test images per class (default: the whole test split).")
@click.option("--force", is_flag=True,
              help="Repair even if the scan found the model clean (with the trigger of its most anomalous class), or "
                   "could not measure it as a whole but measured every class on the rest (with its suspect's).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the measurements as JSON.")
@backbone_options("the one the bundle records (its weights must be the same)")
@runtime_options
@click.option("--quiet", is_flag=True, help="No progress lines.")
@report_errors
def main(bundle, report, data, data_root, repairer, out, shots, seed, options, true_trigger, trigger_target, test_images,
         force, json_path, backbone, pretrained, device, max_text_batch, bf16, quiet):
    """Repair the model in BUNDLE with a trigger from its scan REPORT; writes the repaired model to OUT."""
    configure_threads()
    progress = StderrProgress(quiet)
    runtime = resolve_runtime(device, max_text_batch, bf16)
    repairer_cls = registry().get("repairer", repairer)
    repairer_options = parse_options(options, "--option")
    meta = read_meta(bundle)
    # The repairer's config, with the preset of the backbone the bundle names (checked against the loaded one
    # below), before anything is loaded: a bad --option fails in a second, not after the model and data are read.
    preset = "tiny" if (backbone or meta["backbone"]["name"]) == TINY_MODEL else None
    fixer = repairer_cls.from_options(repairer_options, preset=preset)
    if meta["kind"] not in repairer_cls.bundle_kinds:
        raise ConfigError(f"{bundle} is a {meta['kind']!r} bundle, which {repairer} cannot repair (it repairs "
                          f"{', '.join(repr(k) for k in repairer_cls.bundle_kinds)} bundles; a 'zeroshot' bundle is a "
                          "fine-tuned image encoder without a prompt learner)")
    if json_path is not None:
        # The measurements replace whatever file --json names: never one of the inputs, nor a file of the new bundle.
        target = json_path.resolve()
        for given, what in ((Path(bundle), "BUNDLE"), (Path(report), "--report"), (out, "--out")):
            if target == given.resolve() or target.is_relative_to(given.resolve()):
                raise ConfigError(f"--json {json_path} is {what} {given} or inside it; write the measurements elsewhere")
    scan = ScanTriggers.read(report)
    check_same_bundle(scan, bundle)
    check_flagged(scan, force=force)
    classnames = list(meta["classnames"])
    unknown = [c for c in scan.classnames if c not in classnames]
    if unknown:
        raise DataError(f"{scan.source}: classes {unknown[:5]} are not classes of the bundle")
    if out.exists():
        raise ConfigError(f"--out {out} already exists; the repaired model goes to a new bundle")
    if meta.get("base_classes"):
        base = tuple(meta["base_classes"])
        new = tuple(c for c in classnames if c not in base)
    else:
        base, new = base_new_split(classnames)
        progress(f"{bundle} does not record its base classes; using the CoOp split (the first {len(base)} classes)")
    if trigger_target is not None and trigger_target not in classnames:
        raise ConfigError(f"--trigger-target {trigger_target!r} is not a class of the bundle")
    if trigger_target is not None and true_trigger is None:
        raise ConfigError("--trigger-target needs --trigger")
    truth = load_trigger(true_trigger) if true_trigger is not None else None

    model, meta = load_bundle(bundle, device=runtime.device, name=backbone, pretrained=pretrained,
                              text_encoding=runtime.text_encoding)
    if preset_for(model.backbone) != preset:
        fixer = repairer_cls.from_options(repairer_options, preset=preset_for(model.backbone))
    clean, test = load_data(data, classnames, base, image_size=model.backbone.image_size, shots=shots,
                            test_images=test_images, seed=seed, data_root=data_root)
    picked = choose_trigger(fixer, scan)
    top = scan.pick("top")
    progress(f"{fixer.name}: {len(clean)} clean images of {len(base)} base classes; scan target {scan.target!r}"
             + (f"; {fixer.name} takes the scan's trigger for {picked.name!r}" if picked is not None
                else f"; {fixer.name} takes no trigger"))
    probes = {"scan": (top.trigger, top.name)}
    if truth is not None:
        probes["true"] = (truth, trigger_target or scan.target)
    before = measure(model, test, base, new, probes)
    repaired = fixer.repair(model=model, trigger=picked.trigger if picked is not None else None,
                            target=picked.name if picked is not None else scan.target, clean=clean, seed=seed,
                            progress=progress)
    after = measure(repaired, test, base, new, probes)
    save_bundle(repaired, classnames, out, base_classes=meta.get("base_classes"), template=meta["template"])

    labels = {"acc_base": "ACC base", "acc_new": "ACC new"}
    for key, (_, target) in probes.items():
        what = "scan trigger" if key == "scan" else "true trigger"
        labels[f"asr_base_{key}"] = f"ASR base ({what} -> {target!r})"
        labels[f"asr_new_{key}"] = f"ASR new+target ({what} -> {target!r})"
    echo_table([{"metric": label, "before": before[key], "after": after[key]} for key, label in labels.items()],
               [("metric", "METRIC"), ("before", "BEFORE"), ("after", "AFTER")])
    click.echo(f"repaired with {fixer.name}; new bundle: {out}")
    if json_path:
        record = {
            "bundle": str(bundle), "report": scan.source, "out": str(out), "repairer": fixer.name,
            "repairer_config": to_json(fixer.config), "scan_target": scan.target,
            "repair_trigger_class": picked.name if picked is not None else None,
            "true_trigger": str(true_trigger) if true_trigger else None, "shots": shots, "seed": seed,
            "before": before, "after": after,
        }
        write_json_atomic(json_path, record)


if __name__ == "__main__":
    main()
