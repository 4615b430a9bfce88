"""What a run's history (its metrics.jsonl: one dict per finished epoch) says: the epoch lines a run prints, the
time it has to go, the epochs it tested, the one data.val chose, whether other processes crowded an epoch, and
whether an epoch's metrics are what reslab writes. Free of torch, like lock.py, so that `reslab runs` starts at
once."""

from __future__ import annotations

import math
import statistics

# the share of its threads' time an epoch on the CPU may spend waiting for a CPU before the run warns: alone it is
# under 1% (two torchrun ranks on two cores: 8-11%); beside one or two CPU-bound processes, 49-57%, and the
# epochs take 3-14x as long; 2 threads under a 1-CPU quota, 32-37% (BENCHMARKS.md)
CROWDED = 0.2

EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "epoch_seconds")  # in every epoch's metrics, tested or not
# keys an epoch has both of or neither: its test, its validation (data.val), its gradient norms
PAIRED_KEYS = (("test_loss", "test_acc"), ("val_loss", "val_acc"), ("grad_norm", "grad_norm_max"))


def finite(value: object) -> bool:
    """A real number, not a bool, neither NaN nor infinite."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def epoch_fault(h: object, epoch: int) -> str | None:
    """What makes `h` other than the metrics of epoch `epoch` as reslab writes them (a dict of finite numbers with
    EPOCH_KEYS and PAIRED_KEYS in pairs), in a phrase for an error line; None where it is them. A line of
    metrics.jsonl, or an entry of a checkpoint's history, edited by hand or damaged."""
    if not isinstance(h, dict):
        return "not an epoch's metrics (a JSON object)"
    missing = [k for k in EPOCH_KEYS if k not in h]
    missing += [k for pair in PAIRED_KEYS if any(p in h for p in pair) for k in pair if k not in h]
    if missing:
        return f"lacks {', '.join(missing)}"
    if wrong := [str(k) for k, v in h.items() if not finite(v)]:
        return f"{', '.join(wrong)} not a finite number"
    if h["epoch"] != epoch:
        return f"epoch {h['epoch']}, where epoch {epoch} comes"
    return None


def n_epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def epoch_line(m: dict, epochs: int, history: list[dict] = ()) -> str:
    test = (
        f"test loss {m['test_loss']:.4f} acc {m['test_acc']:.4f}" if "test_acc" in m else f"{'not tested':27}"
    )
    if "val_acc" in m:
        test = f"val acc {m['val_acc']:.4f}  {test}"
    line = (
        f"epoch {m['epoch']:>3}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}  "
        f"{test}  lr {m['lr']:.4g}  "
        f"{m['images_per_sec']:,.0f} img/s  {m['epoch_seconds']:.1f} s"
    )
    if left := time_to_go(history, epochs):
        line += f"  {left} to go"
    return line


def time_to_go(history: list[dict], epochs: int) -> str | None:
    """Roughly how long a run of `epochs` has left after the epochs of `history` (None when none are done, or
    all): the median of the last epochs' seconds, so that a compiling first epoch (33 s of wrn.yaml's, then 1.4 s
    on an H200) or a tested one among untested ones does not set the pace."""
    left = epochs - len(history)
    if not history or left <= 0:
        return None
    return duration(left * statistics.median(h["epoch_seconds"] for h in history[-5:]))


def duration(seconds: float) -> str:
    """A rough length of time: 0.6 s, 40 s, 12 min, 3 h 05 min."""
    if seconds < 90:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def best_by_val(history: list[dict]) -> dict:
    """The epoch data.val chose (best.pt's): its validation accuracy, its number and its test accuracy, the figure a
    held-out choice reports; {} for a history without validation."""
    held_out = [h for h in history if "val_acc" in h]
    if not held_out:
        return {}
    best = max(held_out, key=lambda h: h["val_acc"])
    return {
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "test_acc_at_best_val": best["test_acc"],
    }


def tested(history: list[dict]) -> list[dict]:
    """The epochs that were evaluated: with train.eval_every > 1 the others have no test_loss and test_acc."""
    return [h for h in history if "test_acc" in h]


__all__ = [
    "CROWDED",
    "best_by_val",
    "duration",
    "epoch_fault",
    "epoch_line",
    "finite",
    "n_epochs",
    "tested",
    "time_to_go",
]
