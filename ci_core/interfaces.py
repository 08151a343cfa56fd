"""The plugin interfaces: Attack, Detector, Scorer, Repairer and Dataset, and the results they exchange.

(The sixth kind a plugin registers, a trigger's class, is ``ci_core.triggers.Trigger``.)

Each implementation is a class with a short lowercase ``name`` and a frozen
attrs ``Config`` whose defaults are the method's published settings.  Results
are frozen attrs classes; ``to_json`` turns any of them into plain JSON
(tensors and triggers are written separately, never into JSON).
"""

from __future__ import annotations

import abc
import contextlib
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import attrs
import torch

from ci_core.data.labeled import LabeledImages
from ci_core import validators
from ci_core.errors import ConfigError
from ci_core.models.backbone import DEFAULT_REAL, Backbone
from ci_core.models.bundle import COCOOP
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.zeroshot import CLIPClassifier
from ci_core.runtime import Progress, Stopwatch, silent  # noqa: F401  (re-exported for plugins)
from ci_core.triggers import Trigger

def _non_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds, a NaN or an infinity (JSON reads NaN, Infinity and 1e400 as floats)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def _attrs_message(exc: Exception) -> str:
    """One line for an error raised by one of attrs' own validators, whose arguments are attrs internals:
    (message, attribute, what was allowed, value) for ``in_`` and ``instance_of``, a message alone otherwise."""
    args = exc.args
    if len(args) == 4 and isinstance(args[1], attrs.Attribute):
        name, allowed, value = args[1].name, args[2], args[3]
        if isinstance(exc, TypeError):  # instance_of
            types = allowed if isinstance(allowed, tuple) else (allowed,)
            return f"{name} must be {' or '.join(t.__name__ for t in types)}, got {value!r}"
        with contextlib.suppress(TypeError):  # in_: the options
            return f"{name} must be one of {', '.join(str(o) for o in allowed)}, got {value!r}"
    return str(args[0]) if args and isinstance(args[0], str) else str(exc)


# What a field declared as one of these types takes (annotations are strings under postponed evaluation).
_DECLARED = {"float": ("a finite number", validators.is_finite_number),
             "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
             "bool": ("true or false", lambda v: isinstance(v, bool))}


def _declared_check(field: attrs.Attribute):
    """(what the field takes, a test of a value, whether None is allowed) for a number or bool field, else None."""
    declared = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", None)
    if not isinstance(declared, str):
        return None
    parts = [part.strip() for part in declared.split("|")]
    optional = "None" in parts
    parts = [part for part in parts if part != "None"]
    if len(parts) != 1 or parts[0] not in _DECLARED:
        return None
    return (*_DECLARED[parts[0]], optional)


def _check_declared(fields: Mapping[str, attrs.Attribute], values: Mapping[str, Any], where: str) -> None:
    for key, value in values.items():
        declared = _declared_check(fields[key])
        if declared is not None:
            what, accepts, optional = declared
            if not (accepts(value) or optional and value is None):
                raise ConfigError(f"{where}: {key} must be {what}{' (or null)' if optional else ''}, got {value!r:.60}")


