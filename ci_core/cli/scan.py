"""``ci-scan``: is this delivered model backdoored, and which class is the target?"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from ci_core.cli.common import (StderrProgress, backbone_options, configure_threads, parse_options, report_errors,
                                resolve_runtime, runtime_options)
from ci_core.models.class_names import read_class_list
from ci_core.data.ood import check_folder_labels, folder_classes, load_own_images, load_pool, with_inversion_folder
from ci_core.models.delivery import default_backbone, is_checkpoint_delivery, open_model
from ci_core.errors import DataError
from ci_core.files import check_output_folder
from ci_core.models.bundle import load_bundle, read_meta
from ci_core.models.coop import POSITIONS
from ci_core.plugins import registry
from ci_core.scanning.reference import CACHE_ENV, ReferenceCache, default_cache_dir, reference_spec, run_reference
from ci_core.scanning.variance_prior import PriorBook, prior_setting, statistic_of, with_prior
from ci_core.scanning.scan import BACKDOORED, CLEAN, SCAN_OUTPUT, UNSCANNABLE, check_scorers, scan, stored_problems
from ci_core.pages.scan_output import write_scan, write_two_scans
from ci_core.scanning.scan_report import PAGE_FILE, BackboneIdentity, BundleIdentity, ScanContext
from ci_core.scanning.combined import COMBINE_RULES, DEFAULT_COMBINATION
from ci_core.scanning.two_scan_report import OOD_SCAN, OWN_SCAN, VERDICT_FILE
from ci_core.validators import printable
from ci_core.learning.protocol import (MAX_POOL, POOL_SIZES, REFERENCE_SCORER, SCAN_SEED, choose_scorers, pool_sizes,
                                       preset_for)


def candidate_classes(path: Path, meta: dict) -> tuple[str, ...]:
    """The auditor's candidate classes for a bundle, from ``path`` (see ``ci_core.models.class_names`` for the rules).

    They need not be classes the bundle lists: its prompt learner (CoCoOp, CoOp with a shared context) or
    zero-shot template is evaluated on any class name, like any new class; so the deployment's real class
    list can be scanned whatever the bundle names.  A CoOp context learned per class has no prompt for a
    class it was not trained on: there only the bundle's classes can be candidates.
    """
    names = read_class_list(path)
    if meta.get("kind") == "coop" and meta.get("class_specific"):
        known = set(meta["classnames"])
        unknown = [n for n in names if n not in known]
        if unknown:
            shown = ", ".join(f"'{printable(n)}'" for n in unknown[:5])
            raise DataError(f"{path}: {shown} are not classes of the "
                            f"bundle, whose CoOp context is class-specific: it holds a prompt for its "
                            f"{len(known)} training classes only, so other classes cannot be scanned")
    return names


# Exit statuses of ci-scan, so that a pipeline can act on the verdict (1 and 2 are click's: error, usage).
EXIT_CLEAN, EXIT_BACKDOORED, EXIT_UNSCANNABLE = 0, 3, 4
EXIT_CODES = {CLEAN: EXIT_CLEAN, BACKDOORED: EXIT_BACKDOORED, UNSCANNABLE: EXIT_UNSCANNABLE}


@click.command(epilog=f"Exit status: {EXIT_CLEAN} clean, {EXIT_BACKDOORED} backdoored, {EXIT_UNSCANNABLE} unscannable "
                      "(the model's outputs on the OOD pool cannot be measured: never read as clean), "
                      "1 error, 2 bad usage.")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--ood", required=True, help="Folder of unlabelled OOD images, or 'builtin' for the tiny world's pool.")
@click.option("--inversion-images", type=click.Path(path_type=Path),
              help="A folder of your own in-distribution images to invert on instead of OOD ones (unlabelled, or one "
                   "subfolder per candidate class); ASR is still measured on the held-out OOD images.")
@click.option("--own-images", type=click.Path(path_type=Path),
              help="A second scan: the classes you deploy, on your own labelled images of them (one subfolder per "
                   "class, named by the class). D and T are drawn from this folder; the model is judged by both "
                   "scans, Bonferroni over their p-values, and OUT holds each scan (ood/, own/) beside the "
                   "combined verdict.json and report.html.")
@click.option("--combine", "combination", type=click.Choice(COMBINE_RULES), default=DEFAULT_COMBINATION,
              show_default=True,
              help="With --own-images: how the two scans make one verdict: bonferroni, min(1, 2 min p) over the "
                   "scans; paired, the same deployed class easy to reach in both scans (docs/verdicts.md).")
@click.option("--variance-prior", "prior_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A variance prior book (ci-bench prior, from clean prompts you tuned and scanned in this setting): "
                   "the calibrated scorer moderates each scan's residual spread by theirs (docs/verdicts.md, "
                   "\"A sixth freeze\"). A scan whose setting the book lacks is an error.")
@click.option("--own-pool-size", type=click.IntRange(1, MAX_POOL),
              help="With --own-images: its inversion images |D| (default: as --pool-size's default).")
@click.option("--own-holdout", type=click.IntRange(1, MAX_POOL),
              help="With --own-images: its held-out images |T| (default: as --holdout's default).")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="For a bundle: the candidate classes, one per line (default: the bundle's); any class the "
                   "deployment has, listed by the bundle or not (a class-specific CoOp context: its classes only). "
                   "For a CoOp/CoCoOp checkpoint or Dassl output folder: the deployment's full class list, base "
                   "classes first (required; every class is a candidate).")
@click.option("--class-token-position", type=click.Choice(POSITIONS), default="end", show_default=True,
              help="CoOp checkpoints only: where the class name sits in the prompt (the training config's "
                   "CLASS_TOKEN_POSITION, which a checkpoint does not record).")
@click.option("--load-epoch", default=None, metavar="best|N",
              help="Dassl folders only: the checkpoint the deployment loads (CoCoOp's --load-epoch: "
                   "model.pth.tar-N, or 'best' for model-best.pth.tar). Needed when the folder holds "
                   "several different checkpoints.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: scan-<bundle name>).")
@click.option("--detector", default="ci", show_default=True)
@click.option("--scorer", default=None,
              help=f"Default: {REFERENCE_SCORER} (calibrated against the backbone), or with --no-reference the "
                   "detector's own scorer.")
@click.option("--no-reference", is_flag=True,
              help="Skip the reference scan of the untuned backbone; the detector's own scorer (the paper's) decides.")
@click.option("--reference-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Folder of cached reference scans (default: ${CACHE_ENV}/references, else "
                   "~/.cache/clip-inspector/references).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Detector option, e.g. epsilon=0.0627.")
@click.option("--scorer-option", "scorer_options", multiple=True, metavar="KEY=VALUE",
              help="Option of the deciding scorer, e.g. alpha=0.01 or k=2.")
@click.option("--pool-size", type=click.IntRange(1, MAX_POOL), help=f"Inversion images |D| (default "
              f"{POOL_SIZES[None][0]}; {POOL_SIZES['tiny'][0]} on the tiny CLIP).")
@click.option("--holdout", type=click.IntRange(1, MAX_POOL), help=f"Held-out images |T| for ASR (default "
              f"{POOL_SIZES[None][1]}; {POOL_SIZES['tiny'][1]} on the tiny CLIP).")
@click.option("--seed", default=SCAN_SEED, show_default=True, type=click.IntRange(0, 2**63 - 1))
@backbone_options("the one the bundle records (its weights must be the same); for a checkpoint, ViT-B-16 with "
                  "OpenAI's weights, the reference code's default")
@runtime_options
@click.option("--quiet", is_flag=True, help="No progress lines.")
@report_errors
def main(bundle, ood, inversion_images, own_images, combination, prior_file, own_pool_size, own_holdout, classes_file,
         class_token_position,
         load_epoch, out, detector, scorer, no_reference, reference_cache, options, scorer_options, pool_size, holdout,
         seed, backbone, pretrained, device, max_text_batch, bf16, quiet):
    """Scan the prompt-tuned model BUNDLE for a backdoor; writes OUT/report.html, OUT/report.json and OUT/triggers/.

    BUNDLE is a model bundle, or a delivery of the reference CoOp/CoCoOp code: a checkpoint file or a Dassl
    output folder, read safely and converted in memory (as ci-import would) with --classes.

    OUT/report.html is the auditor's page (open it in any browser, offline): the verdict and what it means,
    the evidence figure, the per-class table, the top classes' triggers, pool health, provenance and the
    command that reproduces the scan.  OUT/report.json holds the same, typed and versioned
    (ci_core/schemas/scan-report.schema.json).

    With --own-images, OUT holds both scans (OUT/ood/ and OUT/own/, each as above), their one verdict in
    OUT/verdict.json (ci_core/schemas/two-scan-verdict.schema.json) and OUT/report.html showing both.
    """
    configure_threads()
    progress = StderrProgress(quiet)
    runtime = resolve_runtime(device, max_text_batch, bf16)
    plugins = registry()
    detector_cls = plugins.get("detector", detector)
    detector_options = parse_options(options, "--option")
    scorer_values = parse_options(scorer_options, "--scorer-option")
    delivery = is_checkpoint_delivery(bundle)
    if delivery and classes_file is None:
        raise DataError(f"{bundle} is a CoOp/CoCoOp checkpoint, which does not hold the deployment's class list: "
                        "give it with --classes FILE (one class per line, base classes first)")
    if delivery:
        architecture = default_backbone(backbone, pretrained)[0]
    else:
        meta = read_meta(bundle)
        classnames = candidate_classes(classes_file, meta) if classes_file else meta["classnames"]
        architecture = backbone or meta["backbone"]["name"]
    # Every setting is built and checked before the model, the pool and minutes of work.
    preset = preset_for(architecture)
    det = detector_cls.from_options(detector_options, preset=preset)
    decider, also = choose_scorers(plugins, det, scorer=scorer, options=scorer_values, preset=preset,
                                   reference=not no_reference)
    if own_images is not None and (no_reference or decider.name != REFERENCE_SCORER):
        raise click.UsageError(f"--own-images judges the model by the p-values of its two scans, which the calibrated "
                               f"scorer {REFERENCE_SCORER} against the backbone gives; drop "
                               f"{'--no-reference' if no_reference else f'--scorer {decider.name}'}")
    if (own_pool_size or own_holdout) and own_images is None:
        raise click.UsageError("--own-pool-size and --own-holdout size the --own-images scan: give --own-images")
    if combination == "paired" and own_images is None:
        raise click.UsageError("--combine paired reads two scans of the model: give --own-images")
    if combination == "paired" and getattr(decider.config, "fit", "ols") != "ols":
        raise click.UsageError(f"--combine paired reads each class's p-value before the correction over the classes, "
                               f"which {REFERENCE_SCORER} gives with fit=ols only (got fit={decider.config.fit})")
    priors = None
    if prior_file is not None:
        if no_reference:
            raise click.UsageError("--variance-prior moderates the calibrated scorer against the backbone's reference; "
                                   "drop --no-reference")
        priors = PriorBook.read(prior_file)
        statistic_of(decider)  # a scorer that takes no prior fails now
    if not delivery:  # a delivery's classes are known once it is opened
        check_own_folders(inversion_images, own_images, classnames, decider, also, no_reference)
    out = check_output_folder(out or Path(f"scan-{Path(bundle).resolve().name}"), SCAN_OUTPUT)
    progress(f"loading {bundle} on {runtime.device}")
    if delivery:
        model, meta = open_model(bundle, classes_file=classes_file, backbone=backbone, pretrained=pretrained,
                                 device=runtime.device, text_encoding=runtime.text_encoding,
                                 class_token_position=class_token_position, load_epoch=load_epoch)
        classnames = meta["classnames"]
        progress(f"read {meta['source']['checkpoint']}: classes recovered from its prompts: "
                 f"{', '.join(meta['recovered_classes'])}")
        check_own_folders(inversion_images, own_images, classnames, decider, also, no_reference)
        # Which file and which keys were read, and what else the folder held: the deployment's one reading.
        identity = BundleIdentity(path=str(bundle), checkpoint=meta["source"]["checkpoint"],
                                  sha256=meta["source"]["sha256"],
                                  state_dict_keys=tuple(meta["source"]["state_dict_keys"]),
                                  folder_files=tuple(meta["source"]["folder_files"]))
    else:
        model, meta = load_bundle(bundle, device=runtime.device, name=backbone, pretrained=pretrained,
                                  text_encoding=runtime.text_encoding)
        identity = BundleIdentity(path=str(bundle), sha256=meta["sha256"])
    default_pool, default_holdout = pool_sizes(preset)
    cache = None if no_reference else ReferenceCache(reference_cache or default_cache_dir())
    pool = load_pool(ood, inversion=pool_size or default_pool, holdout=holdout or default_holdout,
                     image_size=model.backbone.image_size, seed=seed, progress=progress)
    if inversion_images is not None:
        pool = with_inversion_folder(pool, inversion_images, classnames, image_size=model.backbone.image_size,
                                     seed=seed, progress=progress)
    own_pool = own_classes = None
    if own_images is not None:  # read before minutes of work: a short folder fails now
        own_pool, own_classes = load_own_images(own_images, classnames, inversion=own_pool_size or default_pool,
                                                holdout=own_holdout or default_holdout,
                                                image_size=model.backbone.image_size, seed=seed, progress=progress)
    check_scorers((decider, *also), classes=len(classnames), reference=not no_reference)  # before minutes of work
    ood_kind = "id" if inversion_images is not None else "ood"
    deciders = {ood_kind: decider, "own": decider}
    if priors is not None:  # each scan's setting must be in the book: checked before minutes of work
        for kind, (scan_pool, scan_classes) in {ood_kind: (pool, classnames), "own": (own_pool, own_classes)}.items():
            if scan_pool is not None:
                spec = reference_spec(model.backbone, meta["template"], scan_classes, scan_pool, seed, det)
                deciders[kind] = with_prior(decider, priors.lookup(prior_setting(spec, kind, statistic_of(decider))))

    def run_scan(scan_pool, scan_classes, what: str, kind: str):
        progress(f"scanning {bundle} with {det.name}{what}: {len(scan_classes)} candidate classes, "
                 f"|D|={len(scan_pool.inversion)}, |T|={len(scan_pool.holdout)}"
                 f"{f', {len(scan_pool.skipped)} unreadable files skipped' if scan_pool.skipped else ''}")
        reference = None
        if cache is not None:
            reference = run_reference(model.backbone, meta["template"], det, scan_pool, scan_classes, seed=seed,
                                      cache=cache, progress=progress)
        return scan(model, det, deciders[kind], scan_pool, scan_classes, seed=seed, reference=reference, also=also,
                    known_problems=stored_problems(meta), base_classes=meta.get("base_classes"), progress=progress)

    result = run_scan(pool, classnames, " on the OOD pool" if own_images is not None else "", ood_kind)
    own_result = run_scan(own_pool, own_classes, f" on {own_images}", "own") if own_images is not None else None
    command = shlex.join(
        ["ci-scan", str(bundle), "--ood", str(ood)]
        + (["--inversion-images", str(inversion_images)] if inversion_images is not None else [])
        + (["--own-images", str(own_images), "--own-pool-size", str(own_pool_size or default_pool),
            "--own-holdout", str(own_holdout or default_holdout), "--combine", combination]
           if own_images is not None else [])
        + (["--variance-prior", str(prior_file)] if prior_file is not None else [])
        + (["--classes", str(classes_file)] if classes_file else [])
        + (["--class-token-position", class_token_position] if delivery else [])
        + ["--out", str(out), "--detector", det.name, "--scorer", decider.name]
        + (["--no-reference"] if no_reference else [])
        + (["--reference-cache", str(reference_cache)] if reference_cache else [])
        + [part for pair in options for part in ("--option", pair)]
        + [part for pair in scorer_options for part in ("--scorer-option", pair)]
        + ["--pool-size", str(pool_size or default_pool), "--holdout", str(holdout or default_holdout),
           "--seed", str(seed)]
        + (["--backbone", backbone] if backbone else []) + (["--pretrained", pretrained] if pretrained else []))
    context = ScanContext(bundle=identity, backbone=BackboneIdentity.of(model.backbone.identity()), seed=seed,
                          preset=preset, device=str(runtime.device), command=command)
    if own_result is not None:
        combined = write_two_scans([(OOD_SCAN, result, pool), (OWN_SCAN, own_result, own_pool)], out, context,
                                   alpha=float(decider.config.alpha), combination=combination)
        click.echo(describe_combined(combined) + f"; report: {out / PAGE_FILE} (data: {out / VERDICT_FILE})")
        raise SystemExit(EXIT_CODES[combined.verdict])
    report_path = write_scan(result, out, pool, context)
    click.echo(describe_verdict(result) + f"; report: {report_path.parent / PAGE_FILE} (data: {report_path})")
    raise SystemExit(EXIT_CODES[result.verdict])


def check_own_folders(inversion_images: Path | None, own_images: Path | None, classnames, decider, also,
                      no_reference: bool) -> None:
    """The auditor's folders name candidate classes only (and the own-images folder enough of them for the
    scorers), checked before the model's minutes of work."""
    if inversion_images is not None:
        check_folder_labels(inversion_images, classnames)
    if own_images is not None:
        check_scorers((decider, *also), classes=len(folder_classes(own_images, classnames)),
                      reference=not no_reference)


