"""Where and how things run: devices, torch threads, seeding, wall time and progress lines.

Below both the library and the command line: the benchmark harness, the CLI
and the benchmarks/ scripts all take these from here, so that no library code
imports a CLI module.
"""

from __future__ import annotations

import contextlib
import random
import re
import sys
import time
from typing import Callable, Iterator

import attrs
import numpy as np
import torch

from ci_core.errors import ConfigError
from ci_core.models.backbone import TextEncoding
from ci_core.validators import printable

Progress = Callable[[str], None]


def silent(message: str) -> None:
    """A progress callback that prints nothing."""


class Stopwatch:
    """Wall time since it was made."""

    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


class StderrProgress:
    """Progress lines on stderr with the elapsed time (nothing when ``quiet``).

    Messages quote names from deliveries (classes, files, keys): each line is escaped with ``printable``, so
    that no escape sequence in them reaches the terminal and no line break forges another line.
    """

    def __init__(self, quiet: bool = False):
        self.clock = Stopwatch()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.clock.seconds:7.1f}s] {printable(message)}", file=sys.stderr, flush=True)


def resolve_device(name: str) -> str:
    """``auto`` (a GPU if there is one), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not match:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return name


@attrs.frozen(kw_only=True)
class Runtime:
    """Where the model runs and how its text encoder is run there."""

    device: str
    text_encoding: TextEncoding


def resolve_runtime(device: str, max_text_batch: int | None, bf16: bool) -> Runtime:
    resolved = resolve_device(device)
    if max_text_batch is not None and max_text_batch < 1:
        raise ConfigError(f"--max-text-batch must be at least 1, got {max_text_batch}")
    if bf16 and not resolved.startswith("cuda"):
        why = "this machine has no CUDA device" if not torch.cuda.is_available() else f"--device {device} is not a GPU"
        raise ConfigError(f"--bf16 (bfloat16 autocast) needs a CUDA device, but {why}; drop --bf16")
    return Runtime(device=resolved, text_encoding=TextEncoding(max_text_batch=max_text_batch, bf16=bf16))


def configure_threads() -> None:
    # The machines this runs on in CI have two cores; torch's default may oversubscribe.
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``threads`` torch threads (None: leave the setting alone)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
