"""`reslab train` alone and beside CPU-bound processes, under each OpenMP setting: what a shared machine costs a CPU
run, and what `GOMP_SPINCOUNT` or fewer threads change. The other processes are pure-Python loops started in a
session of their own with `nice 19`, as a job started from another terminal would be; where the kernel groups
processes by session (autogroup), `nice` ranks them only within their own group, and they take a fair share of
the CPU from the run. Variants and states alternate round by round; prints each time, the largest share of
its threads' time an epoch waited for a CPU (metrics.jsonl's cpu_wait), and the medians. With --cpu-quota, all of it
runs in a control group allowed that many CPUs' time, as in a container with a CPU limit.

Usage: .venv/bin/python benchmarks/contention.py [--variants GOMP_SPINCOUNT=300000 GOMP_SPINCOUNT=30000 ...]
           [--hogs 1,2] [--renice-sessions] [--cpu-quota CPUS] [--rounds 2] [--config configs/fast.yaml] [--set train.epochs=1 data.limit=6400]
           [--out FILE]
(300,000 is libgomp's default when GOMP_SPINCOUNT is unset; the reslab command line sets cli.OPENMP_SPINS.)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ab_train import timed_run  # this directory is on sys.path when a script of it runs

from reslab.engine.host import make_cpu_group
from reslab.studies.common import machine

ROOT = Path(__file__).resolve().parents[1]
AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


def start_hogs(n: int, renice_sessions: bool) -> list[subprocess.Popen]:
    """`n` CPU-bound Python loops, each niced and in a session of its own; with `renice_sessions`, each session's
    autogroup niced too (`echo 19 > /proc/PID/autogroup`)."""
    hogs = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"], start_new_session=True, preexec_fn=lambda: os.nice(19)
        )
        for _ in range(n)
    ]
    for h in hogs if renice_sessions else []:
        Path(f"/proc/{h.pid}/autogroup").write_text("19")
    return hogs


def limit_cpus(cpus: float) -> None:
    """Move this process, and so every process it starts, into a new control group allowed `cpus` CPUs' time, as a
    container's CPU quota would (cgroup v2 or v1's cpu controller; needs root); at exit, back to the top group, and
    the emptied group is removed."""
    try:
        group = make_cpu_group("reslab-contention", cpus)
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as e:
        sys.exit(f"contention: cannot limit the CPU time with a control group: {e}")
    atexit.register(lambda: ((group.parent / "cgroup.procs").write_text(str(os.getpid())), group.rmdir()))


def run_beside(
    variant: str, args: list[str], out: Path, hogs: int, renice_sessions: bool
) -> tuple[float, float | None]:
    """Seconds of one whole `reslab train` process of this working tree, with the environment assignments of
    `variant` ("GOMP_SPINCOUNT=30000 OMP_NUM_THREADS=1"), beside `hogs` CPU-bound processes; and the largest
    share of its threads' time an epoch spent waiting for a CPU (metrics.jsonl's cpu_wait; None before it)."""
    others = start_hogs(hogs, renice_sessions)
    try:
        time.sleep(1 if hogs else 0)
        env = dict(kv.split("=", 1) for kv in variant.split())
        seconds, metrics = timed_run(ROOT / "src", [*args, "--overwrite"], out, env)
        return seconds, max((m["cpu_wait"] for m in metrics if "cpu_wait" in m), default=None)
    finally:
        for p in others:
            p.kill()
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["GOMP_SPINCOUNT=300000", "GOMP_SPINCOUNT=30000", "GOMP_SPINCOUNT=30000 OMP_NUM_THREADS=1"],
        help="environment assignments of each variant, one quoted string per variant",
    )
    parser.add_argument(
        "--hogs",
        default="1,2",
        help="how many CPU-bound processes beside the run, comma-separated (each variant also runs alone)",
    )
    parser.add_argument(
        "--cpu-quota", type=float, help="run everything in a control group allowed this many CPUs' time"
    )
    parser.add_argument("--renice-sessions", action="store_true", help="nice the other processes' autogroups")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default=str(ROOT / "configs" / "fast.yaml"))
    parser.add_argument("--set", nargs="*", default=["train.epochs=1", "data.limit=6400"], dest="overrides")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    hogs = sorted({0, *(int(n) for n in args.hogs.split(",") if n)})
    if args.cpu_quota:
        limit_cpus(args.cpu_quota)
    train_args = ["--config", args.config, "--set", *args.overrides]
    times: dict[str, dict[int, list[float]]] = {v: {n: [] for n in hogs} for v in args.variants}
    waits: dict[str, dict[int, list[float | None]]] = {v: {n: [] for n in hogs} for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in hogs:
                for v in args.variants:
                    seconds, wait = run_beside(v, train_args, Path(tmp) / "run", n, args.renice_sessions)
                    times[v][n].append(seconds)
                    waits[v][n].append(wait)
                    shown = "" if wait is None else f", waited for a CPU {wait:.1%}"
                    print(f"round {r + 1}, {v}, {n} other processes: {seconds:.1f} s{shown}", flush=True)
    medians = {v: {n: statistics.median(t) for n, t in by_hogs.items()} for v, by_hogs in times.items()}
    for v, by_hogs in medians.items():
        print(
            f"{v}: " + ", ".join(f"{n} others {s:.1f} s ({s / by_hogs[0]:.1f}x)" for n, s in by_hogs.items())
        )
    if args.out:
        result = {
            "command": " ".join(sys.argv),
            "machine": machine(),
            "autogroup": AUTOGROUP.read_text().strip() if AUTOGROUP.exists() else None,
            "train_args": train_args,
            "renice_sessions": args.renice_sessions,
            "cpu_quota": args.cpu_quota,
            "seconds": times,
            "cpu_wait": waits,
            "medians": medians,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
