"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import bisect
import math

from ..config import OptimConfig


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of `total_steps` steps."""
    # 1) linear warm-up from 0 to the peak over warmup_epochs
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    # 2) then the decay, as a function of the progress through the remaining steps
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        # milestones are fractions of the whole run; each one passed multiplies by gamma
        return cfg.lr * cfg.gamma ** bisect.bisect_right(cfg.milestones, step / max(1, total_steps))
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "onecycle":
        # the triangle of Smith's one-cycle: up during warm-up, then linearly down to zero
        return cfg.lr * (1 - progress)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
