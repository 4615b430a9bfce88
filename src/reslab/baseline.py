"""`reslab bench`'s baselines, each timed as whole processes: the seed notebook's own code
(benchmarks/seed_baseline.py: its ResNet-18, a torch DataLoader with per-image PIL resizing, eager fp32) against
`reslab train --config seed.yaml` on the same images, with their peak memory; and the time to accuracy of the
default recipe (fast.yaml) against the seed recipe under the same wall-clock budget."""

from __future__ import annotations

import itertools
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import RECIPES
from .engine import checkpoint
from .errors import ReslabError
from .runs import read_history

CPU = torch.device("cpu")


def _train(recipe: str, out: Path, overrides: list[str]) -> list[str]:
    """The command of a `reslab train` process of the package's own `recipe` (wherever this runs) into `out`."""
    train = [sys.executable, "-m", "reslab", "train", "--quiet"]
    return [*train, "--config", str(RECIPES / f"{recipe}.yaml"), "--out", str(out), "--set", *overrides]


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["?"])[-1]


# Runs argv[2:] and writes its wall seconds and peak RSS to the file argv[1]. The measured process must start
# from a small one: Linux seeds a new process's peak RSS with its parent's at exec, so a process started straight
# from the benchmark (gigabytes after its own measurements) would report the benchmark's peak, not its own.
_MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[2:])
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": seconds, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
sys.exit(code)
"""


def timed_process(cmd: list[str]) -> tuple[float, str, float]:
    """(wall seconds, stdout, peak RSS in MB of its largest process) of a whole process."""
    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r") as numbers,
    ):
        code = subprocess.call([sys.executable, "-c", _MEASURE, numbers.name, *cmd], stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {_last_line(err.read())}")
        measured = json.load(numbers)
        return measured["seconds"], out.read(), measured["maxrss_kb"] / 1024


def seed_vs_reslab(
    limit: int = 2560, epochs: int = 1, workers: int = 4, device: torch.device = CPU, rounds: int = 1
) -> dict:
    """The notebook's code (benchmarks/seed_baseline.py) against `reslab train --config configs/seed.yaml`,
    each as a whole process on the same first `limit` images and the same device (the notebook's d2l code
    trains on the GPU when there is one). With rounds > 1 the two alternate, and the times and the ratio are
    medians over the rounds (the ratio: of each round's pair, run back to back)."""
    root = Path(__file__).resolve().parents[2]
    baseline = [
        sys.executable,
        str(root / "benchmarks" / "seed_baseline.py"),
        "--limit",
        str(limit),
        "--epochs",
        str(epochs),
        "--workers",
        str(workers),
        "--device",
        device.type,
    ]
    ours = [f"data.limit={limit}", f"train.epochs={epochs}", f"device={device.type}"]
    seed_runs, ours_runs = [], []
    with tempfile.TemporaryDirectory(prefix="reslab-bench-seed-") as runs:
        for r in range(rounds):
            seed_runs.append(timed_process(baseline))
            ours_runs.append(timed_process(_train("seed", Path(runs) / str(r), ours)))
    seed_acc = json.loads(seed_runs[-1][1].strip().splitlines()[-1])["history"][-1]["test_acc"]
    match = re.search(r"test acc (\d\.\d+)", ours_runs[-1][1])
    return {
        "images": limit,
        "epochs": epochs,
        "rounds": rounds,
        "seed_notebook_seconds": statistics.median(r[0] for r in seed_runs),
        "reslab_seconds": statistics.median(r[0] for r in ours_runs),
        "speedup": statistics.median(a[0] / b[0] for a, b in zip(seed_runs, ours_runs)),
        "seed_notebook_runs_s": [r[0] for r in seed_runs],
        "reslab_runs_s": [r[0] for r in ours_runs],
        "seed_notebook_peak_rss_mb": max(r[2] for r in seed_runs),
        "reslab_peak_rss_mb": max(r[2] for r in ours_runs),
        "seed_notebook_test_acc": seed_acc,
        "reslab_test_acc": float(match.group(1)) if match else None,
    }


THRESHOLDS = (0.85, 0.9, 0.92, 0.93)  # test accuracies whose time to reach time_to_accuracy reports


def _reached(out: Path) -> dict:
    """A run's finished epochs (test accuracy, and the seconds of training and testing to its end), and the
    seconds to the end of the first epoch that reached each accuracy in THRESHOLDS (None: none did)."""
    history = read_history(out) if (out / "metrics.jsonl").exists() else []
    ends = itertools.accumulate(h["epoch_seconds"] for h in history)
    epochs = [
        {"epoch": h["epoch"], "seconds": s, "test_acc": h.get("test_acc")} for h, s in zip(history, ends)
    ]
    first = {t: next((e["seconds"] for e in epochs if (e["test_acc"] or 0) >= t), None) for t in THRESHOLDS}
    return {"epochs": epochs, "seconds_to": first}


def time_to_accuracy(
    overrides: list[str] = (), budget: float | None = None, device: torch.device | None = None
) -> dict:
    """fast.yaml against the seed recipe under the same wall-clock budget, each a whole `reslab train` process (on
    the full data, unless `overrides`, added to both, say otherwise). fast.yaml runs to its end, and its wall time
    is the budget (or `budget`). The seed recipe then trains for that long and is stopped as a job scheduler stops
    a job: SIGTERM, after which the run finishes its step, saves last.pt and exits; that checkpoint is evaluated on
    the test set with `reslab eval` (its time, and the seconds the run takes to stop, are not charged to it).
    `device`: where both train (default: the recipes' own, a GPU where there is one)."""
    overrides = [*overrides, *([f"device={device.type}"] if device is not None else [])]
    with tempfile.TemporaryDirectory(prefix="reslab-time-to-accuracy-") as tmp:
        fast_out, seed_out = Path(tmp) / "fast", Path(tmp) / "seed"
        start = time.perf_counter()
        done = subprocess.run(_train("fast", fast_out, overrides), capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            raise ReslabError(f"fast.yaml's run failed: {_last_line(done.stderr)}")
        budget = budget or wall
        start = time.perf_counter()
        proc = subprocess.Popen(_train("seed", seed_out, overrides), stdout=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait()
        stopped = time.perf_counter() - start
        if code not in (0, 128 + signal.SIGTERM) or not (seed_out / "last.pt").exists():
            raise ReslabError(f"the seed recipe's run saved no checkpoint in {budget:.0f} s (exit {code})")
        state = checkpoint.load(seed_out / "last.pt")
        evaluated = subprocess.run(
            [sys.executable, "-m", "reslab", "eval", str(seed_out / "last.pt"), "--json"],
            capture_output=True,
            text=True,
        )
        if evaluated.returncode:
            raise ReslabError(
                f"evaluating the seed recipe's checkpoint failed: {_last_line(evaluated.stderr)}"
            )
        fast = json.loads((fast_out / "summary.json").read_text())
        return {
            "budget_seconds": budget,
            "fast": {"wall_seconds": wall, "test_acc": fast["test_acc"], **_reached(fast_out)},
            "seed": {
                "exit_code": code,
                "stopped_after_seconds": stopped,
                "epochs_done": state["epoch"],
                "batches_into_next_epoch": state["batch"],
                "batch_size": state["config"]["train"]["batch_size"],
                "test_acc_at_budget": json.loads(evaluated.stdout)["test_acc"],
                **_reached(seed_out),
            },
        }
