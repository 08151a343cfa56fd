"""Hostile inputs against ci-scan, ci-repair, ci-bench and ci-import: how many does the toolkit handle cleanly?

    python benchmarks/hostile_inputs.py [--groups 1,2,3,4,5,6,7,8] [--cases TEXT,...] [--json FILE] [--before FILE]

A catalogue of bad inputs in the seven groups of issue 17 ("fail closed against hostile models and
inputs"), each run through the real command line (click's CliRunner, in this process):

1. evasion by NaN or infinity in a model's weights or outputs (ci-scan must say "unscannable", status 4);
2. output folders (--out and --json that are other people's folders, files, links or the inputs);
3. images (too large, too elongated, corrupt, of another format, or merely unusual) in OOD and class folders;
4. bundle metadata (types, ranges, class lists, templates, backbones and weights a bundle names, tensors);
5. paths that lead out of the folder given (class names, delivery checkpoints, bundle files, split files);
6. the benchmark store (``ci-bench run`` and ``report`` over cells that were corrupted after they were written);
7. command-line values (NaN, infinities, out-of-range numbers, bad choices, each named by its option);
8. issue 22: deliveries with two readings (zip names that differ in case, ``module.`` twins, several
   checkpoints, non-ASCII epochs), class lists that hide a class, pickles that ask for unbounded work or
   memory, inputs that raised tracebacks, and escape sequences printed to the terminal.

Each outcome is classified as
* ``handled``: a one-line error (``Error: ...``, exit status 1 or 2) that names the option, field or file
  at fault, or the correct result (a verdict, a pool that counts the skipped file, a recomputed cell);
* ``traceback``: any other exception;
* ``silent wrong result``: a result where an error, or another result, was due;
* ``unclear error``: status 1 or 2 without a one-line message naming what was wrong;
* ``unbounded time`` / ``unbounded memory``: over the case's time limit; a MemoryError, a failed
  allocation, or resident memory growing by more than 1.5 GiB;
* ``data loss``: a file outside --out (an input, the user's own) changed or removed;
* ``crash``: the process killed by a signal (group 8 runs such inputs in a child process);
* ``terminal injection``: an escape sequence or a forged line from the input printed raw;
* ``read outside the folder``: a file outside the folders given opened or listed (an audit hook and the
  files' access times tell), or a network connection attempted.

The cases run on the tiny CLIP with random weights, pools of 2 + 2 images and 2 candidate classes, so the
whole catalogue takes a few minutes on two cores.  It is a measurement, not a test (the suite's hostile
tests are tests/test_hostile_*.py).  To measure the code as it was at an earlier commit, run this script
against an export of it and compare::

    git archive COMMIT | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before python benchmarks/hostile_inputs.py --json before.json
    python benchmarks/hostile_inputs.py --json after.json --before before.json

The process limits its own address space (RLIMIT_AS, 4 GiB over what it holds at the start), so that a
case that would allocate terabytes fails there instead of taking the machine.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

import attrs
import click
import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["red circle", "blue square", "green star", "pink ring"]
GROUPS = {1: "evasion by NaN/Inf", 2: "output folders", 3: "images", 4: "bundle metadata",
          5: "paths outside the folder", 6: "benchmark store", 7: "CLI values",
          8: "one reading, class lists, bounded work"}
MEMORY_GROWTH = 1.5 * 2**30
HANDLED = "handled"


# --------------------------------------------------------------------------- what a case is


@attrs.define
class Run:
    """One command line and what a clean outcome of it is."""

    command: str  # scan, repair, bench, import
    args: list
    # error: a one-line error naming one of ``names``; unscannable: status 4 (or a clean error), never 0 or 3;
    # verdict: status 0, 3 or 4 (``check`` may look closer), an error being a refused valid input;
    # any: a clean error naming one of ``names``, or a success that ``check`` accepts
    expect: str = "error"
    names: tuple = ()
    secrets: tuple = ()  # files and folders the run must never open or list
    keep: tuple = ()  # files and folders whose contents must come through unchanged
    check: Callable | None = None  # (result, run) -> a failure label, or None when the result is right
    cwd: Path | None = None
    time_limit: float = 90.0
    # In a child process (python -m ci_core.cli.<command>): for inputs that may kill the process (a segfault)
    # or allocate without bound; its peak memory is measured there.
    isolated: bool = False


@attrs.define
class Case:
    group: int
    name: str
    prepare: Callable[[Path], Run]


@attrs.define
class Outcome:
    group: int
    name: str
    label: str
    detail: str
    seconds: float


# --------------------------------------------------------------------------- watching a run


class Audit:
    """Every file opened or folder listed under a secret path, and every connection, while a case runs."""

    active = False
    secrets: tuple[str, ...] = ()
    opened: list[str] = []
    network: list[str] = []

    @classmethod
    def hook(cls, event, args):
        if not cls.active:
            return
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if any(path == s or path.startswith(s + os.sep) for s in cls.secrets):
                cls.opened.append(path)
        elif event == "socket.connect":
            cls.network.append(str(args[1])[:80])


sys.addaudithook(Audit.hook)


class CaseTimeout(BaseException):
    """Raised by SIGALRM in the main thread: not an Exception, so that no `except Exception` swallows it."""


def _alarm(signum, frame):
    raise CaseTimeout()


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryWatch:
    """The largest resident memory seen while a case runs (sampled every 20 ms)."""

    def __init__(self):
        self.base = _rss()
        self.peak = self.base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, _rss()) - self.base


def _fingerprint(paths) -> dict[str, str]:
    found = {}
    for root in paths:
        root = Path(root)
        if root.is_dir() and not root.is_symlink():
            files = sorted(p for p in root.rglob("*") if p.is_file())
        else:
            files = [root] if root.exists() else []
        for path in files:
            try:
                data = path.read_bytes() if path.stat().st_size < 64 * 2**20 else str(path.stat().st_size).encode()
            except OSError:
                data = b"<unreadable>"
            found[str(path)] = hashlib.sha256(data).hexdigest()
        if not root.exists() and not root.is_symlink():
            found[str(root)] = "<missing>"
    return found


def _stamp_secrets(secrets, scratch: Path) -> dict[str, float]:
    """Set the access time of every secret file and folder to 1970, so that any read of it shows (relatime).

    Only the case's own files: a system file named as a secret (/etc/passwd) is watched by the audit hook alone.
    """
    stamped = {}
    for root in secrets:
        root = Path(root)
        if not root.exists() or not root.resolve().is_relative_to(scratch.resolve()):
            continue
        for path in [root, *(root.rglob("*") if root.is_dir() else [])]:
            with contextlib.suppress(OSError):
                os.utime(path, (1, path.stat().st_mtime), follow_symlinks=True)
                stamped[str(path)] = 1
    return stamped


def _secrets_read(stamped) -> list[str]:
    return [path for path in stamped if os.stat(path).st_atime != 1]


def _commands():
    from ci_core.cli.bench import main as bench
    from ci_core.cli.import_checkpoint import main as ci_import
    from ci_core.cli.repair import main as repair
    from ci_core.cli.scan import main as scan

    return {"scan": scan, "repair": repair, "bench": bench, "import": ci_import}


def execute(case: Case, work: Path) -> Outcome:
    """Prepare, run and classify one case in its own folder ``work``."""
    start = time.perf_counter()
    try:
        run = case.prepare(work)
    except Exception as exc:  # noqa: BLE001 - a case that cannot be set up is reported, not raised
        return Outcome(case.group, case.name, "setup failed", f"{type(exc).__name__}: {exc}"[:200], 0.0)
    kept = _fingerprint(run.keep)
    stamped = _stamp_secrets(run.secrets, work)
    Audit.secrets = tuple(os.path.realpath(s) for s in run.secrets)
    Audit.opened, Audit.network = [], []
    watch = MemoryWatch()
    previous = os.getcwd()
    timed_out = False
    result = None
    signal.signal(signal.SIGALRM, _alarm)
    begin = time.perf_counter()
    try:
        if run.cwd is not None:
            os.chdir(run.cwd)
        Audit.active = True
        if run.isolated:
            result, timed_out, child_growth = run_isolated(run)
        else:
            signal.alarm(max(1, int(math.ceil(run.time_limit))))
            result = CliRunner().invoke(_commands()[run.command], [str(a) for a in run.args])
    except CaseTimeout:
        timed_out = True
    finally:
        signal.alarm(0)
        Audit.active = False
        os.chdir(previous)
    elapsed = time.perf_counter() - begin
    growth = watch.stop()
    if run.isolated:
        growth = child_growth
    label, detail = classify(run, result, elapsed=elapsed, timed_out=timed_out, growth=growth,
                             read=sorted(set(Audit.opened) | set(_secrets_read(stamped))), network=Audit.network,
                             changed=[k for k, v in _fingerprint(run.keep).items() if kept.get(k) != v]
                             + [k for k in kept if k not in _fingerprint(run.keep)])
    return Outcome(case.group, case.name, label, detail, time.perf_counter() - start)


_MODULES = {"scan": "scan", "repair": "repair", "bench": "bench", "import": "import_checkpoint"}
# Runs the command as `python -m` would, then reports its peak memory (atexit runs on click's SystemExit too).
_CHILD = """import atexit, resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), resource.RLIM_INFINITY))
atexit.register(lambda: sys.stderr.write(f"\\nCHILD-MAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n"))
sys.path.insert(0, sys.argv[2])  # the code the parent measures, not whatever the working folder holds
module = sys.argv[3]
sys.argv = [module] + sys.argv[4:]
runpy.run_module(module, run_name="__main__")
"""
# What importing torch and the toolkit takes in a child: memory beyond it is the input's.
_CHILD_BASE = 1.0 * 2**30


@attrs.define
class ChildResult:
    """A child process's outcome, shaped like click's Result for ``classify``."""

    exit_code: int
    output: str
    exception: BaseException | None = None


def run_isolated(run: Run) -> tuple[ChildResult | None, bool, int]:
    """(result, timed out, memory growth) of ``run`` in a child process, under a 6 GiB address-space limit."""
    import subprocess

    import ci_core

    module = f"ci_core.cli.{_MODULES[run.command]}"
    code = str(Path(ci_core.__file__).resolve().parent.parent)
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(6 * 2**30), code, module, *map(str, run.args)],
                              capture_output=True, text=True, errors="replace", timeout=run.time_limit)
    except subprocess.TimeoutExpired:
        return None, True, 0
    output = done.stdout + done.stderr
    peak = [int(line.split()[1]) * 1024 for line in output.splitlines() if line.startswith("CHILD-MAXRSS ")]
    output = "\n".join(line for line in output.splitlines() if not line.startswith("CHILD-MAXRSS "))
    status = done.returncode if done.returncode >= 0 else 128 - done.returncode  # a signal death, as a shell shows it
    return ChildResult(status, output), False, int(max(0, (peak[0] if peak else 0) - _CHILD_BASE))


def _error_line(output: str) -> str | None:
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    return lines[0] if len(lines) == 1 else None


def _is_memory(exc: BaseException | None) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "alloc" in text or "out of memory" in text or "Cannot allocate" in text


def classify(run: Run, result, *, elapsed, timed_out, growth, read, network, changed) -> tuple[str, str]:
    if timed_out or elapsed > run.time_limit:
        return "unbounded time", f"{elapsed:.0f} s, over the {run.time_limit:.0f} s limit"
    exception = result.exception if result is not None else None
    if _is_memory(exception) or growth > MEMORY_GROWTH:
        return "unbounded memory", f"{type(exception).__name__ if exception else 'ran'}; memory grew {growth / 2**30:.1f} GiB"
    if read or network:
        return "read outside the folder", ", ".join((read + network)[:2])
    if changed:
        return "data loss", ", ".join(changed[:2])
    if exception is not None and not isinstance(exception, SystemExit):
        return "traceback", f"{type(exception).__name__}: {str(exception)[:120]}"
    status = result.exit_code
    output = result.output
    if status > 128:
        return "crash", f"killed by signal {status - 128} (exit status {status}), no message"
    if "MemoryError" in output or "Cannot allocate" in output:
        return "unbounded memory", (output.strip().splitlines() or ["MemoryError"])[-1][:120]
    if "Traceback" in output:
        return "traceback", output.strip().splitlines()[-1][:120]
    if status in (1, 2):
        line = _error_line(output)
        if run.expect == "verdict":
            return "silent wrong result", f"refused a valid input: {(line or output.strip())[:140]}"
        if line is None or len(line) < 12:
            return "unclear error", (output.strip().splitlines() or ["(no output)"])[-1][:140]
        if len(line) > 5000:  # an input (a key, a name) printed whole
            return "unclear error", f"a message of {len(line)} characters: {line[:100]}..."
        if run.names and not any(str(n) in line for n in run.names):
            return "unclear error", f"does not name {run.names[0]!r}: {line[:120]}"
        return HANDLED, line[:140]
    if status not in (0, 3, 4):
        return "traceback", f"exit status {status}"
    if run.expect == "error":
        return "silent wrong result", f"exit status {status}, expected an error naming {run.names[:1]}"
    if run.expect == "unscannable" and status != 4:
        return "silent wrong result", f"exit status {status} ({'clean' if status == 0 else 'backdoored'}), not unscannable"
    if run.check is not None:
        problem = run.check(result, run)
        if problem:
            return "silent wrong result", problem
    return HANDLED, f"exit status {status}"


# --------------------------------------------------------------------------- building inputs


_BACKBONE = {}


def backbone():
    if "tiny" not in _BACKBONE:
        from ci_core.models.backbone import load_backbone

        _BACKBONE["tiny"] = load_backbone("ci-tiny-clip", "random:0")
    return _BACKBONE["tiny"]


def make_bundle(path: Path, kind: str = "cocoop", classes=CLASSES, base=None, edit_model=None) -> Path:
    from ci_core.models.bundle import save_bundle
    from ci_core.models.cocoop import PromptTunedCLIP

    torch.manual_seed(0)
    if kind == "cocoop":
        model = PromptTunedCLIP(backbone())
    elif kind in ("coop", "coop-specific"):
        from ci_core.models.coop import CoOpCLIP

        model = CoOpCLIP(backbone(), n_ctx=4, ctx_classes=classes if kind == "coop-specific" else None)
    else:
        from ci_core.models.zeroshot import ZeroShotCLIP

        model = ZeroShotCLIP(backbone())
    if edit_model is not None:
        with torch.no_grad():
            edit_model(model)
    return save_bundle(model, list(classes), path, base_classes=list(base) if base else None)


def edit_meta(bundle: Path, change) -> Path:
    meta = json.loads((bundle / "bundle.json").read_text())
    change(meta)
    (bundle / "bundle.json").write_text(json.dumps(meta))
    return bundle


def touch(path: Path, text: str = "the user's own file\n") -> Path:
    path.write_text(text)
    return path


def class_file(path: Path, names=CLASSES[:2]) -> Path:
    path.write_text("\n".join(names) + "\n")
    return path


def FORCE() -> list:
    """--force where ci-repair has it: the repair cases' scans find the random-weight model clean, and a repair of a
    model found clean is refused unless forced (issue 25), which would end every case before its bad input."""
    return ["--force"] if any("--force" in p.opts for p in _commands()["repair"].params) else []


def scan_supports(option: str) -> bool:
    return any(option in p.opts for p in _commands()["scan"].params)


def scan_args(bundle: Path, work: Path, *, classes=True, extra=(), reference=False) -> list:
    """ci-scan on the tiny world's pool, 2 + 2 images, 2 candidate classes; no reference scan (where there is one)
    unless ``reference``, as a plain ``ci-scan`` runs it."""
    args = [bundle, "--ood", "builtin", "--pool-size", 2, "--holdout", 2, "--out", work / "out", "--quiet", *extra]
    if classes:
        args += ["--classes", class_file(work / "classes.txt")]
    if not reference and scan_supports("--no-reference"):
        args.append("--no-reference")
    return args


def report_of(run: Run) -> dict | None:
    out = Path(run.args[run.args.index("--out") + 1])
    path = out / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def png_header(width: int, height: int) -> bytes:
    """A PNG that is its signature and header only: it says how large it is and holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def good_images(folder: Path, count: int, size=(40, 30)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    paths = []
    for i in range(count):
        path = folder / f"good{i}.png"
        Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- group 1: NaN and infinity


def group1() -> list[Case]:
    def nan_case(name, kind, edit):
        def prepare(work):
            bundle = make_bundle(work / "bundle", kind, edit_model=edit)
            # As ci-scan runs by default: with the reference scan of the backbone, against which a collapse shows
            # (its scorer takes at least 4 classes: all of them).
            return Run("scan", scan_args(bundle, work, classes=False, reference=True), expect="unscannable",
                       names=("bundle", "weights", "NaN"))
        return Case(1, name, prepare)

    def set_value(attribute, value, where=None):
        def edit(model):
            tensor = model.get_parameter(attribute) if attribute in dict(model.named_parameters()) else model.get_buffer(attribute)
            if where is None:
                tensor.fill_(value)
            else:
                tensor.view(-1)[where] = value
        return edit

    cases = []
    for value, label in ((math.nan, "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf")):
        cases += [
            nan_case(f"cocoop ctx[0,0] = {label}", "cocoop", set_value("prompt_learner.ctx", value, 0)),
            nan_case(f"cocoop meta_net.linear1.weight[0] = {label}", "cocoop",
                     set_value("prompt_learner.meta_net.linear1.weight", value, 0)),
            nan_case(f"cocoop meta_net.linear2.bias = {label}", "cocoop",
                     set_value("prompt_learner.meta_net.linear2.bias", value)),
            nan_case(f"coop shared ctx[1,3] = {label}", "coop", set_value("prompt_learner.ctx", value, 67)),
            nan_case(f"coop class-specific ctx of one class = {label}", "coop-specific",
                     set_value("prompt_learner.ctx", value, 5)),
            nan_case(f"zero-shot visual conv1 weight[0] = {label}", "zeroshot", set_value("clip.visual.conv1.weight", value, 0)),
        ]
    cases += [
        nan_case("cocoop ctx all NaN", "cocoop", set_value("prompt_learner.ctx", math.nan)),
        nan_case("cocoop ctx = 3e38 (overflows in the text encoder)", "cocoop", set_value("prompt_learner.ctx", 3e38)),
        nan_case("cocoop meta_net.linear2.weight = 1e30", "cocoop", set_value("prompt_learner.meta_net.linear2.weight", 1e30)),
        nan_case("coop ctx = -3e38", "coop", set_value("prompt_learner.ctx", -3e38)),
        nan_case("zero-shot BatchNorm running_var = -1 (sqrt of a negative)", "zeroshot",
                 set_value("clip.visual.bn1.running_var", -1.0)),
        nan_case("zero-shot BatchNorm running_mean = +Inf", "zeroshot", set_value("clip.visual.bn1.running_mean", math.inf)),
        nan_case("zero-shot final projection = 1e38", "zeroshot", set_value("clip.visual.attnpool.c_proj.weight", 1e38)),
    ]
    return cases


# --------------------------------------------------------------------------- group 2: output folders


def group2() -> list[Case]:
    def scan_out(name, make_out, expect="error", names=("--out",)):
        def prepare(work):
            bundle = make_bundle(work / "bundle")
            out, keep = make_out(work, bundle)
            args = scan_args(bundle, work)
            args[args.index("--out") + 1] = out
            return Run("scan", args, expect=expect, names=names, keep=(bundle, *keep), cwd=work)
        return Case(2, name, prepare)

    def precious(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "thesis.txt").write_text("years of work\n")
        return folder

    def earlier_scan(work, bundle):
        first = CliRunner().invoke(_commands()["scan"], [str(a) for a in scan_args(bundle, work)])
        assert (work / "out" / "report.json").is_file(), first.output
        return work / "out", ()

    def linked(work, bundle):
        target = precious(work / "target")
        os.symlink(target, work / "link")
        return work / "link", (target,)

    cases = [
        scan_out("--out is the user's folder", lambda w, b: (precious(w / "mine"), (w / "mine",))),
        scan_out("--out is a file", lambda w, b: (touch(w / "notes.txt"), (w / "notes.txt",))),
        scan_out("--out is a link to the user's folder", linked),
        scan_out("--out is the bundle", lambda w, b: (b, ())),
        scan_out("--out is the folder holding the bundle", lambda w, b: (w, ())),
        scan_out("--out is '.' (the folder holding the bundle)", lambda w, b: (Path("."), ())),
        scan_out("--out is an OOD image folder", lambda w, b: (good_images(w / "ood", 3)[0].parent, (w / "ood",))),
        scan_out("--out is a new nested folder", lambda w, b: (w / "a" / "b" / "c", ()), expect="verdict"),
        scan_out("--out is an earlier scan of this tool", earlier_scan, expect="verdict"),
    ]

    def other(name, command, make_args, names=("--out",)):
        def prepare(work):
            args, keep = make_args(work)
            return Run(command, args, names=names, keep=keep)
        return Case(2, name, prepare)

    def repair_args(work, out=None, json_path=None):
        bundle = make_bundle(work / "bundle", base=CLASSES[:2])
        first = CliRunner().invoke(_commands()["scan"], [str(a) for a in scan_args(bundle, work)])
        assert (work / "out" / "report.json").is_file(), first.output
        args = [bundle, "--report", work / "out", "--data", "builtin", "--out", out or work / "repaired", "--shots", 1,
                "--test-images", 1, "--option", "epochs=1", "--quiet", *FORCE()]
        if json_path is not None:
            args += ["--json", json_path]
        return args, bundle

    def repair_into(target):
        def make(work):
            args, bundle = repair_args(work, out=target(work))
            return args, (bundle, work / "out")
        return make

    def repair_json(work):
        args, bundle = repair_args(work, json_path=work / "bundle" / "bundle.json")
        return args, (bundle, work / "out")

    cases += [
        other("ci-repair --out is the user's folder", "repair", repair_into(lambda w: precious(w / "mine"))),
        other("ci-repair --out is the bundle", "repair", repair_into(lambda w: w / "bundle")),
        other("ci-repair --json is the input bundle's bundle.json", "repair", repair_json, names=("--json",)),
        other("ci-bench attack --out is the user's folder", "bench",
              lambda w: (["attack", "clean", "--dataset", "tiny-palette", "--out", precious(w / "mine"), "--quiet"],
                         (w / "mine",))),
        other("ci-bench run --out is the user's folder", "bench",
              lambda w: (["run", "--out", precious(w / "mine"), "--attacks", "clean", "--detectors", "ci",
                          "--datasets", "tiny-palette", "--seeds", "1", "--quiet"], (w / "mine",))),
        other("ci-bench run --out is a file", "bench",
              lambda w: (["run", "--out", touch(w / "f.txt"), "--attacks", "clean",
                          "--datasets", "tiny-palette", "--seeds", "1", "--quiet"], (w / "f.txt",))),
        other("ci-bench demo --out is the user's folder", "bench",
              lambda w: (["demo", "--out", precious(w / "mine"), "--quiet"], (w / "mine",))),
        other("ci-import --out is an existing bundle", "import",
              lambda w: ([touch(w / "model.pth.tar-1"), "--classes", class_file(w / "c.txt"), "--out",
                          make_bundle(w / "bundle")], (w / "bundle", w / "model.pth.tar-1")), names=("--out",)),
    ]
    return cases


# --------------------------------------------------------------------------- group 3: images


def _pool_order(folder: Path, seed: int) -> list[Path]:
    """The order ci_core.data.ood.load_folder reads a folder's images in for ``seed`` (the same rule)."""
    suffixes = {".jpg", ".jpeg", ".png", ".webp"}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    random.Random(seed).shuffle(files)
    return files


def _seed_reading_first(folder: Path, bad: list[Path]) -> int:
    """A --seed whose shuffle reads every bad file before the pool (4 images) is full."""
    for seed in range(1000):
        order = _pool_order(folder, seed)
        goods = [i for i, p in enumerate(order) if p not in bad]
        if all(order.index(b) < goods[3] for b in bad if b in order):
            return seed
    raise AssertionError("no seed reads the bad files first")


def group3(baseline: float) -> list[Case]:
    decode_limit = baseline * 1.5 + 6  # a scan, plus the few seconds any legitimate image takes

    def ood_case(name, write_bad, expect="skipped", time_limit=None):
        def prepare(work):
            folder = work / "ood"
            good_images(folder, 4)
            bad = [p for p in write_bad(folder) if p is not None]
            seed = _seed_reading_first(folder, [p for p in bad if p.is_file()])
            args = [p for p in scan_args(work / "bundle", work) if p != "builtin"]
            args.insert(args.index("--ood") + 1, folder)
            args += ["--seed", seed]
            make_bundle(work / "bundle")

            def check(result, run):
                report = report_of(run)
                if report is None:
                    return "no report.json"
                skipped = report["pool"].get("skipped_unreadable", 0)
                if expect == "skipped" and skipped < 1:
                    return "the bad image was read as an image"
                if expect == "read" and skipped:
                    return f"a valid image was skipped ({report['pool'].get('skipped_files')})"
                return None

            return Run("scan", args, expect="verdict", check=check, names=("ood",),
                       time_limit=time_limit or decode_limit)
        return Case(3, name, prepare)

    def save(name, image, **kwargs):
        def write(folder):
            path = folder / name
            image().save(path, **kwargs)
            return [path]
        return write

    def raw(name, data):
        def write(folder):
            path = folder / name
            path.write_bytes(data() if callable(data) else data)
            return [path]
        return write

    def truncated(name, fmt):
        def write(folder):
            buffer = io.BytesIO()
            Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format=fmt)
            path = folder / name
            path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            return [path]
        return write

    def gray16():
        return Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16))

    def animated(name, fmt):
        def write(folder):
            frames = [Image.new("RGB", (20, 20), (i * 60, 0, 0)) for i in range(3)]
            path = folder / name
            frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
            return [path]
        return write

    def zip_bomb_text(folder):
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("comment", "A" * 30_000_000, zip=True)  # 30 MB of text, compressed to a few kB
        path = folder / "bomb_text.png"
        Image.new("RGB", (8, 8)).save(path, pnginfo=info)
        return [path]

    def special(kind):
        def write(folder):
            path = folder / f"special_{kind}.png"
            if kind == "fifo":
                os.mkfifo(path)
            elif kind == "loop":
                os.symlink(path, path)
            elif kind == "dir":
                path.mkdir()
                good_images(path, 1)
            return []
        return write

    cases = [
        ood_case("1 x 1,000,000 PNG (valid, under PIL's bomb limit)", save("tall.png", lambda: Image.new("L", (1, 1_000_000), 7))),
        ood_case("13000 x 13000 PNG (169 megapixels)", save("huge.png", lambda: Image.new("L", (13000, 13000), 3)),
                 time_limit=decode_limit),
        ood_case("13000 x 13000 PNG header, no pixels", raw("huge_header.png", png_header(13000, 13000))),
        ood_case("20000 x 20000 PNG header (PIL's bomb error)", raw("bomb.png", png_header(20000, 20000))),
        ood_case("3000 x 100 PNG (30:1)", save("strip.png", lambda: Image.new("RGB", (3000, 100), (1, 2, 3)))),
        ood_case("0-byte .jpg", raw("empty.jpg", b"")),
        ood_case("text file named .png", raw("notes.png", b"just some text\n")),
        ood_case("random bytes named .webp", raw("noise.webp", lambda: np.random.default_rng(2).bytes(5000))),
        ood_case("truncated JPEG", truncated("cut.jpg", "JPEG")),
        ood_case("truncated PNG", truncated("cut.png", "PNG")),
        ood_case("truncated WebP", truncated("cut.webp", "WEBP")),
        ood_case("PNG with a wrong CRC", raw("crc.png", lambda: png_header(8, 8)[:-8] + b"\0\0\0\0" + png_header(8, 8)[-8:])),
        ood_case("BMP named .png", save("bitmap.png", lambda: Image.new("RGB", (8, 8)), format="BMP")),
        ood_case("GIF named .jpg", save("anim.jpg", lambda: Image.new("P", (8, 8)), format="GIF")),
        ood_case("TIFF named .jpeg", save("scan.jpeg", lambda: Image.new("RGB", (8, 8)), format="TIFF")),
        ood_case("EPS (PostScript, run by Ghostscript) named .png",
                 raw("photo.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")),
        ood_case("PNG with 30 MB of compressed text", zip_bomb_text),
        ood_case("0 x 0 PNG header", raw("zero.png", png_header(0, 0))),
        ood_case("FIFO named .png (would block a read)", special("fifo"), expect="read"),
        ood_case("symlink loop named .png", special("loop"), expect="read"),
        ood_case("folder named .png", special("dir"), expect="read"),
        ood_case("16-bit grayscale PNG (valid)", save("gray16.png", gray16), expect="read"),
        ood_case("CMYK JPEG (valid)", save("cmyk.jpg", lambda: Image.new("CMYK", (30, 20), (0, 50, 100, 0))), expect="read"),
        ood_case("palette PNG with transparency (valid)",
                 save("pal.png", lambda: Image.new("P", (30, 20), 3), transparency=3), expect="read"),
        ood_case("grayscale + alpha PNG (valid)", save("la.png", lambda: Image.new("LA", (30, 20), (9, 100))), expect="read"),
        ood_case("1 x 1 PNG (valid)", save("dot.png", lambda: Image.new("RGB", (1, 1), (5, 5, 5))), expect="read"),
        ood_case("animated PNG (valid, first frame)", animated("anim.png", "PNG"), expect="read"),
        ood_case("animated WebP (valid, first frame)", animated("anim.webp", "WEBP"), expect="read"),
        ood_case("upper-case .JPG suffix (valid)", save("UPPER.JPG", lambda: Image.new("RGB", (30, 20), (1, 9, 1)),
                                                       format="JPEG"), expect="read"),
        ood_case("3000 x 150 PNG (20:1, valid)", save("wide.png", lambda: Image.new("RGB", (3000, 150), (4, 4, 4))),
                 expect="read"),
    ]

    def repair_case(name, write_bad):
        def prepare(work):
            bundle = make_bundle(work / "bundle", base=CLASSES[:2])
            first = CliRunner().invoke(_commands()["scan"], [str(a) for a in scan_args(bundle, work)])
            assert (work / "out" / "report.json").is_file(), first.output
            good_images(work / "data" / "train" / "red_circle", 3)
            good_images(work / "data" / "train" / "blue_square", 2)
            for class_name in CLASSES:
                good_images(work / "data" / "test" / class_name.replace(" ", "_"), 1)
            bad = write_bad(work / "data" / "train" / "blue_square")  # its 3rd file: --shots 3 reads them all
            return Run("repair", [bundle, "--report", work / "out", "--data", work / "data", "--out", work / "repaired",
                                  "--shots", 3, "--test-images", 1, "--option", "epochs=1", "--quiet", *FORCE()],
                       names=(bad[0].name,), time_limit=decode_limit + 20)
        return Case(3, name, prepare)

    cases += [
        repair_case("ci-repair class folder: 1 x 1,000,000 PNG", save("tall.png", lambda: Image.new("L", (1, 1_000_000), 7))),
        repair_case("ci-repair class folder: 13000 x 13000 PNG header", raw("huge.png", png_header(13000, 13000))),
        repair_case("ci-repair class folder: corrupt PNG", raw("bad.png", b"\x89PNG\r\n\x1a\nrubbish")),
    ]

    def own_case(name, write_bad):
        """ci-scan --own-images OWN with a bad image in one of OWN's class subfolders, read first by --seed: skipped
        and counted in the own scan's pool, the scan goes on."""
        def prepare(work):
            folder = work / "own"
            for class_name in CLASSES:
                good_images(folder / class_name, 2)
            bad = [p for p in write_bad(folder / CLASSES[0]) if p is not None]
            seed = _seed_reading_first(folder, [p for p in bad if p.is_file()])
            args = scan_args(make_bundle(work / "bundle"), work, classes=False, reference=True,
                             extra=[*own_options(folder), "--seed", seed])

            def check(result, run):
                own = work / "out" / "own" / "report.json"
                if not own.is_file():
                    return "no own/report.json"
                if json.loads(own.read_text())["pool"].get("skipped_unreadable", 0) < 1:
                    return "the bad image was read as an image"
                return None

            return Run("scan", args, expect="verdict", check=check, names=("own",), time_limit=decode_limit * 3 + 30)
        return Case(3, name, prepare)

    if scan_supports("--own-images"):
        cases += [
            own_case("--own-images class folder: 20000 x 20000 PNG header", raw("bomb.png", png_header(20000, 20000))),
            own_case("--own-images class folder: truncated JPEG", truncated("cut.jpg", "JPEG")),
            own_case("--own-images class folder: text file named .png", raw("notes.png", b"just some text\n")),
        ]
    return cases


