"""Fault injection for the reliability tests: `RESLAB_KILL_AT=point:n` sends SIGKILL to this process the n-th
time execution passes `point` (start, step, eval, checkpoint-write, after-checkpoint, epoch-end). Unset, as
always outside the tests, `reached()` costs one dictionary lookup."""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}
_target = os.environ.get("RESLAB_KILL_AT", "")


def reached(point: str) -> None:
    if not _target:
        return
    name, _, n = _target.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