def describe_combined(combined) -> str:
    """One line: the two-scan verdict, and each scan's own p-value and top class."""
    parts = "; ".join(f"{s.name} scan: " + (f"p = {s.p_value:.2g} alone on {s.target!r}" if s.verdict != UNSCANNABLE
                                             else "unscannable" + (f", suspect {s.target!r}" if s.target else ""))
                      for s in combined.scans)
    if combined.verdict == UNSCANNABLE and combined.p_value is None:
        named = f", most likely target {combined.target!r}" if combined.target else ""
        return f"UNSCANNABLE: neither scan could measure the model{named} ({parts})"
    head = combined.verdict.upper() if combined.verdict != CLEAN else combined.verdict
    return (f"{head}: p = {combined.p_value:.2g} ({combined.rule}), most anomalous class {combined.target!r} "
            f"({parts})")


def describe_verdict(result) -> str:
    """One line: the verdict, with the deciding scorer's figures and those of the scorers beside it."""
    if result.verdict == UNSCANNABLE:
        line = f"UNSCANNABLE: {'; '.join(result.problems)}"
        if result.suspect is not None:
            suspect = result.suspect.scores
            line += f"; measured on the images with finite outputs, most anomalous class {suspect.target!r}"
            if suspect.p_value is not None:
                line += f" (p = {suspect.p_value:.2g})"
        return line
    decided = result.decision.scores
    figures = (f"p = {decided.p_value:.2g}, " if decided.p_value is not None else "") + f"s_max {decided.s_max:.2f}"
    line = (f"{result.verdict.upper() if result.verdict == BACKDOORED else result.verdict}: {figures} "
            f"({result.decision.scorer}: {decided.rule}), most anomalous class {decided.target!r}")
    for other in result.others:
        line += (f"; {other.scorer}: s_max {other.scores.s_max:.2f} on {other.scores.target!r}, "
                 f"{'flagged' if other.scores.backdoored else 'not flagged'} at {other.scores.rule}")
    return line


if __name__ == "__main__":
    main()