def own_options(folder: Path) -> list:
    """ci-scan's second scan on the auditor's own images in ``folder``, 2 + 2 of them."""
    return ["--own-images", folder, "--own-pool-size", 2, "--own-holdout", 2]


# --------------------------------------------------------------------------- group 4: bundle metadata


def group4(baseline: float) -> list[Case]:
    def meta_case(name, change, expect="error", names=("bundle.json",), kind="cocoop", secrets_of=None, time_limit=None,
                  classes=True, raw=None, in_bundle=False):
        def prepare(work):
            bundle = make_bundle(work / "bundle", kind, base=CLASSES[:2] if kind == "cocoop" else None)
            if raw is not None:
                raw(bundle)
            else:
                edit_meta(bundle, change)
            secrets = secrets_of(work) if secrets_of else ()
            args = scan_args(bundle, work, classes=classes)
            if in_bundle:  # the auditor runs the scan from inside the delivered folder
                args = [a.resolve() if isinstance(a, Path) else a for a in args]
            return Run("scan", args, expect=expect, names=names, secrets=secrets,
                       time_limit=time_limit or baseline * 2 + 20, cwd=bundle if in_bundle else None)
        return Case(4, name, prepare)

    def setk(key, value):
        return lambda m: m.update({key: value})

    def names(new):
        return lambda m: m.update(classnames=new, base_classes=None)

    def secret_weights(work):
        secret = work / "secret"
        secret.mkdir()
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in backbone().model.state_dict().items()}, str(secret / "weights.safetensors"))
        return (secret,)

    def pretrained(source):
        return lambda m: m["backbone"].update(pretrained=source)

    def huge_file(size):
        def write(bundle):
            with open(bundle / "bundle.json", "w") as handle:
                handle.write('{"format": "clip-inspector-bundle", "padding": "')
                block = "a" * 2**20
                for _ in range(size // 2**20):
                    handle.write(block)
                handle.write('"}')
        return write

    def deep(bundle):
        (bundle / "bundle.json").write_text("[" * 200_000 + "]" * 200_000)

    def vit_bigg(m):
        m["backbone"].update(name="ViT-bigG-14", pretrained="random:0")

    cases = [
        meta_case("n_ctx 'abc'", setk("n_ctx", "abc"), names=("n_ctx",)),
        meta_case("n_ctx null", setk("n_ctx", None), names=("n_ctx",)),
        meta_case("n_ctx NaN", setk("n_ctx", math.nan), names=("n_ctx",)),
        meta_case("n_ctx 1e10 (a 2.56 TB allocation)", setk("n_ctx", 10**10), names=("n_ctx",)),
        meta_case("n_ctx 16 (the whole context)", setk("n_ctx", 16), names=("n_ctx",)),
        meta_case("n_ctx 13 (prompts collapse)", setk("n_ctx", 13), names=("n_ctx", "classnames")),
        meta_case("n_ctx 4.9", setk("n_ctx", 4.9), names=("n_ctx",)),
        meta_case("n_ctx 0", setk("n_ctx", 0), names=("n_ctx",)),
        meta_case("n_ctx -4", setk("n_ctx", -4), names=("n_ctx",)),
        meta_case("n_ctx true", setk("n_ctx", True), names=("n_ctx",)),
        meta_case("n_ctx '4'", setk("n_ctx", "4"), names=("n_ctx",)),
        meta_case("100,000 classes", names([f"class {i}" for i in range(100_000)]), classes=False,
                  names=("classnames",), time_limit=baseline + 30),
        meta_case("no classes", names([]), classes=False, names=("classnames",)),
        meta_case("one class", names(["red circle"]), classes=False, names=("classnames", "class")),
        meta_case("duplicate classes", names(["red circle", "red circle", "pink ring"]), classes=False, names=("classnames",)),
        meta_case("'red_circle' and 'red circle' (one prompt)", names(["red_circle", "red circle", "pink ring"]),
                  classes=False, names=("red_circle", "red circle")),
        meta_case("'Red Circle' and 'red circle' (one prompt)", names(["Red Circle", "red circle", "pink ring"]),
                  classes=False, names=("Red Circle", "red circle")),
        meta_case("a class name with a newline", names(["red\ncircle", "pink ring"]), classes=False, names=("classnames",)),
        meta_case("a blank class name", names(["  ", "pink ring"]), classes=False, names=("classnames",)),
        meta_case("a class name too long for the context", names(["a very long name " * 4, "pink ring"]), classes=False,
                  names=("classnames",)),
        meta_case("a class name that is a number", names([7, "pink ring"]), classes=False, names=("classnames",)),
        meta_case("base classes not among the classes", setk("base_classes", ["purple moon"]), names=("base_classes",)),
        meta_case("template '{0}'", setk("template", "a photo of a {0}."), names=("template",)),
        meta_case("template '{.__class__}'", setk("template", "a {.__class__.__mro__} {}"), names=("template",)),
        meta_case("template '{}{}'", setk("template", "{} {}"), names=("template",)),
        meta_case("template without '{}'", setk("template", "a photo"), names=("template",)),
        meta_case("zero-shot template '{0}'", setk("template", "a photo of a {0}."), kind="zeroshot", names=("template",)),
        meta_case("zero-shot template too long for the context", setk("template", "a " * 30 + "{}"), kind="zeroshot",
                  names=("template",)),
        meta_case("backbone.pretrained /etc/passwd", pretrained("/etc/passwd"), names=("/etc/passwd", "pretrained"),
                  secrets_of=lambda w: ("/etc/passwd",)),
        meta_case("backbone.pretrained a weights file outside the bundle (the right weights)",
                  pretrained("../secret/weights.safetensors"), names=("pretrained", "weights"), secrets_of=secret_weights,
                  in_bundle=True),
        meta_case("backbone.pretrained an absolute weights file (the right weights)", lambda m: None,
                  raw=lambda b: edit_meta(b, pretrained(str((b.parent / "secret" / "weights.safetensors").resolve()))),
                  names=("pretrained", "weights"), secrets_of=secret_weights),
        meta_case("backbone.pretrained a URL", pretrained("https://example.invalid/w.safetensors"), names=("pretrained",)),
        meta_case("backbone.pretrained a hub repository", pretrained("hf-hub:someone/clip"), names=("pretrained",)),
        meta_case("backbone.pretrained random:1e30", pretrained("random:99999999999999999999999999999"),
                  names=("random",)),
        meta_case("backbone ViT-B-16 'openai', not in the cache (a download)",
                  lambda m: m["backbone"].update(name="ViT-B-16", pretrained="openai"), names=("ViT-B-16",)),
        meta_case("backbone ViT-bigG-14 random:0 (10 GB before any check)", vit_bigg, names=("ViT-bigG-14",),
                  time_limit=baseline * 2 + 40),
        meta_case("backbone EVA02-B-16 (another text tower)", lambda m: m["backbone"].update(name="EVA02-B-16"),
                  names=("EVA02-B-16",)),
        meta_case("backbone ViT-B-16-SigLIP (a hub tokenizer)", lambda m: m["backbone"].update(name="ViT-B-16-SigLIP"),
                  names=("ViT-B-16-SigLIP",)),
        meta_case("backbone name unknown", lambda m: m["backbone"].update(name="ViT-Q-99"), names=("ViT-Q-99",)),
        meta_case("backbone name a number", lambda m: m["backbone"].update(name=5), names=("backbone",)),
        meta_case("weights_sha256 not a hash", lambda m: m["backbone"].update(weights_sha256="abc"), names=("sha256",)),
        meta_case("quick_gelu 'yes'", lambda m: m["backbone"].update(quick_gelu="yes"), names=("quick_gelu",)),
        meta_case("image.size 224 on a 96-pixel backbone", lambda m: m["image"].update(size=224), names=("image",)),
        meta_case("image.mean NaN", lambda m: m["image"].update(mean=[math.nan, 0.4, 0.4]), names=("image",)),
        meta_case("image.std 0", lambda m: m["image"].update(std=[0, 0.3, 0.3]), names=("image",)),
        meta_case("image.std not the backbone's", lambda m: m["image"].update(std=[0.5, 0.5, 0.5]), names=("image",)),
        meta_case("tensors: a shape of 10^10 rows", lambda m: m["tensors"].update({"prompt_learner.ctx": [10**10, 64]}),
                  names=("tensors", "prompt_learner.ctx")),
        meta_case("kind 'lora'", setk("kind", "lora"), names=("kind",)),
        meta_case("kind a list", setk("kind", ["cocoop"]), names=("kind",)),
        meta_case("version 2", setk("version", 2), names=("version",)),
        meta_case("format another tool's", setk("format", "not-a-bundle"), names=("format",)),
        meta_case("no template", lambda m: m.pop("template"), names=("template",)),
        meta_case("coop class_token_position 'left'", setk("class_token_position", "left"), kind="coop",
                  names=("class_token_position",)),
        meta_case("coop class_specific 'yes'", setk("class_specific", "yes"), kind="coop", names=("class_specific",)),
        meta_case("zero-shot image_encoder without a hash", setk("image_encoder", {}), kind="zeroshot",
                  names=("image_encoder",)),
        meta_case("bundle.json of 300 MB", None, raw=huge_file(300 * 2**20), names=("bundle.json",)),
        meta_case("bundle.json nested 200,000 deep", None, raw=deep, names=("bundle.json",)),
        meta_case("bundle.json not UTF-8", None, raw=lambda b: (b / "bundle.json").write_bytes(b"\xff\xfe{}"),
                  names=("bundle.json",)),
        meta_case("bundle.json an array", None, raw=lambda b: (b / "bundle.json").write_text("[1, 2]"),
                  names=("bundle.json",)),
        meta_case("weights: a tensor header of 100,000 x 100,000", None, raw=_huge_header, names=("weights",)),
        meta_case("weights: an int32 context", None, raw=_int_tensor, names=("prompt_learner.ctx",)),
        meta_case("weights: an extra tensor", None, raw=_extra_tensor, names=("evil",)),
        meta_case("a bundle written before kinds and quick_gelu (valid)", _older, expect="verdict"),
        meta_case("a bundle with a key from a later version (valid)", setk("written_later", {"x": [1]}), expect="verdict"),
    ]
    return cases


def _huge_header(bundle: Path) -> None:
    header = json.dumps({"prompt_learner.ctx": {"dtype": "F32", "shape": [100_000, 100_000],
                                                 "data_offsets": [0, 40_000_000_000]}}).encode()
    (bundle / "weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))


def _int_tensor(bundle: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bundle / "weights.safetensors"))
    tensors["prompt_learner.ctx"] = torch.zeros(tensors["prompt_learner.ctx"].shape, dtype=torch.int32)
    save_file(tensors, str(bundle / "weights.safetensors"))


def _extra_tensor(bundle: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bundle / "weights.safetensors"))
    tensors["evil"] = torch.zeros(3)
    save_file(tensors, str(bundle / "weights.safetensors"))


