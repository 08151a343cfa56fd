"""Side-by-side forward+backward time of the three CoCoOp text paths, in one run.

    python benchmarks/cocoop_paths.py [--model ci-tiny-clip] [--classes 36] [--batch 8] [--repeats 3]

* reference: the per-image loop over full-context prompts, as CoCoOp's code does it;
* plain: truncated prompts, all (image, class) pairs in one batch;
* shared-prefix: plain, with the SOT+context prefix computed once per image.

Weights are random (``random:0``), so any open_clip name works offline.  Prints
the median seconds of each path, their ratios to the reference, and the largest
logit difference from the reference.
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from ci_core.models.backbone import load_backbone
from ci_core.models.cocoop import PromptTunedCLIP, reference_logits


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        out[:, 0].sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out.detach()


@click.command()
@click.option("--model", default="ci-tiny-clip", show_default=True)
@click.option("--classes", default=36, show_default=True)
@click.option("--batch", default=8, show_default=True)
@click.option("--repeats", default=3, show_default=True)
def main(model, classes, batch, repeats):
    torch.manual_seed(0)
    backbone = load_backbone(model, "random:0")
    clip = PromptTunedCLIP(backbone)
    names = [f"class number {i}" for i in range(classes)]
    images = torch.rand(batch, 3, backbone.image_size, backbone.image_size, requires_grad=True)
    reference_s, reference = timed(lambda: reference_logits(clip, images, names), repeats)
    clip.shared_prefix = False
    plain_s, plain = timed(lambda: clip(images, names), repeats)
    clip.shared_prefix = True
    shared_s, shared = timed(lambda: clip(images, names), repeats)
    click.echo(f"{model}, {classes} classes, batch {batch}, fwd+bwd, median of {repeats}, {torch.get_num_threads()} threads")
    for label, seconds, logits in (("reference", reference_s, reference), ("plain", plain_s, plain),
                                   ("shared-prefix", shared_s, shared)):
        diff = (logits - reference).abs().max().item()
        click.echo(f"{label:14s} {seconds:8.3f} s  speed-up x{reference_s / seconds:5.2f}  max |logit diff| {diff:.2e}")


if __name__ == "__main__":
    main()
