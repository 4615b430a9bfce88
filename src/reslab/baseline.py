"""The seed notebook's own code (benchmarks/seed_baseline.py: its ResNet-18, a torch DataLoader with per-image PIL
resizing, eager fp32) against `reslab train --config seed.yaml` on the same images, each timed as a whole process
with its peak memory: `reslab bench`'s baseline."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .config import RECIPES

CPU = torch.device("cpu")


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
            raise RuntimeError(f"{' '.join(cmd)} failed: {err.read().strip().splitlines()[-1:]}")
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
    ours = [
        sys.executable,
        "-m",
        "reslab",
        "train",
        "--config",
        str(RECIPES / "seed.yaml"),  # the package's own recipe, wherever this runs
        "--quiet",
        "--set",
        f"data.limit={limit}",
        f"train.epochs={epochs}",
        f"device={device.type}",
    ]
    seed_runs, ours_runs = [], []
    with tempfile.TemporaryDirectory(prefix="reslab-bench-seed-") as runs:
        for r in range(rounds):
            seed_runs.append(timed_process(baseline))
            ours_runs.append(timed_process([*ours, "--out", f"{runs}/{r}"]))
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
