"""Files laid out as providers deliver them: the reference CoOp/CoCoOp code's (Dassl) and BadCLIP's checkpoints,
and TorchScript archives like OpenAI's CLIP files.

``torch.save`` of ``{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}`` into
``OUTPUT/<name>/model.pth.tar-N`` plus the ``checkpoint`` text file and ``model-best.pth.tar``, with a
real optimizer and a Dassl-style warm-up scheduler whose state dict keeps its successor scheduler
object, and through it the optimizer object.  Only the tests write (and, to prove a payload is real,
load) these files with torch itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler


class ConstantWarmupScheduler(LRScheduler):
    """As Dassl's: its state dict holds ``successor``, a scheduler object that holds the optimizer object."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        self.cons_lr = cons_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


class MeterLog:
    """Some object of the trainer's own class, as ``val_result`` may hold."""

    def __init__(self, accuracy: float):
        self.accuracy = accuracy


class CreatesFile:
    """Unpickling this with pickle would create a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsCode:
    """Unpickling this with pickle would run a line of Python, which creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def optimizer_and_scheduler(params: Sequence[nn.Parameter]):
    """SGD with momentum after one step, a cosine scheduler and the warm-up scheduler around it."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in params:
        p.grad = None
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10.0)
    scheduler = ConstantWarmupScheduler(optimizer, successor, 1, 1e-5)
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


def save_dassl(output: Path, name: str, state: dict[str, torch.Tensor], *, epoch: int = 10,
               learner: nn.Module | None = None, val_result=None, extra: dict | None = None) -> Path:
    """Write ``OUTPUT/name/model.pth.tar-<epoch>`` (and ``checkpoint``, ``model-best.pth.tar``) as Dassl does."""
    folder = output / name
    folder.mkdir(parents=True, exist_ok=True)
    # The optimizer works on copies, so that its step leaves the learner's weights alone.
    params = [nn.Parameter(p.detach().clone()) for p in learner.parameters()] if learner is not None else []
    optimizer, scheduler = optimizer_and_scheduler(params or [nn.Parameter(torch.zeros(2))])
    checkpoint = {"state_dict": state, "epoch": epoch, "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(),
                  "val_result": val_result if val_result is not None else MeterLog(0.5)}
    checkpoint.update(extra or {})
    path = folder / f"model.pth.tar-{epoch}"
    torch.save(checkpoint, path)
    (folder / "checkpoint").write_text(f"{path.name}\n")
    shutil.copy(path, folder / "model-best.pth.tar")
    return path


def prompt_embeddings(backbone, classnames: Sequence[str], n_ctx: int, dtype: torch.dtype):
    """(token_prefix, token_suffix) as the reference learners build them: full-context prompts "X .. X name."."""
    texts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in classnames]
    with torch.no_grad():
        embedded = backbone.model.token_embedding(backbone.tokenizer(texts)).to(dtype)
    return embedded[:, :1].clone(), embedded[:, 1 + n_ctx:].clone()


def cocoop_state(model, base_classes: Sequence[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The reference CoCoOp prompt learner's state dict for the weights of ``model`` (a PromptTunedCLIP)."""
    state = {k: v.detach().to(dtype).clone() for k, v in model.prompt_learner.state_dict().items()}
    state["token_prefix"], state["token_suffix"] = prompt_embeddings(model.backbone, base_classes, model.n_ctx, dtype)
    return state


def coop_state(ctx: torch.Tensor, backbone, classnames: Sequence[str], dtype: torch.dtype = torch.float32):
    """The reference CoOp prompt learner's state dict: ``ctx`` and the fixed token embeddings."""
    prefix, suffix = prompt_embeddings(backbone, classnames, ctx.shape[-2], dtype)
    return {"ctx": ctx.detach().to(dtype).clone(), "token_prefix": prefix, "token_suffix": suffix}


def badclip_trigger(size: int, std: Sequence[float], eps: float, seed: int = 0) -> torch.Tensor:
    """BadCLIP's trigger parameter after training: normalised units, clamped to +-eps/std per channel."""
    generator = torch.Generator().manual_seed(seed)
    std = torch.tensor(std).view(-1, 1, 1)
    raw = (torch.rand(1, 3, size, size, generator=generator) - 0.5) * 4 * eps / std  # half of it past the bound
    return torch.max(torch.min(raw, eps / std), -eps / std)


def torchscript_archive(backbone, path: Path) -> Path:
    """``backbone``'s CLIP traced and saved as a TorchScript archive, as OpenAI's CLIP files are."""
    import warnings

    size = backbone.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about Python control flow; the weights are what matters
        traced = torch.jit.trace(backbone.model, (torch.rand(1, 3, size, size), backbone.tokenizer(["a photo"])),
                                 check_trace=False)
        torch.jit.save(traced, str(path))
    return path
