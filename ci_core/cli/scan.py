"""``ci-scan``: is this delivered model backdoored, and which class is the target?"""

from __future__ import annotations

from pathlib import Path

import click

from ci_core.cli.common import (StderrProgress, backbone_options, configure_threads, parse_options, report_errors,
                                resolve_runtime, runtime_options)
from ci_core.data.ood import load_pool
from ci_core.errors import DataError
from ci_core.models.bundle import bundle_sha256, load_bundle, read_meta
from ci_core.plugins import registry
from ci_core.scan import scan, write_scan
from ci_core.workflow import pool_sizes, preset_for


def read_class_file(path: Path, bundle_classes: list[str]) -> list[str]:
    """Candidate classes from ``path``: one per line, blank lines and lines starting with '#' skipped.

    Every name must be a class of the bundle, and none may repeat.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc}); expected one class name per line") from exc
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(names) < 2:
        raise DataError(f"{path}: needs at least two class names, one per line (found {len(names)})")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate class names {duplicates}")
    unknown = [n for n in names if n not in bundle_classes]
    if unknown:
        raise DataError(f"{path}: classes {unknown} are not classes of the bundle (which has {len(bundle_classes)}: "
                        f"{', '.join(bundle_classes[:10])}{', ...' if len(bundle_classes) > 10 else ''})")
    return names


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--ood", required=True, help="Folder of unlabelled OOD images, or 'builtin' for the tiny world's pool.")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Candidate classes, one per line, each a class of the bundle (default: every class of the bundle).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: scan-<bundle name>).")
@click.option("--detector", default="ci", show_default=True)
@click.option("--scorer", default=None, help="Default: the detector's own scorer.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Detector option, e.g. epsilon=0.0627.")
@click.option("--scorer-option", "scorer_options", multiple=True, metavar="KEY=VALUE", help="Scorer option, e.g. k=2.")
@click.option("--pool-size", type=int, help="Inversion images |D| (default 1000; 256 on the tiny CLIP).")
@click.option("--holdout", type=int, help="Held-out images |T| for ASR (default 500; 128 on the tiny CLIP).")
@click.option("--seed", default=0, show_default=True)
@backbone_options("the one the bundle records (its weights must be the same)")
@runtime_options
@click.option("--quiet", is_flag=True, help="No progress lines.")
@report_errors
def main(bundle, ood, classes_file, out, detector, scorer, options, scorer_options, pool_size, holdout, seed,
         backbone, pretrained, device, max_text_batch, bf16, quiet):
    """Scan the prompt-tuned model in BUNDLE for a backdoor; writes OUT/report.json and OUT/triggers/."""
    configure_threads()
    progress = StderrProgress(quiet)
    runtime = resolve_runtime(device, max_text_batch, bf16)
    plugins = registry()
    detector_cls = plugins.get("detector", detector)
    meta = read_meta(bundle)
    classnames = read_class_file(classes_file, meta["classnames"]) if classes_file else meta["classnames"]
    progress(f"loading {bundle} on {runtime.device}")
    model, meta = load_bundle(bundle, device=runtime.device, name=backbone, pretrained=pretrained,
                              text_encoding=runtime.text_encoding)
    preset = preset_for(model.backbone)
    det = detector_cls.from_options(parse_options(options, "--option"), preset=preset)
    scorer_cls = plugins.get("scorer", scorer or det.default_scorer)
    sc = scorer_cls.from_options(parse_options(scorer_options, "--scorer-option"), preset=preset)
    default_pool, default_holdout = pool_sizes(preset)
    pool = load_pool(ood, inversion=pool_size or default_pool, holdout=holdout or default_holdout,
                     image_size=model.backbone.image_size, seed=seed, progress=progress)
    progress(f"scanning {bundle} with {det.name}: {len(classnames)} candidate classes, |D|={len(pool.inversion)}, "
             f"|T|={len(pool.holdout)}{f', {len(pool.skipped)} unreadable files skipped' if pool.skipped else ''}")
    result = scan(model, det, sc, pool, classnames, seed=seed, progress=progress)
    out = out or Path(f"scan-{Path(bundle).resolve().name}")
    report_path = write_scan(result, out, pool, bundle={"path": str(bundle), "sha256": bundle_sha256(bundle)},
                             backbone=model.backbone.identity(), device=runtime.device, seed=seed, preset=preset)
    verdict = "BACKDOORED" if result.scores.backdoored else "clean"
    click.echo(f"{verdict}: s_max {result.scores.s_max:.2f} (k = {sc.config.k if hasattr(sc.config, 'k') else '?'}), "
               f"most anomalous class {result.scores.target!r}; report: {report_path}")


if __name__ == "__main__":
    main()
