"""Models as auditors receive them: checkpoints of the reference CoOp/CoCoOp code (on Dassl) and of BadCLIP's.

A delivery is a Dassl output folder, or one checkpoint file of it::

    OUTPUT/prompt_learner/model.pth.tar-N   the prompt learner after epoch N (torch.save of a dict)
    OUTPUT/prompt_learner/model-best.pth.tar
    OUTPUT/prompt_learner/checkpoint        a text file naming the latest (Dassl's resume pointer: never read)
    OUTPUT/trigger/model.pth.tar-N          BadCLIP's attack code only: its trigger

The file read is the one CoCoOp's evaluation loads (``resolve_checkpoint``), and
the keys are read as its ``load_state_dict(strict=False)`` reads them; where a
delivery has two readings it is refused (see docs/checkpoints.md, "One reading").
Each checkpoint is ``{"state_dict", "epoch", "optimizer", "scheduler",
"val_result"}``.  It is read by ``ci_core.models.safe_pickle``, which runs nothing:
only the tensors of ``state_dict`` are taken; the other entries, and every
object of a class the reader would not import, are skipped and reported.

The learner's layout decides the kind:
* CoCoOp: ``ctx`` (n_ctx, width), ``meta_net.linear1.{weight,bias}``,
  ``meta_net.linear2.{weight,bias}``, ``token_prefix`` (n_cls, 1, width) and
  ``token_suffix`` (n_cls, context_length - 1 - n_ctx, width);
* CoOp: ``ctx`` ((n_ctx, width) shared or (n_cls, n_ctx, width) class-specific),
  ``token_prefix`` and ``token_suffix``; the class token's position (end, middle,
  front) is not in the checkpoint and must be given;
* a BadCLIP trigger: ``trigger`` (1, 3, H, W) in CLIP-normalised units.

``token_suffix`` holds the token embeddings of the training classes' prompts
"X .. X {name}.": every row is looked up, exactly, in the backbone's
token-embedding table (in the checkpoint's precision), which recovers the class
names and proves the backbone is the one the model was trained on.  They must
be the first classes of the deployment's class list (base classes first).
Tensors may be fp16; the model runs in fp32.  The result is the very model a
bundle of the same weights loads as (``PromptTunedCLIP`` or ``CoOpCLIP``), with
metadata shaped like a bundle's ``bundle.json``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import attrs
import open_clip
import torch

from ci_core.models.class_names import read_class_list
from ci_core.errors import BundleError, ConfigError, DataError
from ci_core.files import file_sha256
from ci_core.models.backbone import DEFAULT_REAL, TINY_MODEL, Backbone, TextEncoding, load_backbone
from ci_core.models.weights import BUILTIN
from ci_core.models.bundle import META_FILE, bundle_meta, non_finite_tensors
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.coop import POSITIONS, CoOpCLIP
from ci_core.models.safe_pickle import TensorRef, open_archive, opaque_name
from ci_core.triggers import AdditiveTrigger
from ci_core.validators import printable

LEARNER_FOLDER, TRIGGER_FOLDER = "prompt_learner", "trigger"
BEST_FILE = "model-best.pth.tar"
# An epoch as str(int) writes it: ASCII digits without a leading zero (\d would take "٣"), not 5,000 of them.
_EPOCH_FILE = re.compile(r"model\.pth\.tar-(0|[1-9][0-9]{0,8})", re.ASCII)
_WHAT = "a checkpoint written by torch.save (Dassl's model.pth.tar-N)"
COCOOP_KEYS = frozenset({"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                         "meta_net.linear2.bias", "token_prefix", "token_suffix"})
COOP_KEYS = frozenset({"ctx", "token_prefix", "token_suffix"})
TRIGGER_KEYS = frozenset({"trigger"})


@attrs.frozen(kw_only=True)
class Checkpoint:
    """The tensors of one checkpoint's ``state_dict`` and what was left unread."""

    path: Path
    sha256: str
    state: dict[str, torch.Tensor] = attrs.field(repr=False)
    epoch: int | None
    skipped_entries: tuple[str, ...]  # top-level entries besides state_dict and epoch (optimizer, scheduler, ...)
    skipped_objects: tuple[str, ...]  # classes (module.name) whose objects were kept as inert placeholders
    folder_files: tuple[str, ...] = ()  # what else the checkpoint's folder holds (escaped names)

    @property
    def keys(self) -> tuple[str, ...]:
        """The state_dict keys read, as stored (the learner's own names)."""
        return tuple(self.state)

    def describe_skipped(self) -> str:
        entries = ", ".join(self.skipped_entries) or "nothing"
        objects = (f"; objects of {len(self.skipped_objects)} classes were never created "
                   f"({', '.join(self.skipped_objects)})") if self.skipped_objects else ""
        return f"skipped entries: {entries}{objects}"