def _older(meta: dict) -> None:
    meta.pop("kind", None)
    meta["backbone"].pop("quick_gelu", None)
    meta.pop("ctx_init", None)


# --------------------------------------------------------------------------- group 5: paths outside the folder


def _secret_images(work: Path, name: str = "secret") -> Path:
    secret = work / name
    good_images(secret, 3)
    return secret


def group5(baseline: float) -> list[Case]:
    def repair_case(name, hostile, setup_data=None, time_limit=None, shots=1):
        """ci-repair --data DIR on a bundle whose first base class is ``hostile`` (short: the tiny CLIP's context
        holds 16 tokens), the images of the others in DIR, and images outside DIR in ``work/s``."""
        def prepare(work):
            secret = _secret_images(work, "s")
            name_of_class = hostile
            classes = [name_of_class, "b", "green star", "pink ring"]
            bundle = make_bundle(work / "bundle", classes=classes, base=classes[:2])
            first = CliRunner().invoke(_commands()["scan"], [str(a) for a in
                                                             scan_args(bundle, work, classes=False)])
            assert (work / "out" / "report.json").is_file(), first.output
            data = work / "data"
            for split, names in (("train", classes[:2]), ("test", classes)):
                for class_name in names[1:]:  # the hostile one is set up below, if at all
                    good_images(data / split / class_name.replace(" ", "_"), 2)
            if setup_data is not None:
                setup_data(work, data, secret)
            return Run("repair", [bundle, "--report", work / "out", "--data", data, "--out", work / "repaired",
                                  "--shots", shots, "--test-images", 1, "--option", "epochs=1", "--quiet",
                                  *FORCE()],
                       names=("class", "link", "outside", name_of_class[:10]), secrets=(secret,),
                       time_limit=time_limit or baseline * 3 + 60)
        return Case(5, name, prepare)

    def link_class(work, data, secret):
        for split in ("train", "test"):
            (data / split).mkdir(parents=True, exist_ok=True)
            os.symlink(secret, data / split / "linked")

    def link_image(work, data, secret):
        for split in ("train", "test"):
            folder = data / split / "linked"
            good_images(folder, 1)
            os.symlink(secret / "good0.png", folder / "zz_secret.png")

    cases = [
        repair_case("ci-repair: class '../../s'", "../../s"),
        repair_case("ci-repair: class 'b/../../../s'", "b/../../../s"),
        repair_case("ci-repair: class '.._.._s' (underscores for spaces)", ".._.._s"),
        repair_case("ci-repair: class '/tmp' (an absolute path)", "/tmp", time_limit=baseline + 30),
        repair_case("ci-repair: class '/' (the whole file system)", "/", time_limit=baseline + 30),
        repair_case("ci-repair: class '..' (DIR itself)", ".."),
        repair_case("ci-repair: class folder is a link out of --data", "linked", setup_data=link_class),
        repair_case("ci-repair: an image is a link out of --data", "linked", setup_data=link_image, shots=2),
    ]

    def own_case(name, arrange, expect="error", names=("own-images",)):
        """ci-scan --own-images OWN (one subfolder of images per class of CLASSES) arranged to lead out of OWN,
        with images in work/s that must never be read."""
        def prepare(work):
            secret = _secret_images(work, "s")
            folder = work / "own"
            for class_name in CLASSES:
                good_images(folder / class_name.replace(" ", "_"), 2)
            classes = arrange(work, folder, secret)
            bundle = make_bundle(work / "bundle", classes=classes)

            def check(result, run):  # the own scan covers the folder's classes, nothing the bundle's names reach
                own = work / "out" / "own" / "report.json"
                names_scanned = [c["name"] for c in json.loads(own.read_text())["classes"]] if own.is_file() else None
                return None if names_scanned == CLASSES else f"own scan of {names_scanned}"

            return Run("scan", scan_args(bundle, work, classes=False, reference=True, extra=own_options(folder)),
                       expect=expect, names=names, secrets=(secret,), check=check if expect == "verdict" else None,
                       time_limit=baseline * 3 + 60)
        return Case(5, name, prepare)

    def link_own_class(work, folder, secret):
        os.symlink(secret, folder / "cyan_cross")
        return [*CLASSES, "cyan cross"]

    def loose_image(work, folder, secret):
        good_images(folder, 1)
        return CLASSES

    if scan_supports("--own-images"):
        cases += [
            own_case("--own-images: the bundle's class '../s' (a folder beside OWN)",
                     lambda work, folder, secret: [*CLASSES, "../s"], expect="verdict"),
            own_case("--own-images: the bundle's class '..'", lambda work, folder, secret: [*CLASSES, ".."],
                     expect="verdict"),
            own_case("--own-images: a class subfolder is a link out of OWN", link_own_class, names=("link",)),
            own_case("--own-images: a subfolder naming no class",
                     lambda work, folder, secret: ((folder / "dog").mkdir(), CLASSES)[1], names=("dog",)),
            own_case("--own-images: an image outside the class subfolders", loose_image, names=("good0.png",)),
        ]

    def delivery_case(name, arrange, command="scan", names=("outside", "checkpoint", "model.pth"), expect="error"):
        def prepare(work):
            output, secrets = arrange(work)
            classes = class_file(work / "classes.txt", CLASSES)
            if command == "scan":
                args = [output, "--classes", classes, "--backbone", "ci-tiny-clip", "--pretrained", "random:0",
                        "--ood", "builtin", "--pool-size", 2, "--holdout", 2, "--out", work / "out", "--quiet"]
                if scan_supports("--no-reference"):
                    args.append("--no-reference")
            else:
                args = [output, "--classes", classes, "--backbone", "ci-tiny-clip", "--pretrained", "random:0",
                        "--out", work / "imported", "--quiet"]
            return Run(command, args, expect=expect, names=names, secrets=secrets, time_limit=baseline * 2 + 30)
        return Case(5, name, prepare)

    def dassl(work, epoch=2):
        sys.path.insert(0, str(ROOT / "tests"))
        from delivery_layout import cocoop_state, save_dassl
        from ci_core.models.cocoop import PromptTunedCLIP

        torch.manual_seed(1)
        model = PromptTunedCLIP(backbone(), ctx_init=None)
        output = work / "OUTPUT"
        save_dassl(output, "prompt_learner", cocoop_state(model, CLASSES[:2]), epoch=epoch, learner=model.prompt_learner)
        return output, model

    def secret_checkpoint(work):
        secret = work / "secret"
        secret.mkdir()
        other, _ = dassl(work / "other", epoch=9)
        shutil.copy(other / "prompt_learner" / "model.pth.tar-9", secret / "model.pth.tar-9")
        return secret

    def named_outside(work):
        output, _ = dassl(work)
        secret = secret_checkpoint(work)
        (output / "prompt_learner" / "checkpoint").write_text("../../secret/model.pth.tar-9\n")
        return output, (secret,)

    def named_absolute(work):
        output, _ = dassl(work)
        secret = secret_checkpoint(work)
        (output / "prompt_learner" / "checkpoint").write_text(str(secret / "model.pth.tar-9") + "\n")
        return output, (secret,)

    def linked_epoch(work):
        output, _ = dassl(work)
        secret = secret_checkpoint(work)
        os.symlink(secret / "model.pth.tar-9", output / "prompt_learner" / "model.pth.tar-99")
        (output / "prompt_learner" / "checkpoint").unlink()
        return output, (secret,)

    def linked_latest(work):
        output, _ = dassl(work)
        (output / "prompt_learner" / "checkpoint").unlink()
        os.symlink("/etc/passwd", output / "prompt_learner" / "checkpoint")
        return output, ("/etc/passwd",)

    def linked_learner(work):
        output, _ = dassl(work)
        secret = secret_checkpoint(work)
        shutil.rmtree(output / "prompt_learner")
        os.symlink(secret, output / "prompt_learner")
        return output, (secret,)

    def long_epoch(work):
        output, _ = dassl(work)  # (no file can have such a name: the checkpoint file names it)
        (output / "prompt_learner" / "checkpoint").write_text("model.pth.tar-" + "9" * 5000 + "\n")
        return output, ()

    def zero_stride(work):
        sys.path.insert(0, str(ROOT / "tests"))
        from delivery_layout import cocoop_state, save_dassl
        from ci_core.models.cocoop import PromptTunedCLIP

        model = PromptTunedCLIP(backbone(), ctx_init=None)
        state = cocoop_state(model, CLASSES[:2])
        state["token_suffix"] = torch.zeros(1).expand(200_000, 100_000, 64)  # 1 element claiming 5 TB
        output = work / "OUTPUT"
        save_dassl(output, "prompt_learner", state, learner=model.prompt_learner)
        return output, ()

    cases += [
        # The latest checkpoint of the folder is the right one to read: a verdict, without a look at the other.
        delivery_case("delivery: checkpoint file names ../../secret/model.pth.tar-9", named_outside, expect="verdict"),
        delivery_case("delivery: checkpoint file names an absolute path", named_absolute, expect="verdict"),
        delivery_case("delivery: model.pth.tar-99 is a link out of the folder", linked_epoch),
        # Dassl's `checkpoint` file only resumes training; CoCoOp's evaluation never reads it, nor does the scan.
        delivery_case("delivery: the checkpoint file is a link to /etc/passwd", linked_latest, expect="verdict"),
        delivery_case("delivery: prompt_learner/ is a link out of the folder", linked_learner),
        delivery_case("ci-import: model.pth.tar-99 is a link out of the folder", linked_epoch, command="import"),
        delivery_case("delivery: checkpoint file names an epoch of 5,000 digits", long_epoch, expect="verdict"),
        delivery_case("delivery: a zero-stride tensor claiming 5 TB", zero_stride, names=("token_suffix",)),
    ]

    def bundle_link(name, file):
        def prepare(work):
            bundle = make_bundle(work / "bundle")
            secret = work / "secret"
            secret.mkdir()
            shutil.move(bundle / file, secret / file)
            os.symlink(secret / file, bundle / file)
            return Run("scan", scan_args(bundle, work), names=(file,), secrets=(secret,))
        return Case(5, name, prepare)

    cases += [
        bundle_link("bundle.json is a link out of the bundle", "bundle.json"),
        bundle_link("weights.safetensors is a link out of the bundle", "weights.safetensors"),
    ]

    def split_case(name, relative):
        def prepare(work):
            secret = _secret_images(work)
            root = work / "root" / "oxford_pets"
            (root / "images").mkdir(parents=True)
            items = {"train": [], "val": [], "test": []}
            for label, class_name in enumerate(["abyssinian", "beagle", "boxer", "pug"]):
                for split in items:
                    path = root / "images" / f"{class_name}_{split}.png"
                    Image.new("RGB", (30, 30), (label * 50, 10, 10)).save(path)
                    items[split].append([path.name, label, class_name])
            items["train"][0][0] = relative(work)
            (root / "split_zhou_OxfordPets.json").write_text(json.dumps(items))
            return Run("bench", ["attack", "clean", "--dataset", "oxford-pets", "--data-root", work / "root",
                                 "--backbone", "ci-tiny-clip", "--pretrained", "builtin", "--shots", 1,
                                 "--test-per-class", 1, "--option", "epochs=1", "--out", work / "attack", "--quiet"],
                       names=("split_zhou_OxfordPets.json", "secret"), secrets=(secret,),
                       time_limit=baseline * 3 + 60)
        return Case(5, name, prepare)

    cases += [
        split_case("CoOp split file names ../../../secret/good0.png", lambda w: "../../../secret/good0.png"),
        split_case("CoOp split file names an absolute path", lambda w: str((w / "secret" / "good0.png").resolve())),
    ]
    return cases


