"""Time to accuracy: the default recipe (configs/fast.yaml) against the seed recipe (configs/seed.yaml, the
notebook's) under the same wall-clock budget, each a whole `reslab train` process on the full data.

fast.yaml runs to its end, and its wall time is the budget (or --budget). The seed recipe then trains for that long
and is stopped as a job scheduler stops a job: SIGTERM, after which the run finishes its current step, saves
last.pt and exits. That checkpoint is evaluated on the full test set with `reslab eval` (its time, and the seconds
the run takes to stop, are not charged to the seed recipe). For each recipe the JSON lists the epochs that ended,
with the seconds of training and testing up to their end, and the seconds to the first epoch at 0.85, 0.90, 0.92
and 0.93 test accuracy.

Usage: .venv/bin/python benchmarks/time_to_accuracy.py [--budget SECONDS] [--set KEY=VALUE ...] [--out FILE]
(--set applies to both recipes: device=cpu, data.root=DIR, ...)
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reslab.engine import checkpoint
from reslab.runs import read_history
from reslab.studies.common import machine

TRAIN = [sys.executable, "-m", "reslab", "train", "--quiet"]
THRESHOLDS = (0.85, 0.9, 0.92, 0.93)


def epochs_reached(out: Path) -> list[dict]:
    """Each finished epoch's test accuracy and the seconds of training and testing up to its end."""
    history = read_history(out) if (out / "metrics.jsonl").exists() else []
    ends = itertools.accumulate(h["epoch_seconds"] for h in history)
    return [{"epoch": h["epoch"], "seconds": s, "test_acc": h.get("test_acc")} for h, s in zip(history, ends)]


def reached(out: Path) -> dict:
    """A run's finished epochs, and the seconds of training and testing to the end of the first epoch that
    reached each accuracy in THRESHOLDS (None: none did)."""
    epochs = epochs_reached(out)
    first = {t: next((e["seconds"] for e in epochs if (e["test_acc"] or 0) >= t), None) for t in THRESHOLDS}
    return {"epochs": epochs, "seconds_to": first}


def run_fast(out: Path, overrides: list[str]) -> dict:
    start = time.perf_counter()
    subprocess.run([*TRAIN, "--config", "fast", "--out", str(out), "--set", *overrides], check=True)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_seconds": wall, "test_acc": summary["test_acc"], **reached(out)}


def run_seed(out: Path, overrides: list[str], budget: float) -> dict:
    """The seed recipe stopped by SIGTERM `budget` seconds after its start, and its checkpoint evaluated."""
    start = time.perf_counter()
    proc = subprocess.Popen([*TRAIN, "--config", "seed", "--out", str(out), "--set", *overrides])
    try:
        code = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait()
    stopped = time.perf_counter() - start
    if code not in (0, 128 + signal.SIGTERM) or not (out / "last.pt").exists():
        sys.exit(
            f"time_to_accuracy: the seed recipe's run saved no checkpoint (exit {code}): a budget too short?"
        )
    state = checkpoint.load(out / "last.pt")
    evaluated = subprocess.run(
        [sys.executable, "-m", "reslab", "eval", str(out / "last.pt"), "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return {
        "exit_code": code,
        "stopped_after_seconds": stopped,
        "epochs_done": state["epoch"],
        "batches_into_next_epoch": state["batch"],
        "batch_size": state["config"]["train"]["batch_size"],
        "test_acc_at_budget": json.loads(evaluated.stdout)["test_acc"],
        **reached(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", type=float, help="seconds for the seed recipe (default: fast.yaml's wall time)"
    )
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reslab-tta-") as tmp:
        fast = run_fast(Path(tmp) / "fast", args.overrides)
        budget = args.budget or fast["wall_seconds"]
        seed = run_seed(Path(tmp) / "seed", args.overrides, budget)
    result = {
        "command": " ".join(sys.argv),
        "machine": machine(),
        "budget_seconds": budget,
        "fast": fast,
        "seed": seed,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
