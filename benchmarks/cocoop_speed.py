"""CoCoOp forward+backward: the straightforward reference against the fast path, time and peak memory side by side.

    python benchmarks/cocoop_speed.py [--model ViT-B-16] [--classes 50] [--batch 8] [--repeats 3] [--device auto]

* reference: full 77-token prompts, a Python loop over images (``reference_logits``);
* fast: prompts truncated after the last end-of-text, all (image, class) pairs
  batched, the shared prefix computed once per image, chunks sized to a memory
  budget (or ``--max-text-batch``), bf16 autocast with ``--bf16`` (CUDA only).

Weights are random (``random:0``), so any open_clip name works offline.  Both
paths take the gradient of the logits with respect to the images and the prompt
learner, as trigger inversion and prompt tuning do.  Each path runs in its own
process with the same seed, so that its peak memory is its own: on a CPU the
peak resident set size (the kernel's high-water mark, reset once the model is
built), on CUDA ``torch.cuda.max_memory_allocated``.  The table shows the
median wall and CPU time (``time.process_time``, all threads; the fairer figure
when other work shares the machine) of ``--repeats`` runs after ``--warmup``
runs, the peak memory and
its rise over the memory held before the first run, and the largest logit
difference between the two paths.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from safetensors.torch import load_file, save_file

from ci_core.runtime import resolve_runtime
from ci_core.errors import CIError
from ci_core.models.backbone import load_backbone
from ci_core.models.cocoop import PromptTunedCLIP, reference_logits

PATHS = ("reference", "fast")
# Class names of one to four words, like most datasets' (the longest one sets the fast path's prompt length).
WORDS = ("striped", "mountain", "red", "bird", "house", "river", "small", "car", "flower", "old", "dog", "field")


def class_names(count: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 4)) + f" {i}" for i in range(count)]


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so that model building does not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_worker(path: str, model_name: str, classes: int, batch: int, repeats: int, warmup: int, device: str,
               max_text_batch: int | None, bf16: bool, logits_out: str) -> dict:
    runtime = resolve_runtime(device, max_text_batch, bf16)
    torch.manual_seed(0)
    backbone = load_backbone(model_name, "random:0", device=runtime.device, text_encoding=runtime.text_encoding)
    model = PromptTunedCLIP(backbone)
    names = class_names(classes)
    prompts = model.class_prompts(names)
    images_cpu = torch.rand(batch, 3, backbone.image_size, backbone.image_size,
                            generator=torch.Generator().manual_seed(1))
    on_cuda = model.device.type == "cuda"

    def step() -> torch.Tensor:
        images = images_cpu.to(model.device).requires_grad_(True)
        logits = reference_logits(model, images, names) if path == "reference" else model(images, names)
        logits[:, 0].sum().backward()
        model.prompt_learner.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize(model.device)
        return logits.detach()

    if on_cuda:
        torch.cuda.synchronize(model.device)
        torch.cuda.reset_peak_memory_stats(model.device)
        baseline = torch.cuda.memory_allocated(model.device)
        peak_source = "torch.cuda.max_memory_allocated"
    else:
        peak_source = "peak RSS" if _reset_peak_rss() else "peak RSS since start (could not reset it)"
        baseline = (_status_kib("VmRSS") or 0) * 1024
    times, cpu_times = [], []
    for index in range(warmup + repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        logits = step()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        label = "warm-up" if index < warmup else f"run {index - warmup + 1}/{repeats}"
        print(f"  {path}: {label} {seconds:.2f} s ({cpu_seconds:.2f} s of CPU time)", file=sys.stderr, flush=True)
        if index >= warmup:
            times.append(seconds)
            cpu_times.append(cpu_seconds)
    peak = torch.cuda.max_memory_allocated(model.device) if on_cuda else (_status_kib("VmHWM") or 0) * 1024
    save_file({"logits": logits.float().cpu().contiguous()}, logits_out)
    context = int(model.clip.positional_embedding.shape[0])
    return {
        "path": path, "seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times),
        "peak_bytes": peak, "baseline_bytes": baseline,
        "peak_source": peak_source, "device": str(model.device), "threads": torch.get_num_threads(),
        "prompt_tokens": context if path == "reference" else 1 + model.n_ctx + prompts.suffix.shape[1],
        "pairs_per_chunk": None if path == "reference" else model.pairs_per_chunk(prompts, grad=True),
        "shared_prefix": path == "fast" and model.shared_prefix,
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


@click.command()
@click.option("--model", default="ViT-B-16", show_default=True, help="Any open_clip model name (random weights).")
@click.option("--classes", default=50, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--max-text-batch", type=click.IntRange(1), default=None,
              help="Fast path chunk size (default: automatic).")
@click.option("--bf16", is_flag=True, help="Fast path under bfloat16 autocast (CUDA only); the reference stays fp32.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads (default: torch's).")
@click.option("--worker", type=click.Choice(PATHS), hidden=True)
@click.option("--logits-out", hidden=True)
def main(model, classes, batch, repeats, warmup, device, max_text_batch, bf16, threads, worker, logits_out):
    if threads:
        torch.set_num_threads(threads)
    try:
        if worker:
            result = run_worker(worker, model, classes, batch, repeats, warmup, device,
                                max_text_batch if worker == "fast" else None, bf16 and worker == "fast", logits_out)
            print(json.dumps(result))
            return
        resolve_runtime(device, max_text_batch, bf16)  # fail before starting anything
    except CIError as exc:
        raise click.ClickException(str(exc)) from exc
    results, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in PATHS:
            out = os.path.join(tmp, f"{path}.safetensors")
            args = [sys.executable, __file__, "--worker", path, "--logits-out", out, "--model", model,
                    "--classes", str(classes), "--batch", str(batch), "--repeats", str(repeats),
                    "--warmup", str(warmup), "--device", device]
            args += ["--threads", str(threads)] if threads else []
            args += ["--max-text-batch", str(max_text_batch)] if max_text_batch else []
            args += ["--bf16"] if bf16 else []
            click.echo(f"running the {path} path in its own process ...", err=True)
            done = subprocess.run(args, stdout=subprocess.PIPE, text=True)
            if done.returncode != 0:
                raise click.ClickException(f"the {path} process failed (exit status {done.returncode})")
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])
            logits[path] = load_file(out)["logits"]
    ref, fast = results["reference"], results["fast"]
    diff = (logits["fast"] - logits["reference"]).abs().max().item()
    click.echo(f"{model} (random weights), {classes} classes, batch {batch}, forward+backward (grad to images and "
               f"prompt learner), median of {repeats} after {warmup} warm-up, {ref['device']}, {ref['threads']} threads")
    click.echo(f"{'path':10s} {'seconds':>9s} {'CPU s':>9s} {'peak memory':>13s} {'rise in run':>13s}  prompt tokens")
    for row in (ref, fast):
        extra = "" if row["path"] == "reference" else (
            f"  ({row['pairs_per_chunk']} pairs per chunk{', shared prefix' if row['shared_prefix'] else ''}"
            f"{', bf16' if bf16 else ''})")
        click.echo(f"{row['path']:10s} {row['seconds']:9.3f} {row['cpu_seconds']:9.3f} {_mib(row['peak_bytes']):>13s} "
                   f"{_mib(row['peak_bytes'] - row['baseline_bytes']):>13s}  {row['prompt_tokens']}{extra}")
    rise_ref, rise_fast = ref["peak_bytes"] - ref["baseline_bytes"], fast["peak_bytes"] - fast["baseline_bytes"]
    click.echo(f"speed-up x{ref['seconds'] / fast['seconds']:.2f} in wall time, "
               f"x{ref['cpu_seconds'] / max(fast['cpu_seconds'], 1e-9):.2f} in CPU time (the fairer figure on a busy "
               f"machine); memory rise x{rise_ref / max(rise_fast, 1):.2f} smaller; "
               f"largest |logit difference| {diff:.2e} (memory: {ref['peak_source']})")


if __name__ == "__main__":
    main()