def make_config(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """Build a frozen attrs config from a mapping, rejecting unknown keys and bad values by name.

    Every error is a ``ConfigError`` that starts with ``where`` (e.g. "ci options") and names the field,
    what it must be and the value given.  Whatever a config's own validators check, a NaN or infinite
    number is refused for every field, and a field declared ``float``, ``int`` or ``bool`` (or one of
    them or None) takes only a value of that kind (an int for a float; never a bool for a number).
    """
    values = dict(values or {})
    fields = attrs.fields_dict(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; expected some of {sorted(fields)}")
    for key, value in values.items():
        if _non_finite(value):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    try:
        config = cls(**values)
    except ConfigError as exc:  # the validators of ci_core.validators say what they expected
        raise ConfigError(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        _check_declared(fields, values, where)  # e.g. text where a number goes, which comparisons choke on
        raise ConfigError(f"{where}: {_attrs_message(exc)}") from exc
    _check_declared(fields, values, where)  # what other validators let through, e.g. true as the number 1
    return config


def to_json(value: Any) -> Any:
    """Plain-JSON form of attrs results, tuples, tensors of one element and nested containers."""
    if attrs.has(type(value)):
        return {
            f.name: to_json(getattr(value, f.name))
            for f in attrs.fields(type(value))
            if f.metadata.get("json", True)
        }
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


NOT_JSON = {"json": False}


class Plugin(abc.ABC):
    """Common shape of every plugin class: a name, a Config, and an instance built from a config."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # Named sets of overrides of the Config defaults (the defaults are the paper's, for real
    # backbones); "tiny" is applied on the bundled tiny CLIP world.
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    @attrs.frozen(kw_only=True)
    class Config:
        pass

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, preset: str | None = None):
        """An instance whose config is the defaults, then ``preset``'s overrides (if the class has it), then ``options``."""
        values = dict(cls.presets.get(preset, {})) if preset else {}
        values.update(options or {})
        return cls(make_config(cls.Config, values, f"{cls.name} options"))


# --------------------------------------------------------------------------- attacks


@attrs.frozen(kw_only=True)
class AttackOutcome:
    """A trained (possibly backdoored) model, its ground-truth trigger, and the training record."""

    model: CLIPClassifier = attrs.field(metadata=NOT_JSON)
    trigger: Trigger | None = attrs.field(metadata=NOT_JSON)
    log: dict = attrs.Factory(dict)


class Attack(Plugin):
    """Trains a model on a clean few-shot training set and (unless clean) implants a backdoor.

    The model is a CoCoOp ``PromptTunedCLIP``, or a ``ZeroShotCLIP`` for attacks on the image encoder itself;
    ``bundle_kind`` says which, as the kind of bundle its models are saved as, so that a benchmark knows
    before training whether a repairer can take them (``Repairer.bundle_kinds``).
    """

    bundle_kind: ClassVar[str] = COCOOP  # a ci_core.models.bundle kind: COCOOP or ZEROSHOT
    # Config overrides that turn the backdoor off and keep everything else (schedule, optimiser, data), e.g.
    # {"poison_rate": 0.0}: the clean control trained exactly like this attack's models (``ci-bench run
    # --controls``).  The control still receives the target, and poisons nothing with it.  Empty: no control.
    control_options: ClassVar[Mapping[str, Any]] = {}

    @abc.abstractmethod
    def run(self, *, backbone: Backbone, train: LabeledImages, target: str | None, seed: int,
            progress: Progress = silent) -> AttackOutcome:
        """Train on ``train`` (the base classes); ``target`` is the backdoor's class name."""


# --------------------------------------------------------------------------- detectors


@attrs.frozen(kw_only=True)
class Inversion:
    """What a detector reconstructs for one candidate class."""

    trigger: Trigger = attrs.field(metadata=NOT_JSON)
    loss: float  # the average optimisation loss
    statistic: float | None = None  # the method's own per-class statistic (NC: mask l1, PixB: pixel count)
    loss_trace: tuple[float, ...] = ()
    # Stamped images the model gave non-finite logits on, left out of the steps they were in (a model that breaks
    # on some inputs, as the tripwire does, still shows where the others go); the scan reports them.
    set_aside: int = 0


class Detector(Plugin):
    """Reconstructs, for one candidate class, a trigger that sends unrelated images to it."""

    default_scorer: ClassVar[str]

    @abc.abstractmethod
    def invert(self, *, model: CLIPClassifier, images: torch.Tensor, classnames: Sequence[str], target: int,
               generator: torch.Generator) -> Inversion:
        """Optimise a trigger on ``images`` (the inversion set D) towards ``classnames[target]``."""


@attrs.frozen(kw_only=True)
class ClassEvidence:
    """Per-class result of a scan: the inversion plus what the core measured on the held-out set T.

    ``trigger`` is None only where the trigger was not kept (a cached reference scan).
    """

    name: str
    asr: float
    loss: float
    statistic: float | None
    ssim: float
    seconds: float
    loss_trace: tuple[float, ...] = ()
    trigger: Trigger | None = attrs.field(default=None, metadata=NOT_JSON)
    # The finished trigger's mean margin on T, l_c - max_{c' != c} l_c' on the cosine similarities (larger = c
    # reached more surely): ASR's continuous twin, measured in the same pass; it does not saturate at 1 and does
    # not carry the inversion's start like the loss (an average over the optimisation).  None in reports of
    # versions before 0.4.
    margin: float | None = None
    # The untuned backbone's mean margin towards this class on the same stamped T images (the backbone read as a
    # zero-shot classifier): how much of the trigger's pull the public backbone shares.  A trigger that exploits
    # what the backbone already knows moves both; one the model alone answers to (an implanted backdoor) moves
    # the model's margin only (ref-outlier's compare=transfer).  None where the scan had no reference, and in
    # reports written before the field existed.
    transfer_margin: float | None = None
    # Whether the model was tuned on this class (one of its bundle's base classes); None where unknown (a reference
    # scan of the backbone, reports written before the flag).  ref-outlier gives the seen classes their own intercept.
    seen: bool | None = None


# --------------------------------------------------------------------------- scorers


@attrs.frozen(kw_only=True)
class Scores:
    """Per-class anomaly scores and the model-level decision."""

    scores: tuple[float, ...]
    s_max: float
    target: str
    backdoored: bool
    flagged: tuple[str, ...]  # classes whose own score passes the threshold
    p_value: float | None = None  # the verdict's family-wise p-value, for scorers that calibrate one
    rule: str = ""  # the decision rule in words, e.g. "s_max >= 2" or "p <= 0.01"
    # Further per-class figures by name, each in class order (e.g. "p": each class's adjusted p-value); the scan
    # report carries them beside the scores, and its page shows them as columns.
    per_class: Mapping[str, tuple[float, ...]] = attrs.field(factory=dict)


class Scorer(Plugin):
    """Turns per-class evidence into anomaly scores, s_max, the predicted target and a verdict.

    A scorer with ``needs_reference`` also receives the evidence of the reference scan (the same
    detector run on the model's public backbone used as a zero-shot classifier, same classes, pool and
    seed; ``ci_core.scanning.reference``), one row per class in the same order; other scorers receive None.
    """

    needs_reference: ClassVar[bool] = False
    min_classes: ClassVar[int] = 2  # the fewest candidate classes it can score (checked before a scan starts)

    @classmethod
    def check_inputs(cls, *, classes: int | None = None, reference: bool) -> None:
        """The one check of what this scorer can score: a reference where it ``needs_reference``, and at least
        ``min_classes`` classes (``classes`` None: not known yet).  Raises ``ConfigError``.

        The scan calls it for every scorer before any work, ``apply_scorer`` before each reading, and a scorer's
        own ``score`` first of all (the contract asks a scorer called directly to refuse what it cannot score).
        """
        if cls.needs_reference and not reference:
            raise ConfigError(f"scorer {cls.name!r} needs the reference scan of the model's backbone, and there is none "
                              "(--no-reference skips it): drop --no-reference or choose the detector's own scorer")
        if classes is not None and classes < cls.min_classes:
            raise ConfigError(f"scorer {cls.name!r} needs at least {cls.min_classes} candidate classes, got {classes}"
                              + (" (--no-reference scores with the detector's own scorer)" if cls.needs_reference
                                 else ""))

    @abc.abstractmethod
    def score(self, evidence: Sequence[ClassEvidence], reference: Sequence[ClassEvidence] | None = None) -> Scores: ...


# --------------------------------------------------------------------------- repairers


class Repairer(Plugin):
    """Fine-tunes a model's prompt learner to remove a backdoor, using a reconstructed trigger."""

    # The bundle kinds it can repair (ci_core.models.bundle): a zero-shot model has no prompt learner.
    bundle_kinds: ClassVar[tuple[str, ...]] = (COCOOP,)
    # A control (the paper's Table 19: clean-only, random-delta, wrong-class-delta) shows what the same fine-tuning
    # does without the scan's trigger; ``ci-bench report`` checks every other repairer against each control.
    is_control: ClassVar[bool] = False

    @abc.abstractmethod
    def repair(self, *, model: PromptTunedCLIP, trigger: Trigger | None, target: str, clean: LabeledImages,
               seed: int, progress: Progress = silent) -> PromptTunedCLIP:
        """Return a new model; ``model`` itself is left unchanged."""


# --------------------------------------------------------------------------- datasets


class Dataset(abc.ABC):
    """A classification dataset that a plugin registers under ``name``.

    ``open(data_root)`` makes an instance; datasets that read files from disk set
    ``needs_data_root`` and find their folder under the root, the others ignore it.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    needs_data_root: ClassVar[bool] = False

    @classmethod
    def open(cls, data_root: str | Path | None = None) -> "Dataset":
        """An instance of this dataset; ``data_root`` is where datasets that need files find them."""
        return cls()

    @classmethod
    def present(cls, data_root: str | Path) -> bool:
        """Whether this dataset's folder is under ``data_root`` (always, for datasets that need no files)."""
        return True
    # (open_clip name, pretrained) that commands use on this dataset unless told otherwise.
    default_backbone: ClassVar[tuple[str, str]] = DEFAULT_REAL

    @property
    @abc.abstractmethod
    def classnames(self) -> tuple[str, ...]: ...

    @abc.abstractmethod
    def load(self, split: str, *, image_size: int, seed: int, shots: int | None = None,
             max_per_class: int | None = None, progress: Callable[[str], None] | None = None) -> LabeledImages:
        """Images of ``split``.

        ``shots`` samples that many per class by ``seed`` (the few-shot protocol); ``max_per_class``
        caps each class at that many images drawn independently of ``seed``, so an evaluation
        subset is the same for every run; both None take the whole split.  ``progress`` receives
        progress lines while images are read.
        """
