"""Triggers: functions that stamp a batch of pixel-space images, and how they are saved.

Attacks return their ground-truth trigger as a ``Trigger``; detectors return the
trigger they reconstruct for each class as one too.  A trigger saves as
safetensors tensors plus a JSON description; its ``kind`` names the class that
loads it again, which a plugin registers like any other plugin class
(``register_triggers``; ``ci_core.plugins.load_trigger`` reads a saved one).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ci_core.errors import DataError
from ci_core.files import atomic_file, read_json_object, write_json_atomic


class Trigger(abc.ABC):
    """apply(images) -> images, all in pixel space [0, 1], shape (B, 3, H, W)."""

    kind: ClassVar[str]
    description: ClassVar[str] = ""

    @abc.abstractmethod
    def apply(self, images: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]: ...

    def params(self) -> dict:
        """JSON-serialisable parameters besides the tensors."""
        return {}

    @classmethod
    @abc.abstractmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], params: dict) -> "Trigger": ...

    def save(self, path: str | Path) -> None:
        """Write ``path`` (.safetensors) and its JSON sidecar ``path.json``."""
        path = Path(path)
        with atomic_file(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}, str(tmp))
        write_json_atomic(path.with_name(path.name + ".json"), {"kind": self.kind, "params": self.params()})


def read_saved_trigger(path: str | Path) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(kind, tensors, params) of a trigger saved by ``Trigger.save``; ``ci_core.plugins.load_trigger`` builds it."""
    path = Path(path)
    side = path.with_name(path.name + ".json")
    if not path.is_file() or not side.is_file():
        raise DataError(f"trigger {path} needs both {path.name} and {side.name}")
    desc = read_json_object(side, DataError, "a trigger description with its 'kind'")
    kind, params = desc.get("kind"), desc.get("params", {})
    if not isinstance(kind, str) or not isinstance(params, dict):
        raise DataError(f"{side}: expected a 'kind' string and a 'params' object")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc})") from exc
    return kind, tensors, params


class AdditiveTrigger(Trigger):
    """x' = clamp(x + delta, 0, 1): BadCLIP's trigger and CLIP-Inspector's reconstruction.

    ``epsilon``, when known, is the l-inf bound the trigger was made under (pixel units); it is saved
    with the trigger (a trigger saved without one loads with None).
    """

    kind = "additive"
    description = "x + delta, clamped: an l-inf bounded additive trigger"

    def __init__(self, delta: torch.Tensor, epsilon: float | None = None):
        if delta.dim() != 3 or delta.shape[0] != 3:
            raise ValueError(f"delta must have shape (3, H, W), got {tuple(delta.shape)}")
        if epsilon is not None and not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon!r}")
        self.delta = delta
        self.epsilon = None if epsilon is None else float(epsilon)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return (images + self.delta.to(images.device, images.dtype)).clamp(0, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta}

    def params(self) -> dict:
        return {} if self.epsilon is None else {"epsilon": self.epsilon}

    @property
    def linf(self) -> float:
        return float(self.delta.abs().max())

    @classmethod
    def from_saved(cls, tensors, params):
        epsilon = params.get("epsilon")
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and epsilon > 0):
            raise DataError(f"an additive trigger's epsilon must be a positive number, got {epsilon!r}")
        return cls(tensors["delta"], epsilon=epsilon)


class BlendTrigger(Trigger):
    """x' = (1 - alpha) x + alpha * pattern, with a (3, H, W) pattern in [0, 1]: Blended's trigger and the
    blend inversion's (``ci-blend``) reconstruction."""

    kind = "blend"
    description = "(1 - alpha) x + alpha pattern"

    def __init__(self, pattern: torch.Tensor, alpha: float):
        if pattern.dim() != 3 or pattern.shape[0] != 3:
            raise ValueError(f"pattern must have shape (3, H, W), got {tuple(pattern.shape)}")
        if pattern.min() < 0 or pattern.max() > 1:
            raise ValueError("pattern values must lie in [0, 1]")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        self.pattern = pattern
        self.alpha = float(alpha)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != self.pattern.shape[-2:]:
            raise ValueError(f"the blend pattern is {tuple(self.pattern.shape[-2:])} but the images are {tuple(images.shape[-2:])}")
        pattern = self.pattern.to(images.device, images.dtype)
        return (1 - self.alpha) * images + self.alpha * pattern

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern}

    def params(self) -> dict:
        return {"alpha": self.alpha}

    @classmethod
    def from_saved(cls, tensors, params):
        return cls(tensors["pattern"], params["alpha"])