# --------------------------------------------------------------------------- group 6: the benchmark store


def _fake_plugin_source() -> str:
    """The instant fake attack, detector and dataset of tests/test_bench.py (FAKE_BENCH_PLUGIN), read, not imported."""
    tree = ast.parse((ROOT / "tests" / "test_bench.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "FAKE_BENCH_PLUGIN" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("tests/test_bench.py defines no FAKE_BENCH_PLUGIN")


def install_fake_plugins(site: Path) -> None:
    """Install the fake plugins as a distribution on sys.path (as tests/test_plugins.activate_fake_distribution)."""
    name = "fake_bench_plugin"
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{name}.py").write_text(_fake_plugin_source())
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[clip_inspector]\n{name} = {name}\n")
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    from ci_core.plugins import registry

    registry.cache_clear()


FAKE_SWEEP = ["--attacks", "clean,fake-backdoor", "--detectors", "fake-detector", "--datasets", "fake-shapes",
              "--seeds", "1", "--shots", "1", "--attack-option", "clean.epochs=1", "--pool-sizes", "4",
              "--holdout", "4", "--threads", "1", "--quiet"]


def group6(scratch: Path) -> list[Case]:
    install_fake_plugins(scratch / "site")
    pristine = scratch / "pristine-store"
    first = CliRunner().invoke(_commands()["bench"], ["run", "--out", str(pristine), *FAKE_SWEEP])
    if first.exit_code != 0:
        raise RuntimeError(f"the fake sweep failed: {first.output[-400:]}")
    reference_report = CliRunner().invoke(_commands()["bench"], ["report", str(pristine)]).output

    def cells(store: Path, kind: str) -> list[Path]:
        folder = store / kind
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def store_case(name, corrupt, command="run", names=()):
        def prepare(work):
            store = Path(shutil.copytree(pristine, work / "store", symlinks=True))
            target = corrupt(store, work)
            corrupted = _fingerprint([target]) if target is not None else None

            def check(result, run):
                said = any(word in result.output.lower() for word in ("corrupt", "recomput", "moved", "does not match"))
                if command == "report":
                    same = result.output.replace(str(store), "STORE") == reference_report.replace(str(pristine), "STORE")
                    return None if same or said else "the report changed without a word about the corrupt cell"
                if target is None:
                    return None
                if _fingerprint([target]) == corrupted:
                    return f"{target.relative_to(store)} is still the corrupted file"
                return None if said else "the corrupt cell was recomputed without a word"

            # Not --quiet: whether the run reports the corrupt cell is part of the outcome.
            args = ["run", "--out", store, *[a for a in FAKE_SWEEP if a != "--quiet"]] if command == "run" \
                else ["report", store]
            return Run("bench", args, expect="any", check=check, names=names or ("corrupt", "cell", "store"),
                       keep=(pristine,))
        return Case(6, name, prepare)

    def truncate(kind, relative):
        def corrupt(store, work):
            path = cells(store, kind)[-1] / relative
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            return path
        return corrupt

    def flip(kind, relative):
        def corrupt(store, work):
            path = cells(store, kind)[-1] / relative
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
            return path
        return corrupt

    def delete(kind, relative):
        def corrupt(store, work):
            path = cells(store, kind)[-1] / relative
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            return path
        return corrupt

    def edit_json(kind, relative, change):
        def corrupt(store, work):
            path = cells(store, kind)[-1] / relative
            data = json.loads(path.read_text())
            change(data)
            path.write_text(json.dumps(data))
            return path
        return corrupt

    def replace_text(kind, relative, text):
        def corrupt(store, work):
            path = cells(store, kind)[-1] / relative
            path.write_text(text)
            return path
        return corrupt

    def nan_everywhere(data):
        def walk(value):
            if isinstance(value, dict):
                return {k: walk(v) for k, v in value.items()}
            if isinstance(value, list):
                return [walk(v) for v in value]
            return math.nan if isinstance(value, float) else value
        data.update(walk(data))

    def set_first_number(data):
        for key, value in data.items():
            if isinstance(value, float):
                data[key] = 0.987654
                return
            if isinstance(value, dict):
                set_first_number(value)
                return

    cases = [
        store_case("model cell: weights truncated", truncate("models", "bundle/weights.safetensors")),
        store_case("model cell: one byte of the weights flipped", flip("models", "bundle/weights.safetensors")),
        store_case("model cell: bundle.json deleted", delete("models", "bundle/bundle.json")),
        store_case("model cell: metrics edited in cell.json", edit_json("models", "cell.json", set_first_number)),
        store_case("model cell: cell.json not JSON", replace_text("models", "cell.json", "{not json")),
        store_case("model cell: cell.json nested 200,000 deep", replace_text("models", "cell.json", "[" * 200_000 + "]" * 200_000)),
        store_case("model cell: trigger deleted", delete("models", "trigger.safetensors")),
        store_case("scan cell: report.json all NaN", edit_json("scans", "scan/report.json", nan_everywhere)),
        store_case("scan cell: verdict edited in cell.json", edit_json("scans", "cell.json", set_first_number)),
        store_case("scan cell: report.json deleted", delete("scans", "scan/report.json")),
        store_case("scan cell: a trigger file truncated", lambda s, w: _truncate_any(cells(s, "scans")[-1] / "scan" / "triggers")),
        store_case("reference cell: reference.json edited", edit_json("references", "reference.json", set_first_number)),
        store_case("reference cell: reference.json not JSON", replace_text("references", "reference.json", "][")),
        store_case("a cell folder replaced by a file", lambda s, w: _cell_to_file(cells(s, "scans")[-1])),
        store_case("a stray folder among the model cells", lambda s, w: (s / "models" / "not-a-key").mkdir() or None),
        store_case("store.json of another version", lambda s, w: (s / "store.json").write_text(
            json.dumps({"format": "ci-bench-store", "version": 99})) and None, names=("store.json", "version")),
        store_case("report: model cell metrics edited", edit_json("models", "cell.json", set_first_number), command="report"),
        store_case("report: scan report.json all NaN", edit_json("scans", "scan/report.json", nan_everywhere),
                   command="report"),
    ]
    return cases


def _truncate_any(folder: Path) -> Path:
    path = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")[0]
    path.write_bytes(path.read_bytes()[:40])
    return path


def _cell_to_file(cell: Path) -> None:
    shutil.rmtree(cell)
    cell.write_text("not a cell")
    return None


# --------------------------------------------------------------------------- group 7: CLI values


def group7() -> list[Case]:
    def value_case(command, extra, names, base=None):
        def prepare(work):
            if command == "scan":
                args = scan_args(make_bundle(work / "bundle"), work) + list(extra)
            elif command == "repair":
                bundle = make_bundle(work / "bundle", base=CLASSES[:2])
                args = [bundle, "--report", work / "no-report", "--data", "builtin", "--out", work / "repaired",
                        "--quiet", *extra]
            elif command == "attack":
                args = ["attack", "clean", "--dataset", "tiny-palette", "--out", work / "attack", "--quiet", *extra]
                command_name = "bench"
                return Run(command_name, args, names=names, time_limit=120)
            elif command == "run":
                args = ["run", "--out", work / "store", "--attacks", "clean", "--detectors", "ci", "--datasets",
                        "tiny-palette", "--seeds", "1", "--dry-run", "--quiet", *extra]
                return Run("bench", args, names=names, time_limit=120)
            else:
                args = list(base or []) + list(extra)
            return Run(command, args, names=names, time_limit=120)
        label = f"{'ci-' + command if command in ('scan', 'repair') else 'ci-bench ' + command} {' '.join(map(str, extra))}"
        return Case(7, label, prepare)

    cases = []
    for raw in ("NaN", "Infinity", "-Infinity", "1e400", "abc", "-1", "0", "null", "[2]"):
        cases.append(value_case("scan", ["--scorer-option", f"k={raw}"], ("k",)))
    for key, raw in (("epsilon", "Infinity"), ("epsilon", "NaN"), ("epsilon", "-0.1"), ("epsilon", "2"),
                     ("epsilon", "abc"), ("lr", "-Infinity"), ("lr", "0"), ("batch_size", "0"), ("batch_size", "2.5"),
                     ("batch_size", "true"), ("epochs", "-3"), ("epochs", "1e9999"), ("loss", "hinge"), ("loss", "3")):
        cases.append(value_case("scan", ["--option", f"{key}={raw}"], (key,)))
    for flag, raw in (("--seed", "1e23"), ("--seed", "-1"), ("--seed", "99999999999999999999999"),
                      ("--pool-size", "0"), ("--pool-size", "-4"), ("--pool-size", "1000000000"), ("--holdout", "abc"),
                      ("--holdout", "1000000000"), ("--max-text-batch", "0"),
                      ("--device", "tpu"), ("--device", "cuda:99")):
        cases.append(value_case("scan", [flag, raw], (flag,)))
    for extra, names in ((["--seed", "1e23"], ("--seed",)), (["--seed", "99999999999999999999999"], ("--seed",)),
                         (["--test-images", "0"], ("--test-images",)), (["--shots", "0"], ("--shots",)),
                         (["--shots", "-2"], ("--shots",)), (["--option", "epochs=-3"], ("epochs",)),
                         (["--option", "lr=NaN"], ("lr",)), (["--option", "epochs=abc"], ("epochs",)),
                         (["--option", "momentum=Infinity"], ("momentum",))):
        cases.append(value_case("repair", extra, names))
    for extra, names in ((["--option", "epochs=-3"], ("epochs",)), (["--option", "lr=NaN"], ("lr",)),
                         (["--option", "n_ctx=5"], ("n_ctx",)), (["--option", "batch_size=2.5"], ("batch_size",)),
                         (["--seed", "1e23"], ("--seed",)), (["--seed", "99999999999999999999999"], ("--seed",)),
                         (["--shots", "0"], ("--shots",)), (["--test-per-class", "0"], ("--test-per-class",))):
        cases.append(value_case("attack", extra, names))
    for extra, names in ((["--seeds", "1e23"], ("--seeds",)), (["--pool-sizes", "0"], ("--pool-sizes",)),
                         (["--holdout", "-1"], ("--holdout",)), (["--shots", "0"], ("--shots",)),
                         (["--scorer-option", "ci.k=NaN"], ("k",)), (["--detector-option", "ci.epsilon=Infinity"],
                                                                    ("epsilon",))):
        cases.append(value_case("run", extra, names))
    cases += prior_cases()
    return cases


def prior_cases() -> list[Case]:
    """ci-scan --variance-prior with books that are not one: each named by file, before any work."""
    good = {"variance": 0.001, "df": 12.0, "models": 5, "model_keys": ["a", "b", "c", "d", "e"], "setting": {}}
    books = {"missing": None, "not JSON": "{", "another kind": {"kind": "scan-report", "version": 1, "priors": []},
             "NaN variance": {"kind": "variance-prior", "version": 1, "priors": [{**good, "variance": "NaN"}]},
             "negative df": {"kind": "variance-prior", "version": 1, "priors": [{**good, "df": -3}]},
             "models and keys disagree": {"kind": "variance-prior", "version": 1, "priors": [{**good, "models": 9}]}}

    def case(label, content):
        def prepare(work):
            book = work / "prior.json"
            if content is not None:
                book.write_text(content if isinstance(content, str) else json.dumps(content).replace('"NaN"', "NaN"))
            args = scan_args(make_bundle(work / "bundle"), work, reference=True, extra=("--variance-prior", book))
            return Run("scan", args, names=("prior.json",), time_limit=120)
        return Case(7, f"ci-scan --variance-prior: {label}", prepare)

    return [case(label, content) for label, content in books.items()] if scan_supports("--variance-prior") else []


# --------------------------------------------------------------------------- group 8: one reading, class lists, work


def _dassl_output(work: Path, seed: int = 1, epoch: int = 2, state_edit=None) -> Path:
    """A Dassl output folder of a CoCoOp learner on the tiny CLIP trained on CLASSES[:2] (weights from ``seed``)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from delivery_layout import cocoop_state, save_dassl
    from ci_core.models.cocoop import PromptTunedCLIP

    torch.manual_seed(seed)
    model = PromptTunedCLIP(backbone(), ctx_init=None)
    with torch.no_grad():
        model.prompt_learner.ctx.add_(0.1 * torch.randn_like(model.prompt_learner.ctx))
    state = cocoop_state(model, CLASSES[:2])
    if state_edit is not None:
        state = state_edit(state)
    save_dassl(work, "prompt_learner", state, epoch=epoch, learner=model.prompt_learner)
    return work


def _zip_entries(path: Path) -> list[tuple[str, bytes]]:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _write_zip(path: Path, entries) -> Path:
    import warnings
    import zipfile

    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        warnings.simplefilter("ignore")  # duplicate names are the point
        for name, data in entries:
            archive.writestr(name, data)
    return path


def _crafted(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A checkpoint file that is a torch zip archive around a hand-made data.pkl."""
    entries = [("archive/data.pkl", data_pkl), ("archive/byteorder", b"little")]
    entries += [(f"archive/data/{k}", v) for k, v in (storages or {}).items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_zip(path, entries)


def _u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _no_escapes(result, run) -> str | None:
    if "\x1b" in result.output or "\x07" in result.output:
        return "terminal injection: an escape sequence from the delivery printed raw"
    if any(line.lstrip().startswith("verdict") for line in result.output.splitlines()):
        return "terminal injection: a line forged by the delivery"
    return None


def _read_file(name: str):
    def check(result, run) -> str | None:
        report = report_of(run)
        read = (report or {}).get("bundle", {}).get("checkpoint", "")
        return None if read.endswith(name) else f"read {Path(read).name or 'nothing'}, not {name}"
    return check


def group8(baseline: float) -> list[Case]:
    limit = baseline * 2 + 30

    def delivery(name, arrange, *, command="scan", expect="error", names=(), classes=CLASSES, extra=(), check=None,
                 isolated=False, time_limit=None):
        def prepare(work):
            target = arrange(work)
            listed = classes(work) if callable(classes) else class_file(work / "classes.txt", classes)
            common = [target, "--classes", listed, "--backbone", "ci-tiny-clip", "--pretrained", "random:0", *extra]
            if command == "scan":
                args = common + ["--ood", "builtin", "--pool-size", 2, "--holdout", 2, "--out", work / "out", "--quiet"]
                if scan_supports("--no-reference"):
                    args.append("--no-reference")
            else:
                args = common + ["--out", work / "imported"]
            return Run(command, args, expect=expect, names=names, check=check, isolated=isolated,
                       time_limit=time_limit or limit)
        return Case(8, name, prepare)

    # ---- two readings of one delivery (each made a backdoored delivery scan clean)
    def case_twin_pickle(work):
        clean = _dassl_output(work / "A", seed=1) / "prompt_learner" / "model.pth.tar-2"
        other = _dassl_output(work / "B", seed=2) / "prompt_learner" / "model.pth.tar-2"
        entries = _zip_entries(clean)
        prefix = entries[0][0].split("/")[0]
        other_pkl = dict(_zip_entries(other))[f"{prefix}/data.pkl"]
        return _write_zip(work / "model.pth.tar-2", [(f"{prefix}/DATA.PKL", other_pkl), *entries])

    def exact_twin_pickle(work):
        clean = _dassl_output(work / "A", seed=1) / "prompt_learner" / "model.pth.tar-2"
        other = _dassl_output(work / "B", seed=2) / "prompt_learner" / "model.pth.tar-2"
        entries = _zip_entries(clean)
        prefix = entries[0][0].split("/")[0]
        return _write_zip(work / "model.pth.tar-2", [(f"{prefix}/data.pkl", dict(_zip_entries(other))[f"{prefix}/data.pkl"]),
                                                     *entries])

    def case_twin_storage(work):
        clean = _dassl_output(work / "A", seed=1) / "prompt_learner" / "model.pth.tar-2"
        entries = _zip_entries(clean)
        twins = [(name.replace("/data/", "/DATA/"), bytes(len(data))) for name, data in entries if "/data/" in name]
        return _write_zip(work / "model.pth.tar-2", twins + entries)

    def module_twins(state):
        # Valid weights twice: the unprefixed ones (deployed) and prefixed others (what the old reader kept).
        return {**state, **{f"module.{k}": v if k.startswith("token_") else v + 0.01 for k, v in state.items()}}

    def several_checkpoints(work):
        output = _dassl_output(work / "OUTPUT", seed=1, epoch=8)
        best = _dassl_output(work / "B", seed=2, epoch=8) / "prompt_learner" / "model.pth.tar-8"
        shutil.copy(best, output / "prompt_learner" / "model-best.pth.tar")  # checkpoint names -8; eval loads best
        return output

    def arabic_epoch(work):
        output = _dassl_output(work / "OUTPUT", seed=1, epoch=2)
        other = _dassl_output(work / "B", seed=2, epoch=2) / "prompt_learner" / "model.pth.tar-2"
        folder = output / "prompt_learner"
        shutil.copy(other, folder / "model.pth.tar-\u0663")  # ARABIC-INDIC DIGIT THREE: no epoch CoCoOp writes
        (folder / "checkpoint").unlink()
        (folder / "model-best.pth.tar").unlink()
        return output

    cases = [
        delivery("zip: archive/DATA.PKL (other weights) before archive/data.pkl", case_twin_pickle,
                 names=("DATA.PKL",)),
        delivery("zip: two entries named archive/data.pkl", exact_twin_pickle, names=("data.pkl",)),
        delivery("zip: storages data/0 and DATA/0", case_twin_storage, names=("DATA/",)),
        delivery("state_dict: ctx and meta_net.* beside module.-prefixed twins",
                 lambda w: _dassl_output(w / "OUTPUT", state_edit=module_twins), names=("module.",)),
        delivery("state_dict: only module.-prefixed keys (CoCoOp loads none)",
                 lambda w: _dassl_output(w / "OUTPUT", state_edit=lambda s: {f"module.{k}": v for k, v in s.items()}),
                 names=("module.",)),
        delivery("folder: model-best.pth.tar (other weights) beside model.pth.tar-8", several_checkpoints,
                 names=("model-best.pth.tar",)),
        delivery("folder: the same, the auditor names it (--load-epoch best)", several_checkpoints, expect="verdict",
                 extra=("--load-epoch", "best"), check=_read_file("model-best.pth.tar")),
        delivery("folder: model.pth.tar-\u0663 (an Arabic-Indic 3) beside model.pth.tar-2", arabic_epoch,
                 expect="verdict", check=_read_file("model.pth.tar-2")),
    ]

    # ---- class lists
    def lines(*names):
        return lambda work: touch(work / "classes.txt", "\n".join(names) + "\n")

    def million(work):
        path = work / "classes.txt"
        path.write_text("red circle\nblue square\n" + "".join(f"class {k}\n" for k in range(1_000_000)))
        return path

    def bundle_without_target(work):
        bundle = make_bundle(work / "bundle", classes=CLASSES[1:])  # the provider left "red circle" out
        return bundle

    def bundle_case(name, make, listed, expect, names=()):
        def prepare(work):
            bundle = make(work)
            args = [bundle, "--ood", "builtin", "--pool-size", 2, "--holdout", 2, "--out", work / "out", "--quiet",
                    "--classes", touch(work / "classes.txt", "\n".join(listed) + "\n")]
            if scan_supports("--no-reference"):
                args.append("--no-reference")
            return Run("scan", args, expect=expect, names=names, time_limit=limit)
        return Case(8, name, prepare)

    output = lambda w: _dassl_output(w / "OUTPUT")  # noqa: E731
    cases += [
        delivery("classes: a case twin of a class ('Red Circle' beside 'red circle')", output,
                 classes=lines(*CLASSES, "Red Circle"), names=("Red Circle",)),
        delivery("classes: an underscore twin ('blue_square' beside 'blue square')", output,
                 classes=lines(*CLASSES, "blue_square"), names=("blue_square",)),
        delivery("classes: a NUL byte in a name", output, classes=lines(*CLASSES, "green\x00star2"), names=("U+0000",)),
        delivery("classes: a line separator inside a line", output, classes=lines(*CLASSES[:3], "a\u2028b"),
                 names=("U+2028",)),
        delivery("classes: a name of 5,000 characters", output, classes=lines(*CLASSES, "x" * 5000),
                 names=("5000",)),
        delivery("classes: 1,000,000 lines", output, classes=million, names=("classes.txt",)),
        bundle_case("bundle: --classes names the target the bundle left out", bundle_without_target, CLASSES, "verdict"),
        bundle_case("bundle: a new class for a class-specific CoOp context",
                    lambda w: make_bundle(w / "bundle", "coop-specific", classes=CLASSES[1:]), CLASSES, "error",
                    names=("class-specific",)),
    ]

    # ---- pickles that ask for unbounded work or memory, and inputs that raised tracebacks
    def crafted(data_pkl, storages=None):
        return lambda work: _crafted(work / "model.pth.tar-1", data_pkl, storages)

    deep = b"\x80\x02}" + _u("state_dict") + b"}K\x01" + b"\x85" * 1_000_000 + b"Nss."
    colliding = (b"\x80\x02}" + _u("state_dict") + b"}(" + b"".join(
        b"\x8a\x0b" + (k * (2**61 - 1) + 5).to_bytes(11, "little", signed=True) + b"N" for k in range(1, 100_001))
        + b"us.")
    memo = b"\x80\x02}r\xff\xff\xff\xff" + _u("state_dict") + b"}s."  # LONG_BINPUT 2**32 - 1
    copies = (b"\x80\x02ccollections\nOrderedDict\nq\x00}q\x01(" + b"".join(b"J" + struct.pack("<i", k) + b"N"
                                                                               for k in range(200_000))
              + b"u]q\x02(" + b"h\x00h\x01\x85R" * 4000 + b"e000}" + _u("state_dict") + b"}s.")
    long_key = b"\x80\x02}" + _u("state_dict") + b"}" + _u("k" * 10_000_000) + b"Nss."
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"

    def tensor(size: bytes, offset: bytes, elements: int = 0) -> bytes:
        storage = (b"(" + _u("storage") + b"ctorch\nFloatStorage\n" + _u("0") + _u("cpu") + b"K" + bytes([elements])
                   + b"tQ")
        return (b"\x80\x02}" + _u("state_dict") + b"}" + _u("ctx") + rebuild + b"(" + storage + offset + size
                + b"(K\x01K\x01t\x89ccollections\nOrderedDict\n)RtRss.")

    huge = b"\x8a\x09" + (2**64).to_bytes(9, "little", signed=True)
    encrypted = lambda work: _encrypt(_dassl_output(work / "A") / "prompt_learner" / "model.pth.tar-2",  # noqa: E731
                                      work / "model.pth.tar-2")
    cases += [
        delivery("pickle: a 1e6-deep tuple as a dict key", crafted(deep), command="import", isolated=True,
                 names=("model.pth.tar-1",)),
        delivery("pickle: 100,000 integer keys with one hash", crafted(colliding), command="import", isolated=True,
                 names=("model.pth.tar-1",)),
        delivery("pickle: one memo index of 2**32 - 1", crafted(memo), command="import", isolated=True,
                 names=("model.pth.tar-1",)),
        delivery("pickle: a 200k-entry dict copied 4,000 times", crafted(copies), command="import", isolated=True,
                 names=("model.pth.tar-1",)),
        delivery("pickle: a key of 10 MB", crafted(long_key), command="import", isolated=True,
                 names=("model.pth.tar-1",)),
        delivery("pickle: an empty tensor whose size overflows int64", crafted(tensor(b"(K\x00" + huge + b"t", b"K\x00"),
                                                                               {"0": b""}),
                 command="import", isolated=True, names=("model.pth.tar-1",)),
        delivery("pickle: an empty tensor whose offset overflows int64",
                 crafted(tensor(b"(K\x00K\x00t", huge, elements=1), {"0": bytes(4)}),
                 command="import", isolated=True, names=("model.pth.tar-1",)),
        delivery("zip: entries with the encryption flag set", encrypted, command="import", isolated=True,
                 names=("model.pth.tar-2",)),
    ]

    # ---- what ci-import prints of a delivery
    def extra_keys(work):
        sys.path.insert(0, str(ROOT / "tests"))
        from delivery_layout import cocoop_state, save_dassl
        from ci_core.models.cocoop import PromptTunedCLIP

        torch.manual_seed(1)
        model = PromptTunedCLIP(backbone(), ctx_init=None)
        extra = {"\x1b]0;window title set by the delivery\x07": 1, "\nverdict: CLEAN": 2,
                 "\x1b]52;c;ZWNobyBvd25lZA==\x07": 3}
        save_dassl(work / "OUTPUT", "prompt_learner", cocoop_state(model, CLASSES[:2]), learner=model.prompt_learner,
                   extra=extra)
        return work / "OUTPUT"

    def opaque_global(work):
        output = extra_keys(work)
        path = output / "prompt_learner" / "model.pth.tar-10"
        entries = _zip_entries(path)
        prefix = entries[0][0].split("/")[0]
        data = dict(entries)[f"{prefix}/data.pkl"]
        name = b"\x1b]52;c;b3duZWQ=\x07evil"
        injected = data[:2] + b"c" + name + b"\n" + name + b"\n)R0" + data[2:]  # a global created, then popped
        _write_zip(path, [(n, injected if n == f"{prefix}/data.pkl" else d) for n, d in entries])
        for other in ("model-best.pth.tar",):
            shutil.copy(path, path.parent / other)
        return output

    cases += [
        delivery("ci-import: top-level keys with OSC title, OSC 52 and a forged verdict line", extra_keys,
                 command="import", expect="verdict", check=_no_escapes),
        delivery("ci-import: a global whose name holds an OSC 52 sequence", opaque_global, command="import",
                 expect="verdict", check=_no_escapes),
        delivery("ci-import: a new class name holding an escape sequence", output, command="import",
                 classes=lines(*CLASSES, "\x1b]0;title\x07"), names=("U+001B",)),
    ]
    return cases


def _encrypt(source: Path, path: Path) -> Path:
    """A copy of the zip archive ``source`` with every entry's encryption flag set (local and central headers)."""
    data = bytearray(source.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            data[start + flag_offset] |= 1
            start += 4
    path.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------- running and reporting


def control_scan(scratch: Path) -> float:
    """Seconds one ordinary scan of the cases' size takes here (the time limits scale with it)."""
    work = scratch / "control"
    work.mkdir()
    bundle = make_bundle(work / "bundle")
    start = time.perf_counter()
    result = CliRunner().invoke(_commands()["scan"], [str(a) for a in scan_args(bundle, work)])
    if result.exit_code not in (0, 3, 4):
        raise RuntimeError(f"the control scan failed: {result.output[-500:]}")
    return time.perf_counter() - start


def limit_memory(extra: int = 4 * 2**30) -> None:
    with open("/proc/self/statm") as handle:
        virtual = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (virtual + extra, resource.RLIM_INFINITY))


def print_tables(outcomes: list[Outcome], before: dict | None = None) -> None:
    total = handled = 0
    for group, title in GROUPS.items():
        rows = [o for o in outcomes if o.group == group]
        if not rows:
            continue
        ok = sum(o.label == HANDLED for o in rows)
        total, handled = total + len(rows), handled + ok
        line = f"\n{group}. {title}: {len(rows)} cases, {ok} handled cleanly"
        if before is not None:
            earlier = [o for o in before["outcomes"] if o["group"] == group]
            line += f" (before: {sum(o['label'] == HANDLED for o in earlier)} of {len(earlier)})"
        click.echo(line)
        for o in rows:
            if o.label != HANDLED:
                click.echo(f"   {o.label:24s} {o.name}: {o.detail}")
        counts = {}
        for o in rows:
            if o.label != HANDLED:
                counts[o.label] = counts.get(o.label, 0) + 1
        if counts:
            click.echo("   failures: " + ", ".join(f"{n} {label}" for label, n in sorted(counts.items())))
    click.echo(f"\nall groups: {total} cases, {handled} handled cleanly ({100 * handled / max(total, 1):.0f}%)")
    if before is not None:
        done = sum(o["label"] == HANDLED for o in before["outcomes"])
        click.echo(f"before: {len(before['outcomes'])} cases, {done} handled cleanly "
                   f"({100 * done / max(len(before['outcomes']), 1):.0f}%)")


@click.command()
@click.option("--groups", default="1,2,3,4,5,6,7,8", show_default=True, help="Comma-separated groups to run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write every outcome as JSON.")
@click.option("--before", "before_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Outcomes of an earlier run (--json) to show beside these, group by group.")
@click.option("--cases", "only", default=None, metavar="TEXT",
              help="Run only the cases whose name contains one of these comma-separated texts.")
@click.option("--baseline", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
              help="Seconds of a control scan, instead of measuring one (time limits scale with it).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def main(groups, json_path, before_path, only, baseline, quiet):
    """Run the catalogue of hostile inputs and print, per group, how many were handled cleanly."""
    torch.set_num_threads(2)
    limit_memory()
    wanted = [int(g) for g in groups.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="hostile-inputs-"))
    os.environ["CI_CACHE_DIR"] = str(scratch / "cache")  # reference scans are cached here, not in the user's cache
    clock = time.perf_counter()
    say = (lambda text: None) if quiet else (lambda text: click.echo(text, err=True))
    try:
        import ci_core

        say(f"measuring the code in {Path(ci_core.__file__).parent.parent}")
        baseline = baseline or control_scan(scratch)
        say(f"[{time.perf_counter() - clock:6.1f}s] a control scan takes {baseline:.1f} s")
        builders = {1: group1, 2: group2, 3: lambda: group3(baseline), 4: lambda: group4(baseline),
                    5: lambda: group5(baseline), 6: lambda: group6(scratch / "g6"), 7: group7,
                    8: lambda: group8(baseline)}
        outcomes = []
        for group in wanted:
            try:
                cases = builders[group]()
            except Exception as exc:  # noqa: BLE001 - a group that cannot be set up is reported as such
                outcomes.append(Outcome(group, "setting up the group", "setup failed", f"{type(exc).__name__}: {exc}"[:300], 0))
                say(f"group {group}: setup failed: {exc}")
                continue
            for index, case in enumerate(cases, 1):
                if only and not any(text in case.name for text in only.split(",")):
                    continue
                work = scratch / f"g{group}" / f"case{index:03d}"
                work.mkdir(parents=True)
                outcome = execute(case, work)
                outcomes.append(outcome)
                say(f"[{time.perf_counter() - clock:6.1f}s] {group}.{index:02d} {outcome.label:24s} {case.name} "
                    f"({outcome.seconds:.1f} s)")
                shutil.rmtree(work, ignore_errors=True)
        before = json.loads(before_path.read_text()) if before_path else None
        print_tables(outcomes, before)
        click.echo(f"\n{len(outcomes)} cases in {time.perf_counter() - clock:.0f} s")
        if json_path:
            json_path.write_text(json.dumps({"outcomes": [attrs.asdict(o) for o in outcomes]}, indent=1) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
