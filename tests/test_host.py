"""The host process: how long a CPU run's threads waited for a CPU, the warning when they wait, and its cause."""

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from reslab.engine import host
from reslab.engine.host import cpu_quota, cpu_wait_seconds, crowding_cause, make_cpu_group
from reslab.history import CROWDED
from reslab.runs import read_history

pytestmark = pytest.mark.skipif(
    cpu_wait_seconds() is None, reason="the kernel does not report run-queue waits"
)


def train_on_one_core(data, out, beside: bool, threads: int = 1) -> tuple[list[dict], str]:
    """`reslab train` on `threads` threads pinned to one core; with `beside`, next to a CPU-bound process in a
    session of its own pinned to the same core, as a job started from another terminal would be. Its metrics and
    stderr."""
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
            env=os.environ | {"OMP_NUM_THREADS": str(threads)},
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
    assert "other processes share these cores" in err


@pytest.mark.skipif(os.cpu_count() < 2, reason="PyTorch runs no more threads than the machine has cores")
def test_a_run_with_more_threads_than_cpus_says_so(tiny_data, tmp_path):
    """Two threads pinned to one core wait for each other: the warning names the threads, not other processes."""
    rows, err = train_on_one_core(tiny_data, tmp_path / "two", beside=False, threads=2)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(CROWDED <= r["cpu_wait"] <= 1 for r in rows)
    assert err.count("waited") == 1
    assert "this process runs 2 threads on 1 CPU: set OMP_NUM_THREADS=1" in err


def test_cpu_wait_covers_testing_too(tiny_data, tmp_path, monkeypatch):
    """An epoch's cpu_wait is over the whole epoch: seconds waited while the test set is evaluated count, shared
    out over training and testing. Here the clock of waits stands still while training and moves 1 s in each
    evaluation, so each tested epoch waited 1 s of its threads' epoch_seconds, and the untested one nothing."""
    from reslab import config

    fit_mod = importlib.import_module(
        "reslab.engine.fit"
    )  # the module: reslab.engine's `fit` is the function

    waited = [0.0]

    def evaluate(*args, **kwargs):
        waited[0] += 1.0
        return real(*args, **kwargs)

    real = fit_mod.evaluate
    monkeypatch.setattr(fit_mod, "cpu_wait_seconds", lambda: waited[0])
    monkeypatch.setattr(fit_mod, "evaluate", evaluate)
    cfg = config.load(None, tiny_overrides(tiny_data, **{"train.epochs": 3, "train.eval_every": 2}))
    fit_mod.fit(cfg, tmp_path / "run", quiet=True)
    rows = read_history(tmp_path / "run")
    assert ["test_acc" in r for r in rows] == [False, True, True]
    threads = torch.get_num_threads()
    assert rows[0]["cpu_wait"] == 0.0
    for r in rows[1:]:
        assert r["cpu_wait"] == pytest.approx(1.0 / (r["epoch_seconds"] * threads), rel=1e-9)


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


