"""What the command-line tools share: error handling, progress, devices, plugin options."""

from __future__ import annotations

import functools
import json
import math
import signal
import threading
from pathlib import Path

import click

from ci_core.data.coop import DATA_ROOT_ENV
from ci_core.errors import CIError, ConfigError
from ci_core.validators import printable
from ci_core.models.backbone import TINY_MODEL
from ci_core.models.weights import BUILTIN
from ci_core.runtime import Runtime, StderrProgress, configure_threads, resolve_device, resolve_runtime  # noqa: F401


def _terminate(signum, frame):
    # SIGTERM as an exception, so that every `finally` and cleanup runs (temporary folders removed).
    raise SystemExit(128 + signum)


ISSUES_HINT = "this is a bug in clip-inspector: please report it with the command line that caused it"


def one_line(text: str, limit: int = 2000) -> str:
    """``text`` escaped (``printable``) and cut to ``limit`` characters: what a terminal is shown of any input."""
    text = printable(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def report_errors(func):
    """Turn errors into a one-line message and exit status 1 (no traceback); SIGTERM cleans up too.

    Domain errors (``CIError``) are the input's fault and say so.  Anything else is a bug met on some input:
    it still ends in one line with exit status 1 (never a traceback, which could print provider data raw),
    naming the exception and asking for a report.  Exits (click's usage errors, SystemExit, Ctrl-C) pass.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return func(*args, **kwargs)
        except CIError as exc:
            raise click.ClickException(one_line(str(exc))) from exc
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except MemoryError:
            raise click.ClickException("out of memory; the input asks for more memory than this machine has. "
                                       + ISSUES_HINT) from None
        except RecursionError:
            raise click.ClickException("an input nested too deeply to process; " + ISSUES_HINT) from None
        except Exception as exc:  # noqa: BLE001 - the last resort: see the docstring
            raise click.ClickException(f"unexpected {type(exc).__name__}: {one_line(str(exc), 300)}; "
                                       + ISSUES_HINT) from None

    return wrapper


def data_root_option(func):
    """``--data-root DIR``, defaulting to the environment variable CI_DATA_ROOT."""
    return click.option(
        "--data-root", type=click.Path(file_okay=False, path_type=Path), envvar=DATA_ROOT_ENV, show_envvar=True,
        help="Folder holding the CoOp-layout datasets (imagenet/, caltech-101/, oxford_pets/, ...); "
             "needed by every dataset that is not built in.",
    )(func)


def runtime_options(func):
    """``--device``, ``--max-text-batch`` and ``--bf16``: read back with ``resolve_runtime``."""
    func = click.option("--bf16", is_flag=True, help="Run the encoders under bfloat16 autocast (CUDA only).")(func)
    func = click.option("--max-text-batch", type=int, default=None, metavar="N",
                        help="(image, class) prompts per text-encoder chunk (default: sized to a memory budget, "
                             "a quarter of the free GPU memory or 2 GiB on a CPU).")(func)
    func = click.option("--device", default="auto", show_default=True,
                        help="auto (a GPU if there is one), cpu, cuda or cuda:N.")(func)
    return func


def backbone_options(default_help: str):
    """``--backbone NAME`` and ``--pretrained TAG|FILE|random:SEED``, both defaulting to None (``default_help``)."""

    def decorate(func):
        func = click.option("--pretrained", default=None, metavar="TAG|FILE|random:SEED",
                            help="The backbone's weights: an open_clip pretrained tag (downloaded and cached by "
                                 "open_clip), a local .safetensors file (or a torch state dict, read with "
                                 f"weights_only=True), or random:SEED. Default: {default_help}.")(func)
        func = click.option("--backbone", default=None, metavar="NAME",
                            help=f"An open_clip model name, e.g. ViT-B-16. Default: {default_help}.")(func)
        return func

    return decorate


def choose_backbone(name: str | None, pretrained: str | None, default: tuple[str, str]) -> tuple[str, str]:
    """(name, pretrained) from ``--backbone``/``--pretrained``, each falling back to ``default``.

    Another model than the default's needs its weights named: a tag of one model is no tag of another.
    """
    if name is None or name == default[0]:
        return default[0], pretrained or default[1]
    if pretrained is None:
        if name == TINY_MODEL:
            return name, BUILTIN
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"--backbone {name} needs --pretrained: "
                          + (f"one of its open_clip tags ({', '.join(tags)}), " if tags else "")
                          + "a weights file, or random:SEED")
    return name, pretrained


def _finite_json(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_json(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_json(v) for v in value)
    return True


def parse_options(pairs: tuple[str, ...], flag: str) -> dict:
    """KEY=VALUE pairs; VALUE is read as JSON when it parses (numbers, booleans), else as a string.

    JSON as Python reads it takes NaN, Infinity and 1e400 for floats: a value that is or holds a
    non-finite number is refused here, naming the option, before any plugin sees it.
    """
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE")
        # As the error shows it: one line, however the value was typed.
        shown = printable(f"{key}={raw[:40]}") + ("..." if len(raw) > 40 else "")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            raise ConfigError(f"{flag} {shown}: {exc}") from None
        if not _finite_json(value):
            raise ConfigError(f"{flag} {shown}: {shown.partition('=')[0]} must be a finite number (NaN and "
                              "infinities are never a setting)")
        options[key] = value
    return options


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
        return f"{value:.1e}" if 0 < abs(value) < 0.001 else f"{value:.3f}"  # a p-value of 2e-4 is not 0.000
    return str(value)
