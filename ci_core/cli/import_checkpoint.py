"""``ci-import``: a CoOp/CoCoOp model delivered as the reference code's (Dassl) checkpoints, as a bundle.

CHECKPOINT is a checkpoint file (``model.pth.tar-N``) or a Dassl output folder
(its ``prompt_learner/`` latest checkpoint is taken).  Nothing in it is run:
see ``ci_core.models.delivery`` and ``ci_core.models.safe_pickle``.  The training classes are
recovered from the checkpoint's token embeddings, printed, and checked against
``--classes``.  With ``--trigger``, BadCLIP's trigger checkpoint (or its
``trigger/`` folder) is written beside the bundle in the project's trigger
format, for ``ci-repair --trigger`` and the benchmark's ground-truth ASR.
Nothing is written unless everything was read and checked; the bundle is
written atomically, and removed again if the trigger cannot be written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from ci_core.models.class_names import read_class_list
from ci_core.cli.common import configure_threads, one_line, report_errors
from ci_core.models.delivery import default_backbone, import_checkpoint, import_trigger
from ci_core.errors import BundleError
from ci_core.models.backbone import load_backbone
from ci_core.models.bundle import save_bundle
from ci_core.models.coop import POSITIONS

TRIGGER_SUFFIX = ".trigger.safetensors"


def delivery_options(func):
    """``--trigger`` and ``--class-token-position``: the options a checkpoint delivery adds to ``--classes`` and
    the backbone options (``ci-import`` and ``ci-scan`` both take them)."""
    func = click.option("--class-token-position", type=click.Choice(POSITIONS), default="end", show_default=True,
                        help="CoOp only: where the class name sits in the prompt (CLASS_TOKEN_POSITION of the "
                             "training config; a checkpoint does not record it).")(func)
    func = click.option("--load-epoch", default=None, metavar="best|N",
                        help="Dassl folders: the checkpoint the deployment loads (CoCoOp's --load-epoch: "
                             "model.pth.tar-N, or 'best' for model-best.pth.tar); needed when the folder holds "
                             "several different checkpoints.")(func)
    func = click.option("--trigger", type=click.Path(exists=True, path_type=Path), default=None,
                        metavar="TRIGGER_CHECKPOINT",
                        help="BadCLIP's trigger: its checkpoint file, or the Dassl output folder holding trigger/.")(func)
    return func


def delivery_backbone_options(func):
    """``--backbone`` and ``--pretrained`` for a delivery, whose default is the reference code's OpenAI ViT-B/16."""
    func = click.option("--pretrained", default=None, metavar="TAG|FILE|random:SEED",
                        help="The backbone's weights: an open_clip tag (default: openai), OpenAI's own archive "
                             "(e.g. ~/.cache/clip/ViT-B-16.pt, accepted only with its published SHA-256), a "
                             ".safetensors file or torch state dict, or random:SEED.")(func)
    func = click.option("--backbone", default=None, metavar="NAME",
                        help="The open_clip model the checkpoint was trained on. Default: ViT-B-16 with OpenAI's "
                             "weights (QuickGELU), the reference code's default.")(func)
    return func


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option("--classes", "classes_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The deployment's class list, one per line, base classes first (the order the model was tuned on).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The bundle folder to write (must not exist).")
@click.option("--trigger-out", type=click.Path(path_type=Path), default=None,
              help=f"Where --trigger is written (default: OUT{TRIGGER_SUFFIX} beside the bundle).")
@delivery_backbone_options
@delivery_options
@click.option("--quiet", is_flag=True, help="Print only the written paths.")
@report_errors
def main(checkpoint, classes_file, out, trigger_out, backbone, pretrained, trigger, load_epoch, class_token_position,
         quiet):
    """Turn the CoOp/CoCoOp model in CHECKPOINT (a model.pth.tar-N file or a Dassl output folder) into a bundle."""
    configure_threads()
    # Names, keys and classes printed here come from the delivery: every line is escaped (one_line), so that no
    # escape sequence reaches the terminal and no line break forges a line.
    def say(text: str) -> None:
        if not quiet:
            click.echo(one_line(text))

    if out.exists():
        raise BundleError(f"--out {out} already exists; refusing to overwrite a bundle")
    trigger_out = trigger_out or out.with_name(out.name + TRIGGER_SUFFIX)
    if trigger is not None and trigger_out.exists():
        raise BundleError(f"--trigger-out {trigger_out} already exists; refusing to overwrite a trigger")
    classnames = read_class_list(classes_file)
    name, weights = default_backbone(backbone, pretrained)
    built = load_backbone(name, weights, "cpu")
    imported = import_checkpoint(checkpoint, classnames, built, class_token_position=class_token_position,
                                 classes_source=str(classes_file), load_epoch=load_epoch)
    converted = import_trigger(trigger, built, load_epoch) if trigger is not None else None

    ckpt, model = imported.checkpoint, imported.model
    detail = (f", class token at the {model.class_token_position}, "
              f"{'class-specific' if model.class_specific else 'shared'} context") if imported.kind == "coop" else ""
    say(f"read {ckpt.path} (epoch {ckpt.epoch if ckpt.epoch is not None else '?'}, sha256 {ckpt.sha256[:16]}...): "
        f"a {'CoCoOp' if imported.kind == 'cocoop' else 'CoOp'} prompt learner, n_ctx {model.n_ctx}, "
        f"{imported.precision}{detail}")
    say(f"  {ckpt.describe_skipped()}")
    say(f"classes recovered from its token embeddings (the {len(imported.base_classes)} it was tuned on), "
        f"matching {classes_file}:")
    for index, (recovered, given) in enumerate(zip(imported.recovered, imported.base_classes), 1):
        # The tokens are the same; only the spacing around punctuation, which tokens do not keep, may differ.
        same = recovered == given.replace("_", " ").lower()
        say(f"  {index:3d}  {recovered}" + ("" if same else f"  (= {given!r}, the same tokens)"))
    new = imported.classnames[len(imported.base_classes):]
    if new:
        say(f"  and {len(new)} new class{'es' if len(new) > 1 else ''} from {classes_file}: "
            f"{', '.join(new[:8])}{', ...' if len(new) > 8 else ''}")

    save_bundle(model, imported.classnames, out, base_classes=imported.base_classes, source=imported.source())
    click.echo(one_line(f"wrote bundle {out} (kind {imported.kind}, backbone {built.name} {built.pretrained}, "
               f"{len(imported.classnames)} classes)"))
    if converted is not None:
        try:
            converted.trigger.save(trigger_out)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            for written in (trigger_out, trigger_out.with_name(trigger_out.name + ".json")):
                written.unlink(missing_ok=True)
            raise
        say(f"read {converted.checkpoint.path} (epoch {converted.checkpoint.epoch}): "
            f"{converted.checkpoint.describe_skipped()}")
        click.echo(one_line(f"wrote trigger {trigger_out} (pixel l-inf {converted.linf * 255:.2f}/255, "
                            f"epsilon {converted.trigger.epsilon * 255:.2f}/255)"))


if __name__ == "__main__":
    main()
