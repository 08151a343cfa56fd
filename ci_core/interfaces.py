"""The four plugin interfaces: Attack, Detector, Scorer, Repairer, and the results they exchange.

Each implementation is a class with a short lowercase ``name`` and a frozen
attrs ``Config`` whose defaults are the method's published settings.  Results
are frozen attrs classes; ``to_json`` turns any of them into plain JSON
(tensors and triggers are written separately, never into JSON).
"""

from __future__ import annotations

import abc
import time
from typing import Any, Callable, ClassVar, Mapping, Sequence

import attrs
import torch

from ci_core.data.datasets import LabeledImages
from ci_core.errors import ConfigError
from ci_core.models.backbone import Backbone
from ci_core.models.bundle import COCOOP
from ci_core.models.cocoop import PromptTunedCLIP
from ci_core.models.zeroshot import CLIPClassifier
from ci_core.triggers import Trigger

Progress = Callable[[str], None]


def silent(message: str) -> None:
    """A progress callback that prints nothing."""


def make_config(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """Build a frozen attrs config from a mapping, rejecting unknown keys and bad values by name."""
    values = dict(values or {})
    fields = attrs.fields_dict(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; expected some of {sorted(fields)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


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


class Detector(Plugin):
    """Reconstructs, for one candidate class, a trigger that sends unrelated images to it."""

    default_scorer: ClassVar[str]

    @abc.abstractmethod
    def invert(self, *, model: CLIPClassifier, images: torch.Tensor, classnames: Sequence[str], target: int,
               generator: torch.Generator) -> Inversion:
        """Optimise a trigger on ``images`` (the inversion set D) towards ``classnames[target]``."""


@attrs.frozen(kw_only=True)
class ClassEvidence:
    """Per-class result of a scan: the inversion plus what the core measured on the held-out set T."""

    name: str
    asr: float
    loss: float
    statistic: float | None
    ssim: float
    seconds: float
    trigger: Trigger = attrs.field(metadata=NOT_JSON)


# --------------------------------------------------------------------------- scorers


@attrs.frozen(kw_only=True)
class Scores:
    """Per-class anomaly scores and the model-level decision."""

    scores: tuple[float, ...]
    s_max: float
    target: str
    backdoored: bool
    flagged: tuple[str, ...]  # classes whose own score passes the threshold


class Scorer(Plugin):
    """Turns per-class evidence into anomaly scores, s_max, the predicted target and a verdict."""

    @abc.abstractmethod
    def score(self, evidence: Sequence[ClassEvidence]) -> Scores: ...


# --------------------------------------------------------------------------- repairers


class Repairer(Plugin):
    """Fine-tunes a model's prompt learner to remove a backdoor, using a reconstructed trigger."""

    # The bundle kinds it can repair (ci_core.models.bundle): a zero-shot model has no prompt learner.
    bundle_kinds: ClassVar[tuple[str, ...]] = (COCOOP,)

    @abc.abstractmethod
    def repair(self, *, model: PromptTunedCLIP, trigger: Trigger | None, target: str, clean: LabeledImages,
               seed: int, progress: Progress = silent) -> PromptTunedCLIP:
        """Return a new model; ``model`` itself is left unchanged."""


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
