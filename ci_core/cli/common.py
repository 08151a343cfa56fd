"""What the command-line tools share: error handling, progress, devices, plugin options."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import click
import torch

from ci_core.data.coop import DATA_ROOT_ENV
from ci_core.data.datasets import Dataset
from ci_core.errors import CIError, ConfigError
from ci_core.plugins import registry


def report_errors(func):
    """Turn domain errors into a one-line message and exit status 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CIError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


class StderrProgress:
    """Progress lines on stderr with the elapsed time."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"[{time.perf_counter() - self.start:7.1f}s] {message}", err=True)


def data_root_option(func):
    """``--data-root DIR``, defaulting to the environment variable CI_DATA_ROOT."""
    return click.option(
        "--data-root", type=click.Path(file_okay=False, path_type=Path), envvar=DATA_ROOT_ENV, show_envvar=True,
        help="Folder holding the CoOp-layout datasets (imagenet/, caltech-101/, oxford_pets/, ...); "
             "needed by every dataset that is not built in.",
    )(func)


def open_dataset(name: str, data_root: Path | None) -> Dataset:
    """The registered dataset ``name``, reading its files under ``data_root`` if it has any."""
    return registry().get("dataset", name).open(data_root)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        return name
    raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def parse_options(pairs: tuple[str, ...], flag: str) -> dict:
    """KEY=VALUE pairs; VALUE is read as JSON when it parses (numbers, booleans), else as a string."""
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def configure_threads() -> None:
    # The machines this runs on in CI have two cores; torch's default may oversubscribe.
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))


def echo_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """A plain aligned table: columns are (key, header)."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
