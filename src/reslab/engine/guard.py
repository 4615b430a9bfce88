"""Divergence guard: a non-finite loss or gradient never reaches a checkpoint, an evaluation or the metrics.

The host reads each step's loss and gradient norm: on the CPU before the update, so they never reach the
weights; on a GPU every `train.guard_every` steps (reading waits for the device) and before every checkpoint.
The engine catches `Divergence` raised inside an epoch, restores the state of the epoch's start (weights,
optimiser, EMA), halves the learning rate and runs the epoch again; after `max_retries` failed tries it
gives up with `DivergenceError` (exit code 3). The guard's state is part of every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import ReslabError


class Divergence(Exception):
    """A non-finite loss, gradient norm or metric at some step."""


class DivergenceError(ReslabError):
    """Training diverged even after the guard's retries."""

    exit_code = 3


@dataclass
class GuardState:
    lr_scale: float = 1.0  # multiplier on the schedule's lr; halved at each recovery
    retries: int = 0  # failed tries of the current epoch
    events: list[dict] = field(default_factory=list)  # every recovery: epoch, step, what, new lr_scale

    def to_dict(self) -> dict:
        return asdict(self)


def check(value: float, what: str, step: int) -> None:
    if not math.isfinite(value):
        raise Divergence(f"non-finite {what} ({value}) at step {step}")


def recover(guard: GuardState, error: Divergence, epoch: int, max_retries: int) -> str:
    """Record one failure; return the warning line, or raise DivergenceError when out of tries."""
    guard.retries += 1
    if guard.retries > max_retries:
        raise DivergenceError(
            f"training diverged in epoch {epoch + 1} ({error}) after {max_retries} retries with the learning "
            f"rate halved each time (now x{guard.lr_scale:g}); lower optim.lr or add optim.warmup_epochs"
        )
    guard.lr_scale *= 0.5
    guard.events.append({"epoch": epoch + 1, "what": str(error), "lr_scale": guard.lr_scale})
    return (
        f"warning: {error} in epoch {epoch + 1}; restored the epoch's starting state, learning rate x"
        f"{guard.lr_scale:g}, try {guard.retries}/{max_retries}"
    )
