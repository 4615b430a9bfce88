"""The host process: how long a CPU run's threads waited for a CPU, and the warning when other processes take it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_overrides

from reslab.engine.host import CROWDED, cpu_wait_seconds

pytestmark = pytest.mark.skipif(
    cpu_wait_seconds() is None, reason="the kernel does not report run-queue waits"
)


def train_on_one_core(data, out, beside: bool) -> tuple[list[dict], str]:
    """`reslab train` on one thread pinned to one core; with `beside`, next to a CPU-bound process in a session
    of its own pinned to the same core, as a job started from another terminal would be. Its metrics and stderr."""
    core = min(os.sched_getaffinity(0))
    pin = lambda: os.sched_setaffinity(0, {core})  # noqa: E731
    other = (
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True, preexec_fn=pin)
        if beside
        else None
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "reslab", "train", "--out", str(out), "--quiet"]
            + ["--set", *tiny_overrides(data, **{"train.epochs": 3})],
            env=os.environ | {"OMP_NUM_THREADS": "1"},
            preexec_fn=pin,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if other is not None:
            other.kill()
            other.wait()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, done.stderr


def test_a_cpu_run_records_its_waits_and_warns_once_when_another_process_takes_its_core(tiny_data, tmp_path):
    rows, err = train_on_one_core(tiny_data, tmp_path / "alone", beside=False)
    assert all(0 <= r["cpu_wait"] < CROWDED for r in rows) and "warning" not in err
    rows, err = train_on_one_core(tiny_data, tmp_path / "beside", beside=True)
    # the scheduler shares the core between the two sessions: the run's thread waits about half its time
    assert all(CROWDED <= r["cpu_wait"] <= 1 for r in rows)
    assert err.count("waited") == 1 and "Sharing the CPU" in err
