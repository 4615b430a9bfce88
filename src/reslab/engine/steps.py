"""The pieces of training that know nothing of a run: one optimiser step, the host's check of its numbers,
and evaluation of a model on a test set (with optional test-time flip and shift)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from .. import faults
from ..data import TensorLoader, pad
from . import dist, guard
from .optim import SGD
from .precision import autocast, memory_format


def loss_fn(label_smoothing: float) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def train_step(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer | SGD,
    criterion: nn.Module,
    step: int,
    device: torch.device,
    precision: str = "fp32",
    clip: float = math.inf,
    ctx: dist.DistContext | None = None,
    scaler: torch.amp.GradScaler | None = None,
    check: bool = True,
    accum: int = 1,
) -> torch.Tensor:
    """One optimiser step. Returns its numbers as one tensor on the device: mean loss of the batch, gradient
    norm, number of correct predictions.

    With `check` the host reads them before the update and raises guard.Divergence, so a non-finite loss or
    gradient never reaches the weights. Without, nothing waits for the device (on a GPU each wait stalls the
    queue of kernels); the caller checks later with `check_steps` and rolls back. With fp16 a gradient scaler
    multiplies the loss; an overflow in its scaled gradients is not divergence (the scaler skips that step and
    lowers its scale), a non-finite loss is.

    With `accum` > 1 the batch goes through in that many near-equal micro-batches, each loss weighted by its share
    of the batch, so the summed gradients are the whole batch's mean (DDP all-reduces once, after the last). The
    buffers (BatchNorm's running statistics) keep the first micro-batch's update alone: once a step, as without
    micro-batches, and as DDP keeps rank 0's (whose share is the first micro-batch of as many ranks)."""
    optimizer.zero_grad(set_to_none=True)
    parts = zip(x.tensor_split(accum), y.tensor_split(accum)) if accum > 1 else [(x, y)]
    sums = None  # loss (each micro-batch's weighted by its share), correct predictions
    kept = None  # the buffers after the first micro-batch
    for i, (xi, yi) in enumerate(parts):
        with nullcontext() if i == accum - 1 else no_sync(net):
            with autocast(device, precision):
                logits = net(xi)
                loss = criterion(logits, yi)
                if accum > 1:
                    loss = loss * (len(yi) / len(y))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        part = torch.stack([loss.detach().float(), (logits.argmax(1) == yi).sum().float()])
        sums = part if sums is None else sums + part
        if accum > 1 and i == 0:
            kept = [b.clone() for b in net.buffers()]
    for buffer, first in zip(net.buffers(), kept or []):
        buffer.copy_(first)
    if scaler is not None:
        scaler.unscale_(optimizer)
    # one number for loss and gradients: a NaN/Inf anywhere makes the norm non-finite (the same on all ranks)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if math.isfinite(clip):  # without a limit, skip clipping's multiply of every gradient by 1
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    stats = torch.stack([sums[0], norm.detach().float(), sums[1]])
    if check:
        check_steps([(step, stats)], device, ctx, grad_norm=scaler is None)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return stats


def no_sync(net: nn.Module):
    """DDP's no_sync (gradients kept on this rank until a later backward) for a DDP net, compiled or not; else
    nothing to hold back."""
    hold = getattr(net, "no_sync", None)
    return hold() if hold is not None else nullcontext()


def check_steps(
    steps: list[tuple[int, torch.Tensor]],
    device: torch.device,
    ctx: dist.DistContext | None = None,
    grad_norm: bool = True,
) -> list[list[float]]:
    """Read steps' numbers from the device in one wait; raise guard.Divergence at the first non-finite loss
    (or gradient norm) on any rank. Returns this rank's numbers as floats."""
    rows = torch.stack([stats for _, stats in steps]).tolist()
    # one sum over ranks for loss and gradients: a NaN/Inf anywhere makes it non-finite on every rank
    health = dist.all_reduce_sum([v for row in rows for v in row[:2]], device, ctx or dist.DistContext())
    for i, (step, _) in enumerate(steps):
        guard.check(health[2 * i], "loss", step)
        if grad_norm:
            guard.check(health[2 * i + 1], "gradient norm", step)
    return rows


def predict_logits(
    model: nn.Module,
    x: torch.Tensor,
    tta_flip: bool = False,
    tta_shift: int = 0,
    fill: float | tuple[float, ...] = 0.0,
) -> torch.Tensor:
    """fp32 logits of a batch. With `tta_flip`, the mean of the logits of each image and its mirror. With
    `tta_shift` s, half of that plus a quarter each for the images moved s pixels up-left and down-right, the
    uncovered border set to `fill` (the value random crops pad with: one, or one a channel)."""

    def views(x: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()
        return (logits + model(x.flip(-1)).float()) / 2 if tta_flip else logits

    if not tta_shift:
        return views(x)
    s, (h, w) = tta_shift, x.shape[-2:]
    padded = pad(x, s, fill)
    moved = views(padded[..., 2 * s :, 2 * s :]) + views(padded[..., :h, :w])
    return views(x) / 2 + moved / 4


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: TensorLoader,
    device: torch.device,
    precision: str = "fp32",
    tta_flip: bool = False,
    channels_last: bool = True,
    ctx: dist.DistContext | None = None,
    tta_shift: int = 0,
) -> dict:
    """Mean cross-entropy and accuracy over the full test set (eval mode, no gradients). The sums stay on the
    device (in float64, as the host would add them) and are read once: on a GPU a read per batch would stall."""
    model.eval()
    mem = memory_format(channels_last)
    sums, count = torch.zeros(2, dtype=torch.float64, device=device), 0
    fill = loader.fill if tta_shift else 0.0  # a learner's own loader (reslab.d2l) need not know it
    for x, y in loader:
        x = x.contiguous(memory_format=mem)
        with autocast(device, precision):
            logits = predict_logits(model, x, tta_flip, tta_shift, fill)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        sums += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double()])
        count += y.numel()
        faults.reached("eval")
    loss_sum, correct = sums.tolist()
    loss_sum, correct, count = dist.all_reduce_sum(
        [loss_sum, correct, count], device, ctx or dist.DistContext()
    )
    return {"test_loss": loss_sum / count, "test_acc": correct / count}


__all__ = ["check_steps", "evaluate", "loss_fn", "predict_logits", "train_step"]