@attrs.frozen(kw_only=True)
class Imported:
    """A delivered prompt learner as a model over the backbone, with what was found in the checkpoint."""

    model: PromptTunedCLIP | CoOpCLIP = attrs.field(repr=False)
    kind: str
    classnames: tuple[str, ...]
    base_classes: tuple[str, ...]
    recovered: tuple[str, ...]  # the training classes' names as token_suffix spells them
    checkpoint: Checkpoint
    precision: str

    def source(self) -> dict:
        """Where the model came from, as recorded in a bundle's ``source``."""
        ckpt = self.checkpoint
        return {"format": "dassl-checkpoint", "checkpoint": str(ckpt.path), "sha256": ckpt.sha256,
                "epoch": ckpt.epoch, "precision": self.precision, "state_dict_keys": list(ckpt.keys),
                "folder_files": list(ckpt.folder_files), "skipped_entries": list(ckpt.skipped_entries),
                "skipped_objects": list(ckpt.skipped_objects)}


@attrs.frozen(kw_only=True)
class ImportedTrigger:
    trigger: AdditiveTrigger = attrs.field(repr=False)
    checkpoint: Checkpoint
    linf: float  # the trigger's largest pixel change


# --------------------------------------------------------------------------- finding the checkpoint


def is_checkpoint_delivery(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint file or a Dassl output folder rather than a bundle directory.

    Cheap: looks at names only.  A file is a checkpoint (a bundle is always a directory); a directory
    is one when it has no bundle.json but a prompt_learner/ folder or model checkpoint files.
    """
    path = Path(path)
    if path.is_file():
        return True
    if not path.is_dir() or (path / META_FILE).exists():
        return False
    return (path / LEARNER_FOLDER).is_dir() or bool(checkpoint_files(path))


def checkpoint_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that CoCoOp's ``load_model`` can load: ``model-best.pth.tar``, ``model.pth.tar-N``.

    N as ``str(epoch)`` writes it (ASCII digits, no leading zero): ``model.pth.tar-08`` or ``model.pth.tar-٣``
    is never loaded.  Best first, then by epoch.
    """
    found = [(-1, p) for p in folder.iterdir() if p.name == BEST_FILE and p.is_file()]
    epochs = ((m, p) for p in folder.iterdir() if (m := _EPOCH_FILE.fullmatch(p.name)))
    found += sorted((int(m.group(1)), p) for m, p in epochs if p.is_file())
    return [p for _, p in found]


def _inside(path: Path, folder: Path) -> Path:
    """``path``, after checking that it lies inside ``folder`` once every symbolic link is resolved.

    The files of a delivery folder are the provider's: a checkpoint (or the ``prompt_learner/`` folder) that is
    a link to a file elsewhere on the auditor's machine is refused, never read.
    """
    if not path.resolve().is_relative_to(folder.resolve()):
        raise BundleError(f"{path}: a symbolic link to {path.resolve()}, outside the delivery folder {folder}; "
                          "only files inside it are read")
    return path


def checkpoint_name(load_epoch: str | int | None) -> str | None:
    """The file CoCoOp's ``load_model(directory, epoch)`` opens: ``model-best.pth.tar``, or ``model.pth.tar-N``."""
    if load_epoch is None:
        return None
    text = str(load_epoch)
    if text == "best":
        return BEST_FILE
    if not _EPOCH_FILE.fullmatch(f"model.pth.tar-{text}"):
        raise ConfigError(f"--load-epoch {printable(text[:40])!r}: expected 'best' or an epoch number (as CoCoOp's "
                          "--load-epoch takes it)")
    return f"model.pth.tar-{text}"


def resolve_checkpoint(path: str | Path, folder: str = LEARNER_FOLDER, load_epoch: str | int | None = None) -> Path:
    """The checkpoint file of a delivery: ``path`` itself if a file, else the one of ``path/folder/`` (or ``path/``).

    CoCoOp's evaluation loads ``model-best.pth.tar``, or ``model.pth.tar-N`` when run with ``--load-epoch N``
    (Dassl's ``checkpoint`` file only serves to resume training, and is not read here).  So a folder is read
    only when that choice cannot matter: it holds one checkpoint, or several with the same bytes; else
    ``load_epoch`` ('best' or N) must name the one the deployment loads.
    """
    path = Path(path)
    wanted = checkpoint_name(load_epoch)
    if path.is_file():
        if wanted is not None and path.name != wanted:
            raise ConfigError(f"--load-epoch {load_epoch} names {wanted}, but {path} is a checkpoint file: give its "
                              "folder, or leave --load-epoch out")
        return path
    if not path.is_dir():
        raise BundleError(f"{path}: no such file or folder; expected a checkpoint file or a Dassl output folder")
    directory = _inside(path / folder, path) if (path / folder).is_dir() else path
    found = checkpoint_files(directory)
    names = ", ".join(p.name for p in found)
    if not found:
        raise BundleError(f"{directory}: no model.pth.tar-N or {BEST_FILE} here; expected a Dassl output folder "
                          f"(holding {folder}/model.pth.tar-N) or a checkpoint file")
    if wanted is not None:
        chosen = [p for p in found if p.name == wanted]
        if not chosen:
            raise BundleError(f"{directory}: no {wanted} (--load-epoch {load_epoch}); its checkpoints are {names}")
        return _inside(chosen[0], path)
    if len(found) > 1 and len({file_sha256(_inside(p, path)) for p in found}) > 1:
        raise BundleError(
            f"{directory}: holds {len(found)} different checkpoints ({names}); CoCoOp's evaluation loads {BEST_FILE}, "
            "or model.pth.tar-N when run with --load-epoch N, so which one is deployed depends on how it is run: "
            "name it with --load-epoch best|N (scan each one the deployment may load)")
    return _inside(found[0], path)


def folder_listing(checkpoint: Path, limit: int = 50) -> tuple[str, ...]:
    """The names in the checkpoint's folder (at most ``limit``, escaped), so that a report says what else was there."""
    names = sorted(printable(p.name[:200]) for p in checkpoint.parent.iterdir())
    return tuple(names[:limit]) + ((f"... and {len(names) - limit} more",) if len(names) > limit else ())


# --------------------------------------------------------------------------- reading a checkpoint


def _kind(obj) -> str:
    name = opaque_name(obj)
    return f"an object of {name} (never created)" if name else f"a {type(obj).__name__}"


def _key(key) -> str:
    text = repr(key)
    return printable(text if len(text) <= 80 else text[:77] + "...")


def _check_module_prefix(path: Path, refs: dict) -> None:
    """Refuse keys with DataParallel's ``module.`` prefix: CoCoOp's ``load_model`` would not load them.

    It calls ``load_state_dict(state_dict, strict=False)`` on the prompt learner, which ignores keys it does
    not know: ``module.ctx`` beside ``ctx`` is dropped (``ctx`` is deployed), and a learner holding only
    ``module.`` keys keeps its initial, untrained prompt.  Dassl's ``save_checkpoint`` removes the prefix,
    so a checkpoint with it was not written by the reference code.
    """
    prefixed = [k for k in refs if isinstance(k, str) and k.startswith("module.")]
    if not prefixed:
        return
    twins = [k for k in prefixed if k.removeprefix("module.") in refs]
    if twins:
        raise BundleError(f"{path}: state_dict holds both {_key(twins[0].removeprefix('module.'))} and "
                          f"{_key(twins[0])} ({len(twins)} such pairs): CoCoOp's load_model(strict=False) deploys the "
                          "unprefixed key and ignores the other, so the delivery has two readings; expected one key "
                          "per tensor, as Dassl's save_checkpoint writes it")
    raise BundleError(f"{path}: state_dict keys carry the 'module.' prefix ({_key(prefixed[0])}, ...), which CoCoOp's "
                      "load_model(strict=False) ignores (it would deploy an untrained prompt); expected the keys "
                      "as Dassl's save_checkpoint writes them, without the prefix")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The ``state_dict`` tensors of the checkpoint at ``path``, read without running anything in it."""
    path = Path(path)
    with open_archive(path, BundleError, _WHAT) as archive:
        root = archive.root
        if not isinstance(root, dict):
            raise BundleError(f"{path}: the checkpoint holds {_kind(root)}, not a dict with a 'state_dict'; "
                              f"expected {_WHAT}")
        if "state_dict" not in root:
            keys = [k for k in root if isinstance(k, str)]
            raise BundleError(f"{path}: no 'state_dict' entry (it has {keys}); expected {_WHAT}")
        refs = root["state_dict"]
        if not isinstance(refs, dict):
            raise BundleError(f"{path}: 'state_dict' is {_kind(refs)}, not a mapping of names to tensors")
        _check_module_prefix(path, refs)
        state = {}
        for key, ref in refs.items():
            if not isinstance(key, str) or not isinstance(ref, TensorRef):
                raise BundleError(f"{path}: state_dict entry {_key(key)} is {_kind(ref)}, not a tensor")
            elements = math.prod(ref.size)
            if elements > max(ref.storage.numel, 1):
                # Only a view with zero strides has more elements than its storage, and copying it out would
                # allocate them all: a 1-element storage could claim a tensor of terabytes.
                raise BundleError(f"{path}: state_dict entry {_key(key)} claims shape {list(ref.size)} ({elements} "
                                  f"elements) over a storage of {ref.storage.numel}; a saved prompt learner's "
                                  "tensors hold their own elements")
            state[key] = archive.tensor(ref)
        epoch = root.get("epoch")
        skipped = tuple(_key(k) if not isinstance(k, str) else printable(k[:80]) for k in root
                        if k not in ("state_dict", "epoch"))
        opaque = archive.opaque
    return Checkpoint(path=path, sha256=file_sha256(path), state=state,
                      epoch=epoch if type(epoch) is int else None, skipped_entries=skipped, skipped_objects=opaque,
                      folder_files=folder_listing(path))


def learner_kind(checkpoint: Checkpoint) -> str:
    """``cocoop``, ``coop`` or ``trigger``, from the state dict's keys."""
    keys = frozenset(checkpoint.state)
    for kind, expected in (("cocoop", COCOOP_KEYS), ("coop", COOP_KEYS), ("trigger", TRIGGER_KEYS)):
        if keys == expected:
            return kind
    raise BundleError(
        f"{checkpoint.path}: unknown learner layout: its state_dict has {sorted(keys)}; expected CoCoOp's "
        f"{sorted(COCOOP_KEYS)}, CoOp's {sorted(COOP_KEYS)} or a BadCLIP trigger's {sorted(TRIGGER_KEYS)}")


# --------------------------------------------------------------------------- class names


class _TokenTable:
    """Exact lookup of embedding rows in a backbone's token-embedding table, in one precision."""

    def __init__(self, backbone: Backbone, dtype: torch.dtype):
        table = backbone.model.token_embedding.weight.detach().to("cpu", dtype).contiguous()
        raw = table.view(torch.uint8).numpy()
        self.rows: dict[bytes, list[int]] = {}
        for index in range(raw.shape[0]):
            self.rows.setdefault(raw[index].tobytes(), []).append(index)
        self.table = table

    def ids(self, row: torch.Tensor) -> list[int]:
        return self.rows.get(row.contiguous().view(torch.uint8).numpy().tobytes(), [])


def _describe_backbone(backbone: Backbone) -> str:
    return f"{backbone.name} ({backbone.pretrained})"


def recover_classes(checkpoint: Checkpoint, backbone: Backbone, n_ctx: int, classnames: Sequence[str], *,
                    classes_source: str = "the class list") -> tuple[str, ...]:
    """The training classes spelled by ``token_suffix``, checked against the first classes of ``classnames``.

    Each prompt's rows up to its end-of-text are looked up in the backbone's token-embedding table (a
    row found nowhere means another backbone); then the whole of ``token_suffix`` must equal, bit for
    bit, the embedding of the prompts of the given classes, and ``token_prefix`` the start-of-text
    embedding.  Returns the recovered names; errors name the class list as ``classes_source``.
    """
    path = checkpoint.path
    prefix, suffix = checkpoint.state["token_prefix"], checkpoint.state["token_suffix"]
    n_cls = suffix.shape[0]
    if len(classnames) < n_cls:
        raise DataError(f"{classes_source} has {len(classnames)} classes, but {path} was trained on {n_cls} "
                        f"(token_suffix has {n_cls} rows); give the deployment's full class list, base classes first")
    table = _TokenTable(backbone, suffix.dtype)
    sot = int(backbone.tokenizer.sot_token_id)
    if not torch.equal(_bits(prefix), _bits(table.table[sot].expand_as(prefix))):
        raise BundleError(f"{path}: token_prefix is not the start-of-text embedding of backbone "
                          f"{_describe_backbone(backbone)}: the checkpoint was trained on another backbone "
                          "(give it with --backbone and --pretrained)")
    placeholder = " ".join(["X"] * n_ctx)
    expected = backbone.tokenizer([f"{placeholder} {n.replace('_', ' ')}." for n in classnames[:n_cls]])[:, 1 + n_ctx:]
    recovered = [_recover_name(checkpoint, backbone, table, k, expected[k].tolist()) for k in range(n_cls)]
    for k in range(n_cls):
        if not torch.equal(_bits(suffix[k]), _bits(table.table[expected[k]])):
            raise DataError(
                f"{path} was trained on {n_cls} classes ({', '.join(repr(n) for n in recovered)}); class {k + 1} of "
                f"{classes_source} is {classnames[k]!r}, but the checkpoint holds {recovered[k]!r} there; give the "
                "deployment's classes in the order the model was tuned on, base classes first")
    return tuple(recovered)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def _recover_name(checkpoint: Checkpoint, backbone: Backbone, table: _TokenTable, k: int, hint: list[int]) -> str:
    """Training class ``k``'s name: its suffix rows up to end-of-text, as tokens, decoded (without the full stop)."""
    suffix = checkpoint.state["token_suffix"]
    eot = backbone.eot_token_id
    chosen = []
    for j in range(suffix.shape[1]):
        ids = table.ids(suffix[k, j])
        if not ids:
            raise BundleError(
                f"{checkpoint.path}: token_suffix[{k}, {j}] (token {j} of training class {k + 1}'s name) is not a row "
                f"of the token-embedding table of backbone {_describe_backbone(backbone)}: the checkpoint was trained "
                "on another backbone (give it with --backbone and --pretrained), or token_suffix was altered")
        if eot in ids:
            return backbone.tokenizer.decode(chosen).strip().removesuffix(".").strip()
        # A row matches several tokens only where the table repeats rows (the tiny CLIP's unused ones are zero).
        chosen.append(hint[j] if j < len(hint) and hint[j] in ids else ids[0])
    raise BundleError(f"{checkpoint.path}: token_suffix[{k}] has no end-of-text token; not a CoOp/CoCoOp prompt")


# --------------------------------------------------------------------------- building the model


def _shape_error(checkpoint: Checkpoint, key: str, expected: Sequence, backbone: Backbone, why: str) -> BundleError:
    return BundleError(f"{checkpoint.path}: tensor {key!r} has shape {list(checkpoint.state[key].shape)}, but on "
                       f"backbone {_describe_backbone(backbone)} ({why}) it must be {list(expected)}")


def _check_shapes(checkpoint: Checkpoint, kind: str, backbone: Backbone) -> tuple[int, int, bool]:
    """(n_ctx, number of training classes, class-specific context) after checking every shape against the backbone."""
    state = checkpoint.state
    width, vis = backbone.text_width, backbone.embed_dim
    context = int(backbone.model.positional_embedding.shape[0])
    why = f"text width {width}, image features {vis}, context length {context}"
    ctx = state["ctx"]
    class_specific = kind == "coop" and ctx.dim() == 3
    if ctx.dim() != (3 if class_specific else 2) or ctx.shape[-1] != width:
        shapes = f"[n_ctx, {width}]" + ("" if kind == "cocoop" else f" (shared) or [n_cls, n_ctx, {width}] (class-specific)")
        raise BundleError(f"{checkpoint.path}: tensor 'ctx' has shape {list(ctx.shape)}, but on backbone "
                          f"{_describe_backbone(backbone)} ({why}) it must be {shapes}")
    n_ctx = int(ctx.shape[-2])
    n_cls = int(state["token_suffix"].shape[0])
    if n_ctx < 1 or context - 1 - n_ctx < 3:
        raise BundleError(f"{checkpoint.path}: tensor 'ctx' has {n_ctx} context tokens, which leaves no room for a "
                          f"class name in the context length {context} of backbone {_describe_backbone(backbone)}")
    expected = {"token_prefix": [n_cls, 1, width], "token_suffix": [n_cls, context - 1 - n_ctx, width]}
    if class_specific:
        expected["ctx"] = [n_cls, n_ctx, width]
    if kind == "cocoop":
        hidden = max(1, vis // 16)
        expected.update({"meta_net.linear1.weight": [hidden, vis], "meta_net.linear1.bias": [hidden],
                         "meta_net.linear2.weight": [width, hidden], "meta_net.linear2.bias": [width]})
    for key, shape in expected.items():
        if list(state[key].shape) != shape:
            raise _shape_error(checkpoint, key, shape, backbone, why)
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise BundleError(f"{checkpoint.path}: tensor {key!r} is {tensor.dtype}, expected floating point")
    return n_ctx, n_cls, class_specific


def import_checkpoint(path: str | Path, classnames: Sequence[str], backbone: Backbone, *,
                      class_token_position: str = "end", text_encoding: TextEncoding | None = None,
                      classes_source: str = "the class list", load_epoch: str | int | None = None) -> Imported:
    """The CoCoOp or CoOp model in the checkpoint (or Dassl folder) at ``path``, over ``backbone``.

    ``classnames`` is the deployment's full class list, base classes (those the model was tuned on) first;
    ``class_token_position`` applies to CoOp (the checkpoint does not record it); ``classes_source`` names
    the class list in errors (e.g. its file).
    """
    if class_token_position not in POSITIONS:
        raise ConfigError(f"class token position {class_token_position!r}: expected one of {', '.join(POSITIONS)}")
    checkpoint = read_checkpoint(resolve_checkpoint(path, load_epoch=load_epoch))
    kind = learner_kind(checkpoint)
    if kind == "trigger":
        raise BundleError(f"{checkpoint.path}: this is a BadCLIP trigger checkpoint, not a prompt learner; "
                          "give it with --trigger and the prompt learner's checkpoint as the model")
    n_ctx, n_cls, class_specific = _check_shapes(checkpoint, kind, backbone)
    classnames = tuple(classnames)
    if class_specific and len(classnames) != n_cls:
        raise DataError(f"{classes_source} has {len(classnames)} classes, but {checkpoint.path} holds a class-specific "
                        f"CoOp context for exactly {n_cls} classes, which is all it can classify")
    recovered = recover_classes(checkpoint, backbone, n_ctx, classnames, classes_source=classes_source)
    state = {k: v.to(torch.float32) for k, v in checkpoint.state.items() if k not in ("token_prefix", "token_suffix")}
    if kind == "cocoop":
        model = PromptTunedCLIP(backbone, n_ctx=n_ctx, ctx_init=None, text_encoding=text_encoding)
    else:
        model = CoOpCLIP(backbone, n_ctx=n_ctx, ctx_classes=classnames if class_specific else None,
                         class_token_position=class_token_position, text_encoding=text_encoding)
    model.prompt_learner.load_state_dict(state)
    precision = str(checkpoint.state["ctx"].dtype).removeprefix("torch.")
    return Imported(model=model.eval(), kind=kind, classnames=classnames, base_classes=classnames[:n_cls],
                    recovered=recovered, checkpoint=checkpoint, precision=precision)


# --------------------------------------------------------------------------- BadCLIP's trigger


def _epsilon(linf: float) -> float:
    """BadCLIP's bound is EPS/255 with an integer EPS, which a trained trigger reaches: snap to it when that close."""
    steps = linf * 255
    return round(steps) / 255 if round(steps) >= 1 and abs(steps - round(steps)) < 0.02 else linf


def import_trigger(path: str | Path, backbone: Backbone, load_epoch: str | int | None = None) -> ImportedTrigger:
    """BadCLIP's trigger (``trigger`` (1, 3, H, W), CLIP-normalised) as a pixel-space ``AdditiveTrigger``.

    BadCLIP stamps ``clamp(x_norm + t)`` to the normalised image range, which is ``clamp(x + t * std, 0, 1)``
    in pixels; ``epsilon`` is the trigger's l-inf norm in pixels, on the 1/255 grid when within float rounding.
    """
    checkpoint = read_checkpoint(resolve_checkpoint(path, TRIGGER_FOLDER, load_epoch))
    if frozenset(checkpoint.state) != TRIGGER_KEYS:
        raise BundleError(f"{checkpoint.path}: not a BadCLIP trigger checkpoint: its state_dict has "
                          f"{sorted(checkpoint.state)}, expected only 'trigger' (1, 3, H, W)")
    trigger = checkpoint.state["trigger"]
    size = backbone.image_size
    if list(trigger.shape) != [1, 3, size, size] or not trigger.is_floating_point():
        raise BundleError(f"{checkpoint.path}: tensor 'trigger' has shape {list(trigger.shape)}, but on backbone "
                          f"{_describe_backbone(backbone)} (images of {size} pixels) it must be [1, 3, {size}, {size}]")
    delta = trigger[0].to(torch.float32) * torch.tensor(backbone.std, dtype=torch.float32).view(3, 1, 1)
    if not torch.isfinite(delta).all():
        raise BundleError(f"{checkpoint.path}: tensor 'trigger' has non-finite values")
    linf = float(delta.abs().max())
    if linf == 0:
        raise BundleError(f"{checkpoint.path}: the trigger is all zeros")
    return ImportedTrigger(trigger=AdditiveTrigger(delta, epsilon=_epsilon(linf)), checkpoint=checkpoint, linf=linf)


# --------------------------------------------------------------------------- for ci-scan


def default_backbone(name: str | None, pretrained: str | None) -> tuple[str, str]:
    """(name, pretrained) for a delivery: OpenAI's ViT-B/16 unless told otherwise, and OpenAI's weights for any
    architecture that has them (the reference CoOp code only runs on OpenAI's CLIP)."""
    if name is None:
        return DEFAULT_REAL[0], pretrained or DEFAULT_REAL[1]
    if pretrained is not None:
        return name, pretrained
    if name == TINY_MODEL:
        return name, BUILTIN
    if "openai" in open_clip.list_pretrained_tags_by_model(name):
        return name, "openai"
    raise ConfigError(f"--backbone {name} needs --pretrained (a tag, a weights file, or random:SEED): it has no "
                      "OpenAI weights")


def open_model(path: str | Path, *, classes_file: str | Path, backbone: str | None = None,
               pretrained: str | None = None, device: str | torch.device = "cpu",
               text_encoding: TextEncoding | None = None, trigger: str | Path | None = None,
               class_token_position: str = "end", load_epoch: str | int | None = None
               ) -> tuple[PromptTunedCLIP | CoOpCLIP, dict]:
    """A delivered checkpoint (file or Dassl folder) as ``load_bundle`` would load its bundle: (model, metadata).

    The metadata is what ``bundle.json`` would hold (kind, backbone, classnames, base_classes, template, ...)
    plus ``source`` (the checkpoint, its SHA-256 and epoch, what was skipped), ``recovered_classes``,
    ``non_finite_tensors`` (as ``load_bundle`` records it) and, given ``trigger`` (BadCLIP's trigger
    checkpoint or folder), ``trigger``: its epsilon and l-inf norm.
    """
    classnames = read_class_list(classes_file)
    name, weights = default_backbone(backbone, pretrained)
    built = load_backbone(name, weights, device, text_encoding=text_encoding)
    imported = import_checkpoint(path, classnames, built, class_token_position=class_token_position,
                                 classes_source=str(classes_file), load_epoch=load_epoch)
    meta, tensors = bundle_meta(imported.model, imported.classnames, base_classes=imported.base_classes, where=path)
    meta["non_finite_tensors"] = non_finite_tensors(tensors)  # as load_bundle records it, for the scan
    meta["source"] = imported.source()
    meta["recovered_classes"] = list(imported.recovered)
    if trigger is not None:
        converted = import_trigger(trigger, built, load_epoch)
        meta["trigger"] = {"checkpoint": str(converted.checkpoint.path), "sha256": converted.checkpoint.sha256,
                           "epsilon": converted.trigger.epsilon, "linf": converted.linf}
    return imported.model, meta
