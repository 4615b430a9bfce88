"""The training loop: fit(), train_one_epoch(), evaluate().

Each epoch puts the model in train mode, trains, then evaluates in eval mode without gradients: the seed
notebook never switched back to train mode, froze BatchNorm and went NaN. The run directory holds
config.yaml, metrics.jsonl, summary.json, last.pt, best.pt and curves.png (README, "The run directory").
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import config as config_mod
from .. import faults
from ..config import Config
from ..data import TensorLoader, load_dataset, make_loaders
from ..errors import ReslabError
from ..models import build_model, count_params
from . import checkpoint, dist, guard
from .optim import EMA, make_optimizer
from .precision import autocast, resolve_device, resolve_precision
from .schedule import lr_at


class Interrupted(ReslabError):
    """Ctrl-C: a resumable checkpoint was saved."""

    exit_code = 130


@dataclass
class Run:
    """Everything alive during one training run."""

    cfg: Config
    out: Path
    ctx: dist.DistContext
    device: torch.device
    precision: str
    model: nn.Module  # the bare model: its state_dict is what checkpoints hold
    net: nn.Module  # what the steps call: the model, maybe compiled, maybe wrapped in DDP
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    train_loader: TensorLoader
    test_loader: TensorLoader
    meta: dict  # what eval/predict need to rebuild the model and its input pipeline
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    quiet: bool = False
    guard: guard.GuardState = field(default_factory=guard.GuardState)
    history: list[dict] = field(default_factory=list)
    epoch: int = 0  # completed epochs
    batch: int = 0  # completed batches of the current epoch (mid-epoch checkpoints)
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # loss, correct, count, seconds
    guard_every: int = 1  # steps between host checks (train.guard_every resolved for the device)
    pending: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (step, images, stats) unread
    interrupted: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


# ------------------------------------------------------------------------------------------- steps
def _loss_fn(label_smoothing: float) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def train_step(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    step: int,
    device: torch.device,
    precision: str = "fp32",
    clip: float = math.inf,
    ctx: dist.DistContext | None = None,
    scaler: torch.amp.GradScaler | None = None,
    check: bool = True,
) -> torch.Tensor:
    """One optimiser step. Returns its numbers as one tensor on the device: mean loss of the batch, gradient
    norm, number of correct predictions.

    With `check` the host reads them before the update and raises guard.Divergence, so a non-finite loss or
    gradient never reaches the weights. Without, nothing waits for the device (on a GPU each wait stalls the
    queue of kernels); the caller checks later with `check_steps` and rolls back. With fp16 a gradient scaler
    multiplies the loss; an overflow in its scaled gradients is not divergence (the scaler skips that step and
    lowers its scale), a non-finite loss is."""
    with autocast(device, precision):
        logits = net(x)
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    # one number for loss and gradients: a NaN/Inf anywhere makes the norm non-finite (the same on all ranks)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    stats = torch.stack([loss.detach().float(), norm.detach().float(), (logits.argmax(1) == y).sum().float()])
    if check:
        check_steps([(step, stats)], device, ctx, grad_norm=scaler is None)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return stats


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


def settle(run: Run) -> None:
    """Add the pending steps to the epoch's sums, checking them first unless each step checked itself.
    Called every `run.guard_every` steps, before any checkpoint and at the end of the epoch."""
    pending, run.pending = run.pending, []
    if not pending:
        return
    if run.guard_every == 1:
        rows = torch.stack([stats for _, _, stats in pending]).tolist()
    else:
        rows = check_steps([(s, t) for s, _, t in pending], run.device, run.ctx, run.scaler is None)
    for (_, images, _), (loss, _, correct) in zip(pending, rows):
        run.sums[0] += loss * images
        run.sums[1] += correct
        run.sums[2] += images


def train_one_epoch(run: Run, epoch: int, on_step=None) -> dict:
    """One pass over the training data from batch `run.batch` on; returns the epoch's training metrics.

    Training loss is the mean per-example loss over the epoch's batches, accuracy over the same examples.
    """
    cfg, loader = run.cfg, run.train_loader
    run.net.train()  # every epoch: evaluate() switched to eval mode
    loader.set_epoch(epoch)
    criterion = _loss_fn(cfg.optim.label_smoothing)
    total = cfg.train.epochs * run.steps_per_epoch
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    mem = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    show = not run.quiet and run.ctx.is_main and sys.stderr.isatty()
    bar = tqdm(total=len(loader), initial=run.batch, desc=f"epoch {epoch + 1}", leave=False, disable=not show)
    start = time.perf_counter()
    for b, (x, y) in enumerate(loader.batches(run.batch), run.batch):
        step = epoch * run.steps_per_epoch + b
        lr = lr_at(step, total, run.steps_per_epoch, cfg.optim) * run.guard.lr_scale
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x = x.contiguous(memory_format=mem)
        stats = train_step(
            run.net,
            x,
            y,
            run.optimizer,
            criterion,
            step,
            run.device,
            run.precision,
            clip,
            run.ctx,
            run.scaler,
            check=run.guard_every == 1,
        )
        if run.ema is not None:
            run.ema.update(run.model, step)
        run.pending.append((step, y.numel(), stats))
        run.batch = b + 1
        if len(run.pending) >= run.guard_every:
            settle(run)
        bar.update(1)
        faults.reached("step")
        if on_step is not None:
            on_step(run)
    settle(run)
    run.sums[3] += time.perf_counter() - start
    bar.close()
    loss_sum, correct, count, seconds = dist.all_reduce_sum(run.sums[:3], run.device, run.ctx) + run.sums[3:]
    return {
        "train_loss": loss_sum / count,
        "train_acc": correct / count,
        "images_per_sec": count / max(seconds, 1e-9),
        "train_seconds": seconds,
    }


def predict_logits(model: nn.Module, x: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """fp32 logits of a batch; with `tta_flip`, the mean of the logits of each image and its mirror."""
    logits = model(x).float()
    return (logits + model(x.flip(-1)).float()) / 2 if tta_flip else logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: TensorLoader,
    device: torch.device,
    precision: str = "fp32",
    tta_flip: bool = False,
    channels_last: bool = True,
    ctx: dist.DistContext | None = None,
) -> dict:
    """Mean cross-entropy and accuracy over the full test set (eval mode, no gradients)."""
    model.eval()
    mem = torch.channels_last if channels_last else torch.contiguous_format
    loss_sum, correct, count = 0.0, 0.0, 0.0
    for x, y in loader:
        x = x.contiguous(memory_format=mem)
        with autocast(device, precision):
            logits = predict_logits(model, x, tta_flip)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += y.numel()
        faults.reached("eval")
    loss_sum, correct, count = dist.all_reduce_sum(
        [loss_sum, correct, count], device, ctx or dist.DistContext()
    )
    return {"test_loss": loss_sum / count, "test_acc": correct / count}


# ------------------------------------------------------------------------------------------- set-up
def prepare(cfg: Config, out: Path, quiet: bool = False) -> Run:
    """Build data, model and optimiser; everything that can fail on user input fails here, before any write."""
    device = resolve_device(cfg.device)
    ctx = dist.setup(device.type)
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    precision = resolve_precision(cfg.precision, device)
    if cfg.train.batch_size % ctx.world_size:
        raise ReslabError(
            f"train.batch_size {cfg.train.batch_size} is not divisible by {ctx.world_size} ranks"
        )
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model.name, data.in_channels, len(data.classes), **cfg.model.options)
    if ctx.active and cfg.train.sync_bn:
        if device.type != "cuda":
            raise ReslabError(
                "train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm); set it false on the CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    mem = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=mem)
    train_loader, test_loader = make_loaders(
        data,
        cfg.data,
        cfg.train.batch_size,
        cfg.train.eval_batch_size,
        cfg.seed,
        device,
        ctx.rank,
        ctx.world_size,
    )
    if len(train_loader) == 0:
        raise ReslabError(
            f"train.batch_size {cfg.train.batch_size} exceeds the {train_loader.num_examples} training images"
        )
    net = model
    if ctx.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        net = torch.compile(net)
    meta = {
        "model_name": cfg.model.name,
        "model_options": dict(cfg.model.options),
        "in_channels": data.in_channels,
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "resize": cfg.data.resize,
        "image_size": int(data.train_images.shape[-1]),
        "params": count_params(model),
    }
    return Run(
        cfg,
        out,
        ctx,
        device,
        precision,
        model,
        net,
        make_optimizer(model, cfg.optim),
        EMA(model, cfg.train.ema) if cfg.train.ema > 0 else None,
        train_loader,
        test_loader,
        meta,
        torch.amp.GradScaler(device.type) if precision == "fp16" else None,
        quiet,
        guard_every=cfg.train.guard_every or (1 if device.type == "cpu" else 50),
    )


# ------------------------------------------------------------------------------------------- state
def _state(run: Run) -> dict:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "ema": run.ema.state_dict() if run.ema else None,
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "guard": run.guard.to_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [],
        "history": run.history,
        "epoch": run.epoch,
        "batch": run.batch,
        "sums": list(run.sums),
        "config": run.cfg.to_dict(),
        "meta": run.meta,
    }


def _restore(run: Run, state: dict) -> None:
    """Continue from a checkpoint: the training state plus the guard and the run's history."""
    _restore_training_state(run, state)
    run.guard = guard.GuardState(**state["guard"])
    run.history = list(state["history"])
    run.epoch = state["epoch"]


