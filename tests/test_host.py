"""The host process: how long a CPU run's threads waited for a CPU, and the warning when other processes take it."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import tiny_overrides

from reslab.engine.host import CROWDED, cpu_wait_seconds
from reslab.runs import read_history

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
    return read_history(out), done.stderr


def test_a_cpu_run_records_its_waits_and_warns_once_when_another_process_takes_its_core(tiny_data, tmp_path):
    rows, err = train_on_one_core(tiny_data, tmp_path / "alone", beside=False)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["cpu_wait"] < CROWDED for r in rows) and "warning" not in err
    rows, err = train_on_one_core(tiny_data, tmp_path / "beside", beside=True)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # the scheduler shares the core between the two sessions: the run's thread waits about half its time
    assert all(CROWDED <= r["cpu_wait"] <= 1 for r in rows)
    assert err.count("waited") == 1 and "Sharing the CPU" in err


def test_threads_that_name_themselves_are_not_counted():
    """Two threads hashing on one core wait about half the time each; a thread that names itself, as gloo's
    communication threads do under torchrun, is left out, so only the main thread's half counts."""
    script = textwrap.dedent(
        """
        import ctypes, hashlib, os, threading, time
        from pathlib import Path
        from reslab.engine.host import cpu_wait_seconds

        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the threads started after it inherit it
        data, stop = bytes(1 << 22), threading.Event()  # hashlib hashes 4 MiB without holding the GIL

        def named():
            ctypes.CDLL(None).prctl(15, b"gloo_tcp_loop")  # PR_SET_NAME
            while not stop.is_set():
                hashlib.sha256(data)

        thread = threading.Thread(target=named)
        thread.start()
        waited, start = cpu_wait_seconds(), time.perf_counter()
        while time.perf_counter() < start + 2:
            hashlib.sha256(data)
        ours, wall = cpu_wait_seconds() - waited, time.perf_counter() - start
        theirs = int(Path(f"/proc/self/task/{thread.native_id}/schedstat").read_text().split()[1]) / 1e9
        stop.set()
        thread.join()
        print(ours / wall, theirs / wall)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    ours, theirs = map(float, done.stdout.split())
    assert 0.3 < ours < 0.7 and theirs > 0.3  # counting both threads would read about 1