def write_groups(root: Path, groups: dict[str, str]) -> None:
    for name, text in groups.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_cpu_quota_reads_the_tightest_limit_along_the_group_path(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/box/job\n")  # cgroup v2
    write_groups(tmp_path, {"cpu.max": "max 100000\n", "box/cpu.max": "150000 100000\n"})
    assert cpu_quota(proc, tmp_path) == 1.5  # the job's own group has no file: its parent's limit holds
    write_groups(tmp_path, {"box/job/cpu.max": "50000 100000\n"})
    assert cpu_quota(proc, tmp_path) == 0.5
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/box\n")  # cgroup v1's cpu controller
    write_groups(tmp_path, {"cpu/box/cpu.cfs_quota_us": "200000\n", "cpu/box/cpu.cfs_period_us": "100000\n"})
    write_groups(tmp_path, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cpu_quota(proc, tmp_path) == 2.0
    proc.write_text("3:cpu,cpuacct:/\n")
    assert cpu_quota(proc, tmp_path) is None  # unlimited
    assert cpu_quota(tmp_path / "missing", tmp_path) is None


@pytest.mark.parametrize(
    "threads, ranks, cpus, quota, says",
    [
        (2, 1, 2, None, "other processes share these cores"),
        (2, 2, 4, 4.0, "other processes share these cores"),
        (4, 1, 2, None, "this process runs 4 threads on 2 CPUs: set OMP_NUM_THREADS=2"),
        (
            2,
            1,
            2,
            1.0,
            "this process runs 2 threads on a CPU quota of 1 (a container's limit): set OMP_NUM_THREADS=1",
        ),
        (
            1,
            4,
            2,
            None,
            "this machine's 4 ranks run 4 threads (1 each) on 2 CPUs: start at most 2 ranks on this",
        ),
        (
            1,
            1,
            2,
            0.5,
            "this process runs 1 thread on a CPU quota of 0.5 (a container's limit): give it more CPU",
        ),
    ],
)
def test_the_warning_names_what_crowds_the_cpu(monkeypatch, threads, ranks, cpus, quota, says):
    monkeypatch.setattr(host.torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(host, "cpu_quota", lambda: quota)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert says in crowding_cause()
    assert says in host.crowded_warning({"epoch": 3, "cpu_wait": 0.5})


@pytest.fixture
def cpu_group():
    """A control group allowed `cpus` CPUs' time (needs root and a writable cgroup hierarchy, else the test is
    skipped), and the function a child process calls before it runs to move into it; removed afterwards, when its
    processes have ended."""
    made = []

    def make(cpus: float):
        try:
            group = make_cpu_group(f"reslab-test-{os.getpid()}", cpus)
        except OSError as e:
            pytest.skip(f"cannot make a control group: {e}")
        made.append(group)
        return lambda: (group / "cgroup.procs").write_text(str(os.getpid()))

    yield make
    for group in made:
        group.rmdir()


def test_cpu_quota_reads_a_real_control_group(cpu_group):
    """A process in a control group allowed half a CPU reads 0.5."""
    done = subprocess.run(
        [sys.executable, "-c", "from reslab.engine.host import cpu_quota\nprint(cpu_quota())"],
        preexec_fn=cpu_group(0.5),
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(done.stdout) == 0.5


@pytest.mark.parametrize(
    "quota, ranks, env, threads",
    [
        (None, 1, {}, None),  # no quota: PyTorch's own count stands
        (0.5, 1, {}, 1),
        (1.0, 1, {}, 1),
        (1.25, 1, {}, 1),  # measured even (BENCHMARKS.md): the quota rounded
        (1.5, 1, {}, None),  # 2 threads were faster than 1 under 1.5 CPUs
        (3.0, 1, {}, None),
        (2.0, 2, {}, 1),  # two torchrun ranks on this machine share the quota
        (1.0, 1, {"OMP_NUM_THREADS": "2"}, None),  # the user's count stands
    ],
)
def test_the_threads_fit_a_cpu_quota(monkeypatch, quota, ranks, env, threads):
    set_to = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    monkeypatch.setattr(host, "cpu_quota", lambda: quota)
    monkeypatch.setattr(host, "_fitted_to", None)
    monkeypatch.setattr(host.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(host.torch, "set_num_threads", set_to.append)
    host.fit_threads_to_quota(host.torch.device("cuda"))
    assert set_to == []  # nothing changes for a GPU's steps
    host.fit_threads_to_quota(host.torch.device("cpu"))
    assert set_to == ([] if threads is None else [threads])
    assert host.cpu_threads() == "2 threads" + (f" for a CPU quota of {quota:g}" if threads else "")


def test_a_run_under_a_cpu_quota_fits_its_threads(tiny_data, tmp_path, cpu_group):
    """Under a 1-CPU quota of a real control group, a run left to choose runs 1 thread and says so; one told
    OMP_NUM_THREADS=2 runs 2, and waits for CPU time."""
    if os.cpu_count() < 2:
        pytest.skip("PyTorch runs no more threads than the machine has cores")
    join = cpu_group(1.0)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for name, extra, says in [
        ("fit", {}, "(1 thread for a CPU quota of 1)"),
        ("two", {"OMP_NUM_THREADS": "2"}, "(2 threads)"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "reslab", "train", "--out", str(tmp_path / name)]
            + ["--set", *tiny_overrides(tiny_data, **{"train.epochs": 1})],
            env=env | extra,
            preexec_fn=join,
            capture_output=True,
            text=True,
            check=True,
        )
        assert says in done.stdout.splitlines()[0]
    assert read_history(tmp_path / "fit")[0]["cpu_wait"] < read_history(tmp_path / "two")[0]["cpu_wait"]