def _restore_training_state(run: Run, state: dict) -> None:
    """Weights, optimiser, EMA, scaler, RNGs and the position in the epoch; not the guard, whose halved lr must
    survive a rollback."""
    try:
        run.model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise checkpoint.CheckpointError(
            f"checkpoint does not fit model {run.cfg.model.name}: {str(e).splitlines()[0]}"
        ) from None
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") and run.device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    run.batch, run.sums = state["batch"], list(state["sums"])  # a copy: the epoch adds to run.sums in place
    run.pending = []


def _snapshot(run: Run) -> dict:
    """An in-memory copy of the last good state, for the divergence guard."""
    return copy.deepcopy({k: v for k, v in _state(run).items() if k not in ("history", "config", "meta")})


def _write_text(path: Path, text: str) -> None:
    try:
        checkpoint.atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as e:
        raise ReslabError(f"cannot write {path}: {e.strerror or e}") from None


def _save(run: Run, name: str, state: dict | None = None) -> None:
    if not run.ctx.is_main:
        return
    try:
        checkpoint.save(state if state is not None else _state(run), run.out / name)
    except checkpoint.CheckpointError as e:
        if run.cfg.train.on_checkpoint_error == "stop":
            raise
        print(f"warning: {e}; training goes on (train.on_checkpoint_error=continue)", file=sys.stderr)


