"""Random recipes, each killed (SIGKILL) at a random point, resumed, and compared with the same recipe never
interrupted: metrics.jsonl (less its timings), last.pt's and best.pt's epoch, weights and EMA, and summary.json's
accuracies must be the same bits. Each case draws the optimiser, schedule, EMA, test-time views, the augmentations,
how often the run tests and saves, gradient clipping, warm-up, label smoothing, a validation split (data.val),
model and seed; the kill point is one of the reliability tests' (RESLAB_KILL_AT, reslab/faults.py). With --nan
each case also draws a training step whose inputs turn NaN (RESLAB_NAN_AT; under torchrun on one rank), in the
run whole and in the one killed and resumed alike, so the divergence guard's rollbacks meet the kills. Prints a
line per case, writes results.json, and exits 1 if any case differs.
Usage: .venv/bin/python benchmarks/resume_fuzz.py --out runs/resume-fuzz [--cases 20] [--seed 0] [--set ...]
           [--nproc 2]   # under torchrun, gloo ranks on the CPU
           [--nan]       # and a NaN step in each case
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch

from reslab.engine import checkpoint
from reslab.runs import read_history, without_timings

POINTS = ("step", "eval", "checkpoint-write", "after-checkpoint", "epoch-end")
BASE = ["data.limit=512", "train.batch_size=64", "train.eval_batch_size=256", "precision=fp32", "device=cpu"]


def draw(rng: random.Random) -> list[str]:
    """One recipe's overrides of fast.yaml."""
    flip = rng.choice([("false", "false"), ("true", "false"), ("true", "true")])  # data.flip, alternate_flip
    optim = rng.choice(["sgd", "adamw"])
    return [
        f"seed={rng.randrange(100)}",
        f"model.name={rng.choice(['resnet8', 'resnet14', 'plain8', 'wrn-16-4'])}",
        f"train.epochs={rng.choice([2, 3])}",
        f"optim.name={optim}",
        *(["optim.lr=0.002"] if optim == "adamw" else []),
        f"optim.schedule={rng.choice(['constant', 'step', 'cosine', 'onecycle'])}",
        f"optim.warmup_epochs={rng.choice([0, 1])}",
        f"optim.grad_clip={rng.choice([0, 1.0])}",
        f"optim.label_smoothing={rng.choice([0, 0.1])}",
        f"train.ema={rng.choice([0, 0.9])}",
        f"train.tta_flip={rng.choice(['true', 'false'])}",
        f"train.tta_shift={rng.choice([0, 1])}",
        f"data.flip={flip[0]}",
        f"data.alternate_flip={flip[1]}",
        f"data.erasing={rng.choice([0, 0.25])}",
        f"data.crop_padding={rng.choice([0, 2])}",
        f"train.save_every={rng.choice([1, 2])}",
        f"train.eval_every={rng.choice([1, 2])}",
        f"train.checkpoint_every={rng.choice([0, 3])}",
        f"data.val={rng.choice([0, 64])}",
    ]


def train(
    out: Path, args: list[str], nproc: int, kill_at: str | None = None, nan_at: str | None = None
) -> subprocess.CompletedProcess:
    """`reslab train` as a process, or under torchrun with `nproc` ranks (one thread each)."""
    env = dict(os.environ, **({"RESLAB_KILL_AT": kill_at} if kill_at else {}))
    env |= {"RESLAB_NAN_AT": nan_at} if nan_at else {}
    launch = [sys.executable, "-m"]
    if nproc > 1:
        env |= {"OMP_NUM_THREADS": "1", "RESLAB_DIST_TIMEOUT": "120"}
        launch = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
        ]
    cmd = [*launch, "reslab", "train", "--quiet", "--out", str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def was_killed(proc: subprocess.CompletedProcess) -> bool:
    """SIGKILLed: the process itself, or under torchrun a rank (torchrun then stops the others and exits 1)."""
    return proc.returncode == -signal.SIGKILL or (proc.returncode != 0 and "(exitcode: -9)" in proc.stderr)


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}, nothing on stderr"


def outcome(run: Path) -> dict:
    """What a finished run leaves that a resume must reproduce ("missing" for a file it lacks)."""
    result = {"metrics": without_timings(read_history(run))}
    for name in ("last.pt", "best.pt"):
        state = checkpoint.load(run / name) if (run / name).is_file() else None
        result[name] = (state["epoch"], state["model"], state.get("ema")) if state else "missing"
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    result["summary"] = (
        {k: summary.get(k) for k in ("test_acc", "best_test_acc", "epochs", "best_val_acc", "best_epoch")}
        if summary
        else "missing"
    )
    return result


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def case(out: Path, overrides: list[str], kill_at: str, nproc: int = 1, nan_at: str | None = None) -> dict:
    """Train `overrides` whole into out/whole, then killed at `kill_at` and resumed into out/killed; with `nan_at`
    both meet a NaN step (RESLAB_NAN_AT)."""
    row = {"overrides": overrides, "kill_at": kill_at, "nproc": nproc, "nan_at": nan_at}
    whole = train(
        out / "whole", ["--overwrite", "--config", "fast", "--set", *overrides], nproc, nan_at=nan_at
    )
    if whole.returncode:
        return row | {"result": f"error: {last_line(whole)}"}
    row["rollbacks"] = len(json.loads((out / "whole" / "summary.json").read_text())["guard_events"])
    killed = train(
        out / "killed", ["--overwrite", "--config", "fast", "--set", *overrides], nproc, kill_at, nan_at
    )
    row["killed"] = was_killed(killed)
    if killed.returncode and not row["killed"]:
        return row | {"result": f"error: {last_line(killed)}"}
    if row["killed"]:
        resumed = train(out / "killed", ["--resume"], nproc, nan_at=nan_at)
        if resumed.returncode:
            return row | {"result": f"resume failed: {last_line(resumed)}"}
    a, b = outcome(out / "whole"), outcome(out / "killed")
    differ = [k for k in a if not same(a[k], b[k])]
    return row | {"result": "same" if not differ else "differs: " + ", ".join(differ)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the runs and results.json")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="seeds the draws of recipes and kill points")
    p.add_argument("--set", nargs="*", default=[], help="overrides of every case, after the drawn ones")
    p.add_argument("--nproc", type=int, default=1, help="ranks under torchrun (gloo, one thread each)")
    p.add_argument("--nan", action="store_true", help="also draw a step whose inputs turn NaN, in every case")
    args = p.parse_args()
    rng, rows = random.Random(args.seed), []
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.cases):
        overrides = [*BASE, *draw(rng), *args.set]
        point = rng.choice(POINTS)
        kill_at = f"{point}:{rng.randint(1, 12 if point == 'step' else 2)}"
        nan_at = None
        if args.nan:  # BASE: 8 steps an epoch
            epochs = int([o for o in overrides if o.startswith("train.epochs=")][-1].partition("=")[2])
            nan_at = f"{rng.randrange(8 * epochs)}" + (
                f":{rng.randrange(args.nproc)}" if args.nproc > 1 else ""
            )
        rows.append(case(args.out / f"case{i}", overrides, kill_at, args.nproc, nan_at))
        r = rows[-1]
        how = "killed at" if r.get("killed") else "finished before" if "killed" in r else "failed before"
        nan = f", NaN at step {nan_at} ({r.get('rollbacks', '?')} rollbacks)" if nan_at else ""
        print(f"case {i}: {how} {kill_at}{nan}: {r['result']}")
        (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r for r in rows if r["result"] != "same"]
    print(f"{len(rows) - len(bad)} of {len(rows)} cases the same bits after the kill and resume")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
