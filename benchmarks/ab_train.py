"""Whole `reslab train` processes of this working tree against another commit's, alternating round by round: the
start-up and end-to-end changes a step benchmark misses. Prints each round's times, the medians, the median of
the rounds' paired differences, and whether the two runs' metrics agree to the last digit.

Usage: .venv/bin/python benchmarks/ab_train.py --before REV [--rounds 5] [--config configs/seed.yaml]
           [--set data.limit=256 train.epochs=1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(src: Path, args: list[str], out: Path, env: dict | None = None) -> tuple[float, list[dict]]:
    """Seconds of one `python -m reslab train` process importing reslab from `src`, with `env` added to this
    process's environment, and its metrics."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(src)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "reslab", "train", *args, "--quiet", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(
            f"{Path(sys.argv[0]).stem}: reslab train from {src} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
        )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return seconds, metrics


def same_numbers(a: list[dict], b: list[dict]) -> bool:
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    return [[m[k] for k in keys] for m in a] == [[m[k] for k in keys] for m in b]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare against (any git revision)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", default=str(ROOT / "configs" / "seed.yaml"))
    parser.add_argument("--set", nargs="*", default=["data.limit=256", "train.epochs=1"], dest="overrides")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()

    train_args = ["--config", str(Path(args.config).resolve()), "--set", *args.overrides]
    with tempfile.TemporaryDirectory(prefix="reslab-ab-") as tmp:
        tree = Path(tmp) / "before"
        add = ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), args.before]
        if subprocess.run(add, capture_output=True).returncode:
            sys.exit(f"ab_train: cannot check out {args.before!r} (not a commit of this repository?)")
        try:
            times = {"before": [], "after": []}
            agree = True
            for r in range(args.rounds):
                before, m_before = timed_run(tree / "src", train_args, Path(tmp) / f"run-before-{r}")
                after, m_after = timed_run(ROOT / "src", train_args, Path(tmp) / f"run-after-{r}")
                times["before"].append(before)
                times["after"].append(after)
                agree = agree and same_numbers(m_before, m_after)
                print(f"round {r + 1}: before {before:.2f} s  after {after:.2f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    result = {
        "before": args.before,
        "after": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "train_args": train_args,
        "before_s": times["before"],
        "after_s": times["after"],
        "before_median_s": statistics.median(times["before"]),
        "after_median_s": statistics.median(times["after"]),
        "saved_median_s": statistics.median(b - a for b, a in zip(times["before"], times["after"])),
        "same_metrics": agree,
    }
    print(
        f"median: before {result['before_median_s']:.2f} s, after {result['after_median_s']:.2f} s; "
        f"saved {result['saved_median_s']:.2f} s (median of paired rounds); metrics identical: {agree}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