# ------------------------------------------------------------------------------------------- the run
def _epoch_line(m: dict, epochs: int) -> str:
    return (
        f"epoch {m['epoch']:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}  "
        f"test loss {m['test_loss']:.4f} acc {m['test_acc']:.4f}  lr {m['lr']:.4g}  "
        f"{m['images_per_sec']:,.0f} img/s  {m['epoch_seconds']:.1f} s"
    )


def _log(run: Run, line: str, err: bool = False) -> None:
    if run.ctx.is_main:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def fit(cfg: Config, out: str | Path, resume: bool = False, quiet: bool = False, on_step=None) -> dict:
    """Train `cfg` into the run directory `out`; with resume, continue from out/last.pt. Returns the summary."""
    out = Path(out)
    wall_start = time.perf_counter()
    run = prepare(cfg, out, quiet)
    state = checkpoint.load(out / "last.pt") if resume else None
    if state is not None:
        _restore(run, state)
        if run.epoch >= cfg.train.epochs:
            _log(run, f"{out} already finished {run.epoch} epochs; raise train.epochs to train on")
    if run.ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_text(out / "config.yaml", config_mod.dump(cfg))
    _log(
        run,
        f"reslab: {cfg.model.name} ({run.meta['params'] / 1e6:.2f}M params) on {run.device.type}"
        f"{f' x{run.ctx.world_size}' if run.ctx.active else ''}, {run.precision}, "
        f"{run.train_loader.num_examples} train / {run.test_loader.num_examples} test images, "
        f"{cfg.train.epochs} epochs -> {out}" + (f" (resumed at epoch {run.epoch + 1})" if state else ""),
    )

    def step_hook(r: Run) -> None:
        every = cfg.train.checkpoint_every
        if (every and r.batch % every == 0 and r.batch < r.steps_per_epoch) or r.interrupted:
            settle(r)  # checked numbers only: a checkpoint never holds an unchecked step
            _save(r, "last.pt")
        if r.interrupted:
            raise Interrupted(_interrupted_message(out))
        if on_step is not None:
            on_step(r)

    def on_sigint(signum, frame):
        run.interrupted = True

    previous = signal.signal(signal.SIGINT, on_sigint) if not run.ctx.active else None
    faults.reached("start")
    best = max((h["test_acc"] for h in run.history), default=-1.0)
    try:
        while run.epoch < cfg.train.epochs:
            epoch = run.epoch
            snap = _snapshot(run)
            try:
                metrics = _train_and_evaluate(run, epoch, step_hook)
            except guard.Divergence as e:
                _log(run, guard.recover(run.guard, e, epoch, cfg.train.max_retries), err=True)
                _restore_training_state(run, snap)
                continue
            run.guard.retries = 0
            run.history.append(metrics)
            run.epoch, run.batch, run.sums = epoch + 1, 0, [0.0, 0.0, 0.0, 0.0]
            saved = _state(run)
            _save(run, "last.pt", saved)
            faults.reached("after-checkpoint")
            if metrics["test_acc"] > best:
                best = metrics["test_acc"]
                _save(run, "best.pt", {k: v for k, v in saved.items() if k != "optimizer"})
            _write_outputs(run)
            _log(run, _epoch_line(metrics, cfg.train.epochs))
            faults.reached("epoch-end")
            if run.interrupted:
                raise Interrupted(_interrupted_message(out))
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    summary = _summary(run, time.perf_counter() - wall_start)
    if run.ctx.is_main:
        _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    dist.cleanup(run.ctx)
    return summary


