"""The training loop: fit() runs epochs of train_one_epoch() then evaluate() (steps.py) on a Run (run.py).

Each epoch puts the model in train mode, trains, then evaluates in eval mode without gradients: the seed
notebook never switched back to train mode, froze BatchNorm and went NaN. The run directory holds
config.yaml, metrics.jsonl, summary.json, last.pt, best.pt and curves.png (README, "The run directory").
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import config as config_mod
from .. import faults, files
from ..config import Config
from ..errors import ReslabError
from ..history import CROWDED, best_by_val, epoch_line, n_epochs, tested
from ..lock import lock_dir
from . import checkpoint, dist, guard
from .host import cpu_threads, cpu_wait_seconds, crowded_warning, wait_share
from .precision import memory_format
from .run import (
    SHARED,
    Run,
    prepare,
    prime_buckets,
    restore,
    restore_training_state,
    save,
    snapshot,
    state_of,
)
from .schedule import lr_at
from .steps import check_steps, evaluate, loss_fn, train_step

# what a run writes; diverged.json only when the guard gave up, for `reslab runs` to say so
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "curves.png", "diverged.json")
CURVES_EVERY = 30.0  # seconds between drawings of curves.png (0.2-0.3 s each); a run's end always draws


class Interrupted(ReslabError):
    """Ctrl-C, SIGTERM (a scheduler's notice) or SIGHUP (the terminal closed): a resumable checkpoint was saved.
    Exits with 128 + the signal."""

    def __init__(self, signum: int, out: Path, again: str = ""):
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}; saved {out / 'last.pt'}; "
            f"continue with: {again or f'fit(cfg, {str(out)!r}, resume=True)'}"
        )
        self.signum, self.out, self.exit_code = signum, out, 128 + signum
        self.every_rank = False  # the ranks stop together, at the same step


def stop_signals() -> tuple[int, ...]:
    """The signals that stop a run with a checkpoint: Ctrl-C's SIGINT, a scheduler's SIGTERM, and the SIGHUP of a
    closed terminal or ssh session (whose default ends the run where it is) unless the run ignores it, as under
    nohup. Python lets the main thread alone set handlers: fit() in another thread (a server's, an app's) keeps
    the main thread's."""
    if threading.current_thread() is not threading.main_thread():
        return ()
    stops = (signal.SIGINT, signal.SIGTERM)
    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    if hangup is None or signal.getsignal(hangup) == signal.SIG_IGN:
        return stops
    return (*stops, hangup)


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
    clip, sums = run.cfg.optim.grad_clip, run.sums
    for (_, images, _), (loss, norm, correct) in zip(pending, rows):
        sums[0] += loss * images
        sums[1] += correct
        sums[2] += images
        if math.isfinite(norm):  # fp16: a step the gradient scaler skipped has an infinite norm
            sums[4] += norm
            sums[5] += 1
            sums[6] = max(sums[6], norm)
            sums[7] += 0 < clip < norm


def train_one_epoch(run: Run, epoch: int, on_step=None) -> dict:
    """One pass over the training data from batch `run.batch` on; returns the epoch's training metrics.

    Training loss is the mean per-example loss over the epoch's batches, accuracy over the same examples.
    """
    cfg, loader = run.cfg, run.train_loader
    run.net.train()  # every epoch: evaluate() switched to eval mode
    loader.set_epoch(epoch)
    criterion = loss_fn(cfg.optim.label_smoothing)
    total = cfg.train.epochs * run.steps_per_epoch
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    mem = memory_format(cfg.train.channels_last)
    show = not run.quiet and run.ctx.is_main and sys.stderr.isatty()
    bar = tqdm(total=len(loader), initial=run.batch, desc=f"epoch {epoch + 1}", leave=False, disable=not show)
    start, waited = time.perf_counter(), cpu_wait_seconds() if run.device.type == "cpu" else None
    for b, (x, y) in enumerate(loader.batches(run.batch), run.batch):
        step = epoch * run.steps_per_epoch + b
        lr = lr_at(step, total, run.steps_per_epoch, cfg.optim) * run.guard.lr_scale
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x = faults.poison(step, x.contiguous(memory_format=mem), len(run.guard.events))
        if cfg.train.compile:  # a new iteration: CUDA graphs may reuse the last step's memory
            torch.compiler.cudagraph_mark_step_begin()
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
            accum=cfg.train.accum_steps,
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
    if waited is not None and (now := cpu_wait_seconds()) is not None:
        run.sums[8] += max(now - waited, 0.0)  # a thread that ended took its waits with it
    bar.close()
    loss_sum, correct, count = dist.all_reduce_sum(run.sums[:SHARED], run.device, run.ctx)
    # the gradient norm is the same on every rank; the waits are this rank's
    seconds, norm_sum, norms, norm_max, clipped, wait = run.sums[SHARED:]
    metrics = {
        "train_loss": loss_sum / count,
        "train_acc": correct / count,
        "images_per_sec": count / max(seconds, 1e-9),
        "train_seconds": seconds,
    }
    if waited is not None:  # seconds the threads spent ready to run but kept off a CPU, summed over them
        metrics["cpu_wait_seconds"] = wait
    if norms:
        metrics |= {"grad_norm": norm_sum / norms, "grad_norm_max": norm_max}
        if cfg.optim.grad_clip > 0:
            metrics["clipped"] = clipped / norms
    return metrics


# ------------------------------------------------------------------------------------------- the run
def _log(run: Run, line: str, err: bool = False) -> None:
    if run.ctx.is_main:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def fit(
    cfg: Config,
    out: str | Path,
    resume: bool = False,
    quiet: bool = False,
    on_step=None,
    overwrite: bool = False,
) -> dict:
    """Train `cfg` into the run directory `out`; with resume, continue from out/last.pt. A directory that holds
    a run already is refused unless `overwrite` (then its files are replaced). Returns the summary."""
    if not isinstance(cfg, Config):
        raise TypeError(f"fit: cfg must be a reslab Config (reslab.config.load), not {type(cfg).__name__}")
    if resume and overwrite:
        raise ReslabError("resume and overwrite: continue the run, or replace it, not both")
    out = Path(out)
    # checked on every rank and before the data loads; make_dir below reports the other failures
    if out.exists() and not out.is_dir():
        raise ReslabError(f"run directory {out} is a file; choose another --out")
    if not resume and not overwrite and (out / "last.pt").exists():
        raise ReslabError(
            f"{out} already holds a run; continue it with --resume, replace it with --overwrite, "
            "or choose another --out"
        )
    wall_start = time.perf_counter()
    resuming = resume and (out / "last.pt").exists()
    run = prepare(cfg, out, quiet, warm=not resuming)
    state = checkpoint.load(out / "last.pt", resume=True) if resuming else None
    if resume and state is None:  # stopped before its first checkpoint
        _log(run, f"no checkpoint in {out} yet: starting at epoch 1")
    if state is not None:
        changed = config_mod.changes(state["config"], cfg.to_dict())
        _refuse_changes(run, changed, state, out)
        try:
            restore(run, state)
        except checkpoint.CheckpointError as e:  # restore knows the state, not the file it came from
            raise checkpoint.CheckpointError(f"{out / 'last.pt'}: {e}") from None
        if run.epoch >= cfg.train.epochs:
            if (out / "summary.json").exists():  # a finished run stays as it was: its config, its summary
                _log(run, f"{out} already finished {n_epochs(run.epoch)}; raise train.epochs to train on")
                return json.loads((out / "summary.json").read_text())
            if run.epoch > cfg.train.epochs:  # its summary and config.yaml would say fewer than it holds
                raise ReslabError(
                    f"{out / 'last.pt'} has trained {n_epochs(run.epoch)} already: train.epochs {cfg.train.epochs} "
                    f"would end the run before them; resume with {run.epoch} or more"
                )
            _log(run, f"{out} trained its {n_epochs(run.epoch)} but stopped before its summary: writing it")
        _say_changes(run, changed)
    # the run holds copies of what it needs (a mid-epoch checkpoint's epoch_start itself): the rest is let go,
    # or it would stay in memory all run long (466 MB of weights and EMA for resnet152)
    restored, state = state is not None, None
    if run.ctx.is_main:
        files.make_dir(out)
    with lock_dir(out) if run.ctx.is_main else contextlib.nullcontext():
        if run.ctx.is_main:
            if overwrite and not restored:  # the old run goes whole: no old last.pt for a later --resume
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
            for name in ("config.yaml", *RUN_FILES):  # with the lock held, no one else writes these
                files.remove_temp_files(out / name)
            (out / "diverged.json").unlink(missing_ok=True)  # a resume tries again
            files.write_text(out / "config.yaml", config_mod.dump(cfg))
        _epochs(run, out, resumed=restored, on_step=on_step)
        summary = _summary(run, time.perf_counter() - wall_start)
        if run.ctx.is_main:
            files.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _refuse_changes(run: Run, changed: dict, state: dict, out: Path) -> None:
    """Refuse, before anything is restored, the changes a resume of checkpoint `state` cannot make: another
    optimiser or model than the one it holds, or, stopped midway through an epoch, what decides its batches."""
    last = out / "last.pt"
    again = f"resume with the run's own, or start a new run from its weights with --set model.init={out}"
    if "optim.name" in changed:
        old, new = changed["optim.name"]
        raise ReslabError(f"{last} holds the state of optim.name {old!r}, not {new!r}: {again}")
    model = {k: v for k, v in changed.items() if k.startswith("model.") and k != "model.init"}
    if model and (why := checkpoint.misfit(run.model.state_dict(), state["model"])):
        said = ", ".join(f"{k} {a!r}, now {b!r}" for k, (a, b) in model.items())
        raise ReslabError(f"{last} does not fit the model of these settings ({said}): {why}; {again}")
    order = [k for k in ("seed", "data.limit", "data.val", "train.batch_size") if k in changed]
    if state["batch"] and order:
        raise ReslabError(
            f"{last} stopped at batch {state['batch']} of epoch {state['epoch'] + 1}, whose batches follow "
            f"{', '.join(order)}; resume with the run's own value to finish that epoch, then change it"
        )


def _say_changes(run: Run, changed: dict) -> None:
    """Say which settings a resume changes."""
    if changed:
        _log(
            run, "resuming with changes: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        )
    if "model.init" in changed:
        _log(run, "model.init starts a new run only: the resume goes on from its own checkpoint's weights")


def _epochs(run: Run, out: Path, resumed: bool, on_step) -> None:
    """Train the epochs left of `run`, checkpointing each into `out`."""
    cfg = run.cfg
    if resumed:  # a crash may have come between last.pt and the files after it: rewrite them from its history
        _write_outputs(run, draw=run.epoch >= cfg.train.epochs)
        if run.epoch >= cfg.train.epochs:
            return
        if run.ctx.active:
            prime_buckets(run)
    loaders = [(run.train_loader, "train"), (run.val_loader, "validation"), (run.test_loader, "test")]
    images = " / ".join(f"{loader.num_examples} {name}" for loader, name in loaders if loader is not None)
    _log(
        run,
        f"reslab: {cfg.model.name} ({run.meta['params'] / 1e6:.2f}M params) on {run.device.type}"
        f"{f' x{run.ctx.world_size}' if run.ctx.active else ''}"
        f"{f' ({cpu_threads()})' if run.device.type == 'cpu' else ''}, {run.precision}, "
        f"{images} images, {n_epochs(cfg.train.epochs)} -> {out}"
        + (f" (resumed at epoch {run.epoch + 1})" if resumed else ""),
    )
    if run.init:
        _log(run, run.init)

    asked = 0  # the signal this process received; run.interrupted: the one every rank agreed to stop for

    def agree() -> None:
        """Under torchrun, each rank's signal arrives at its own moment: the ranks stop at the same step, and
        write the checkpoint together, when any of them was asked. Called at the same steps on every rank."""
        run.interrupted = dist.all_reduce_max(asked, run.device, run.ctx)

    def step_hook(r: Run) -> None:
        if not r.ctx.active or r.batch % r.guard_every == 0:  # a GPU's ranks agree every guard_every steps
            agree()
        every = cfg.train.checkpoint_every
        if (every and r.batch % every == 0 and r.batch < r.steps_per_epoch) or r.interrupted:
            settle(r)  # checked numbers only: a checkpoint never holds an unchecked step
            save(r, "last.pt")
        if r.interrupted:
            raise Interrupted(r.interrupted, out, again)
        if on_step is not None:
            on_step(r)

    def on_signal(signum, frame):
        nonlocal asked
        if asked:
            # Under torchrun a second signal is torchrun's own: it passes on the Ctrl-C its workers received too,
            # and kills what has not left 30 s later. Alone, the user asked twice: stop now (the files on disk are
            # whole: every write is atomic).
            if run.ctx.active:
                return
            raise KeyboardInterrupt
        asked = signum  # the run stops after this step (under torchrun, the step the ranks agree on)

    again = "the same torchrun command, its fit(..., resume=True)" if run.ctx.active else ""
    previous = {s: signal.signal(s, on_signal) for s in stop_signals()}
    faults.reached("start")
    chosen_by = selection(run)
    best = max((h[chosen_by] for h in run.history if chosen_by in h), default=-1.0)
    warned_crowded = False
    drawn_at, undrawn = time.perf_counter(), False  # curves.png: when last drawn; tested epochs since
    try:
        while run.epoch < cfg.train.epochs:
            epoch = run.epoch
            # the guard's rollback point: the epoch's start, also for a run resumed within it (its checkpoint's)
            if run.batch and run.epoch_start is not None:
                snap = run.epoch_start
            else:
                # the last epoch's copy goes first: two at once would double what it takes at each epoch's start
                snap = run.epoch_start = None
                snap = run.epoch_start = snapshot(run)
            try:
                metrics = _train_and_evaluate(run, epoch, step_hook)
            except guard.Divergence as e:
                try:
                    said = guard.recover(run.guard, e, epoch, cfg.train.max_retries)
                except guard.DivergenceError as error:
                    # for `reslab runs`: a disk that refuses it must not hide the divergence
                    if run.ctx.is_main:
                        with contextlib.suppress(OSError):
                            gave_up = {"epoch": epoch + 1, "error": str(error)}
                            files.write_text(out / "diverged.json", json.dumps(gave_up) + "\n")
                    raise
                _log(run, said, err=True)
                restore_training_state(run, snap)
                continue
            run.guard.retries = 0
            run.history.append(metrics)
            run.finish_epoch()
            agree()  # a signal during the evaluation
            saved = state_of(run)
            # best.pt before last.pt: a crash between them replays this epoch, which writes best.pt again; the
            # other way round the resumed run would count this epoch's accuracy as best and never write it
            if metrics.get(chosen_by, -1.0) > best:
                best = metrics[chosen_by]
                save(run, "best.pt", {k: v for k, v in saved.items() if k != "optimizer"})
            if _due(run.epoch, cfg.train.save_every, cfg.train.epochs) or run.interrupted:
                save(run, "last.pt", saved)
                faults.reached("after-checkpoint")
            undrawn |= "test_acc" in metrics
            last = run.epoch == cfg.train.epochs or run.interrupted
            draw = undrawn and (last or time.perf_counter() - drawn_at >= CURVES_EVERY)
            _write_outputs(run, draw)
            if draw:
                drawn_at, undrawn = time.perf_counter(), False
            _log(run, epoch_line(metrics, cfg.train.epochs, run.history))
            if not warned_crowded and metrics.get("cpu_wait", 0.0) >= CROWDED:
                warned_crowded = True
                _log(run, crowded_warning(metrics), err=True)
            faults.reached("epoch-end")
            if run.interrupted:
                raise Interrupted(run.interrupted, out, again)
    finally:
        if undrawn:  # stopped by an error or a signal: the picture still shows every tested epoch
            with contextlib.suppress(Exception):
                _write_outputs(run, draw=True)
        # after the drawing (0.2-0.3 s): under torchrun, a signal that came then, once this rank had saved (the
        # agent of another machine that lost torchrun's store stops its ranks), killed it before it said so
        for s, handler in previous.items():
            signal.signal(s, handler)


def _due(done: int, every: int, epochs: int) -> bool:
    """Whether what a run does every `every` epochs and after its last of `epochs` (test, write last.pt) is due
    once `done` epochs are done."""
    return done % every == 0 or done == epochs


def selection(run: Run) -> str:
    """The metric best.pt is chosen on: the held-out training images' accuracy with data.val, else the test's."""
    return "val_acc" if run.val_loader is not None else "test_acc"


def _train_and_evaluate(run: Run, epoch: int, step_hook) -> dict:
    """One epoch of training then, every train.eval_every epochs and after the last, evaluation; the epoch's
    metrics. Raises guard.Divergence."""
    cfg = run.cfg
    train_m = train_one_epoch(run, epoch, step_hook)
    eval_model = run.ema.model if run.ema is not None else run.eval_net
    start, waited = time.perf_counter(), cpu_wait_seconds() if "cpu_wait_seconds" in train_m else None
    test_m = {}
    if _due(epoch + 1, cfg.train.eval_every, cfg.train.epochs):
        views = cfg.train.tta_flip, cfg.train.channels_last, run.ctx, cfg.train.tta_shift
        step = (epoch + 1) * run.steps_per_epoch
        test_m = evaluate(eval_model, run.test_loader, run.device, run.precision, *views)
        guard.check(test_m["test_loss"], "test loss", step)
        if run.val_loader is not None:
            val = evaluate(eval_model, run.val_loader, run.device, run.precision, *views)
            guard.check(val["test_loss"], "validation loss", step)
            test_m |= {"val_loss": val["test_loss"], "val_acc": val["test_acc"]}
    seconds, wait = train_m["train_seconds"] + time.perf_counter() - start, {}
    if waited is not None and (now := cpu_wait_seconds()) is not None:
        # the share of the threads' time in the whole epoch, training and testing, spent waiting for a CPU
        wait["cpu_wait"] = wait_share(train_m["cpu_wait_seconds"] + max(now - waited, 0.0), seconds)
    last_step = (epoch + 1) * run.steps_per_epoch - 1
    lr = lr_at(last_step, cfg.train.epochs * run.steps_per_epoch, run.steps_per_epoch, cfg.optim)
    return {
        "epoch": epoch + 1,
        "train_loss": train_m["train_loss"],
        "train_acc": train_m["train_acc"],
        **test_m,
        "lr": lr * run.guard.lr_scale,
        "images_per_sec": train_m["images_per_sec"],
        "epoch_seconds": seconds,
        "world_size": run.ctx.world_size,
        **{k: train_m[k] for k in ("grad_norm", "grad_norm_max", "clipped") if k in train_m},
        **wait,
    }


def _write_outputs(run: Run, draw: bool) -> None:
    """metrics.jsonl, and with `draw` curves.png (~0.2 s a picture: drawn every CURVES_EVERY seconds)."""
    if not run.ctx.is_main:
        return
    files.write_text(run.out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in run.history))
    if not draw:
        return
    from ..plots import curves

    smoothing = run.cfg.optim.label_smoothing
    note = f"label smoothing {smoothing:g}" if smoothing else ""
    curves(run.history, run.out / "curves.png", f"{run.cfg.name}: {run.cfg.model.name}", note)


def _val_summary(run: Run, last: dict) -> dict:
    """With data.val: the last tested epoch's validation metrics and best_by_val's choice."""
    if run.val_loader is None:
        return {}
    chosen = dict.fromkeys(("best_val_acc", "best_epoch", "test_acc_at_best_val")) | best_by_val(run.history)
    return {"val_acc": last.get("val_acc"), "val_loss": last.get("val_loss"), **chosen}


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
        "best_test_acc": max((h["test_acc"] for h in tested(run.history)), default=None),
        **_val_summary(run, last),
        "wall_seconds": wall,
        "train_seconds": sum(h["epoch_seconds"] for h in run.history),
        "device": str(run.device),
        "precision": run.precision,
        "world_size": run.ctx.world_size,
        "torch": torch.__version__,
        "guard_events": run.guard.events,
    }


__all__ = ["Interrupted", "fit", "settle", "train_one_epoch"]
