"""Fault injection for the reliability tests, read from the environment once. Unset, as always outside the
tests, each hook costs one check of a string.

- `RESLAB_KILL_AT=point:n[:rank]` sends SIGKILL to this process the n-th time execution passes `point` (start,
  step, eval, checkpoint-write, after-checkpoint, epoch-end); under torchrun, on every rank or on the one named.
- `RESLAB_NAN_AT=s[:rank]` turns the training inputs of global step s NaN, on every rank or on the one named,
  while the run has recovered from no divergence (a state a checkpoint holds: a resumed run meets it as the run
  never stopped would): a divergence that reaches a process under torchrun, where a test cannot reach in.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}
_target = os.environ.get("RESLAB_KILL_AT", "")
_nan_at = os.environ.get("RESLAB_NAN_AT", "")


def _other_rank(rank: str) -> bool:
    """Whether a variable's optional rank names another rank than this process's ('': every rank)."""
    return bool(rank) and int(rank) != int(os.environ.get("RANK", "0"))


def reached(point: str) -> None:
    if not _target:
        return
    name, _, rest = _target.partition(":")
    n, _, rank = rest.partition(":")
    if name != point or _other_rank(rank):
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def poison(step: int, x, recovered: int):
    """The batch `x` of global step `step`, made NaN where RESLAB_NAN_AT names that step (and this rank) and the
    run has not yet recovered from a divergence (`recovered`: the guard's events so far)."""
    if not _nan_at or recovered:
        return x
    at, _, rank = _nan_at.partition(":")
    if step != int(at) or _other_rank(rank):
        return x
    return x * float("nan")