def _interrupted_message(out: Path) -> str:
    return f"interrupted; saved {out / 'last.pt'}; continue with: reslab train --out {out} --resume"


def _train_and_evaluate(run: Run, epoch: int, step_hook) -> dict:
    """One epoch of training then evaluation; the epoch's metrics. Raises guard.Divergence."""
    cfg = run.cfg
    train_m = train_one_epoch(run, epoch, step_hook)
    eval_model = run.ema.model if run.ema is not None else run.net
    start = time.perf_counter()
    test_m = evaluate(
        eval_model,
        run.test_loader,
        run.device,
        run.precision,
        cfg.train.tta_flip,
        cfg.train.channels_last,
        run.ctx,
    )
    guard.check(test_m["test_loss"], "test loss", (epoch + 1) * run.steps_per_epoch)
    last_step = (epoch + 1) * run.steps_per_epoch - 1
    lr = lr_at(last_step, cfg.train.epochs * run.steps_per_epoch, run.steps_per_epoch, cfg.optim)
    return {
        "epoch": epoch + 1,
        "train_loss": train_m["train_loss"],
        "train_acc": train_m["train_acc"],
        **test_m,
        "lr": lr * run.guard.lr_scale,
        "images_per_sec": train_m["images_per_sec"],
        "epoch_seconds": train_m["train_seconds"] + time.perf_counter() - start,
        "world_size": run.ctx.world_size,
    }


def _write_outputs(run: Run) -> None:
    if not run.ctx.is_main:
        return
    _write_text(run.out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in run.history))
    from ..plots import curves

    smoothing = run.cfg.optim.label_smoothing
    note = f"label smoothing {smoothing:g}" if smoothing else ""
    curves(run.history, run.out / "curves.png", f"{run.cfg.name}: {run.cfg.model.name}", note)


def _summary(run: Run, wall: float) -> dict:
    last = run.history[-1] if run.history else {}
    return {
        "name": run.cfg.name,
        "model": run.cfg.model.name,
        "params": run.meta["params"],
        "epochs": run.epoch,
        "test_acc": last.get("test_acc"),
        "test_loss": last.get("test_loss"),
        "train_acc": last.get("train_acc"),
        "train_loss": last.get("train_loss"),
        "best_test_acc": max((h["test_acc"] for h in run.history), default=None),
        "wall_seconds": wall,
        "train_seconds": sum(h["epoch_seconds"] for h in run.history),
        "device": str(run.device),
        "precision": run.precision,
        "world_size": run.ctx.world_size,
        "torch": torch.__version__,
        "guard_events": run.guard.events,
    }


__all__ = [
    "Interrupted",
    "Run",
    "evaluate",
    "fit",
    "predict_logits",
    "prepare",
    "train_one_epoch",
    "train_step",
]
