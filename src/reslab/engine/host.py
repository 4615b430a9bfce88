"""The host process: its memory allocator, set for training on the CPU, and how long its threads waited for a CPU.

glibc's malloc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mappings and
hands them back to the OS when they are freed; smaller freed blocks at the top of the heap are trimmed away too.
A training step on the CPU allocates and frees the same activations every step, so each step took them as new
pages that the kernel faults in and zeroes 4 KiB at a time: about 5,200 page faults a step for fast.yaml's
ResNet-8 at batch 128, 70,000 at batch 512. Keeping them made fast.yaml's epochs 8% faster (BENCHMARKS.md, "Where
the CPU step lost time"). jemalloc and tcmalloc keep freed memory for reuse; with glibc two `mallopt` settings do
the same. The process's resident memory then stays near its peak instead of shrinking between steps.
"""

from __future__ import annotations

import copy
import ctypes
import os
import platform
from pathlib import Path

import torch
from torch import nn

from .. import cgroup, memory
from ..config import ModelConfig
from ..errors import ReslabError

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
# bytes: blocks under 1 GiB come from the heap, and up to 2 GiB of free heap stays mapped
KEEP_BELOW = 1 << 30
TRIM_ABOVE = (1 << 31) - 1

_kept = False


def keep_freed_memory(device: torch.device) -> bool:
    """For steps on the CPU `device`, make glibc keep freed memory for reuse in this process (once; idempotent).
    True if the setting holds: False for another device or a C library other than glibc, where nothing changes."""
    global _kept
    if device.type != "cpu":
        return False
    if _kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _kept = bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE)
    )
    return _kept


def cpu_wait_seconds() -> float | None:
    """Seconds the threads that compute this process's operators have spent ready to run but waiting for a CPU
    (Linux's per-thread schedstat, the run-queue delay); None where the kernel does not tell. Those threads are
    the ones that carry the process's own name: the main thread and the OpenMP workers it starts. Threads that
    name themselves (gloo's communication threads under torchrun) are left out: they wake while the training
    threads hold the cores, and their waits would count a rank's own work as another process's. A thread that
    sleeps (an idle OpenMP thread after its busy wait) does not wait; one that another process keeps off its
    core does."""
    total = 0
    try:
        name = Path("/proc/self/comm").read_text()
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            if (task / "comm").read_text() == name:
                total += int((task / "schedstat").read_text().split()[1])
        except FileNotFoundError:  # the thread ended since the listing
            continue
        except (OSError, IndexError, ValueError):
            return None
    return total / 1e9


def wait_share(waited: float, seconds: float) -> float:
    """The share of the compute threads' time in `seconds` of wall time that they spent waiting for a CPU, given
    the seconds they `waited` (summed over the threads: cpu_wait_seconds' difference)."""
    return waited / max(seconds * torch.get_num_threads(), 1e-9)


# where Linux mounts its control groups (v2; v1 under one directory per controller)
CGROUP = cgroup.ROOT
PERIOD = 100_000  # microseconds: the period of the CPU quotas make_cpu_group writes


def _v2_quota(group: Path) -> float | None:
    quota, period = (group / "cpu.max").read_text().split()  # "max 100000" or "QUOTA PERIOD"
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(group: Path) -> float | None:
    quota, period = [int((group / f"cpu.cfs_{k}_us").read_text()) for k in ("quota", "period")]
    return None if quota == -1 else quota / period


def cpu_quota(proc: Path = cgroup.SELF, root: Path = CGROUP) -> float | None:
    """The CPUs' worth of time this process's control groups allow it (a container's CPU limit): the tightest of
    cgroup v2's cpu.max or v1's cpu.cfs_quota_us over cpu.cfs_period_us along its group and the groups above;
    None where no group limits it or the kernel does not tell."""
    return min(cgroup.limits("cpu", _v2_quota, _v1_quota, proc, root), default=None)


def make_cpu_group(name: str, cpus: float) -> Path:
    """A control group `name` allowed `cpus` CPUs' time, as a container's CPU limit allows (cgroup v2, or v1's cpu
    controller; needs root), for benchmarks and tests: a process moves in by writing its pid to the group's
    cgroup.procs, and the empty group goes with rmdir. Raises OSError where the group cannot be made."""
    v2 = (CGROUP / "cgroup.controllers").exists()
    group = (CGROUP if v2 else CGROUP / "cpu") / name
    group.mkdir(exist_ok=True)
    if v2:
        (group / "cpu.max").write_text(f"{round(cpus * PERIOD)} {PERIOD}")
    else:
        (group / "cpu.cfs_period_us").write_text(str(PERIOD))
        (group / "cpu.cfs_quota_us").write_text(str(round(cpus * PERIOD)))
    return group


def crowding_cause() -> str:
    """Why a CPU run's threads wait for a CPU, as far as this process can tell: its own threads (or this machine's
    torchrun ranks' together) outnumber the CPUs it may use (its affinity, a container's quota), or else other
    processes take the cores."""
    threads, ranks = torch.get_num_threads(), memory.local_ranks()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota()
    allowed = min(cpus, quota if quota is not None else cpus)
    if threads * ranks <= allowed:
        return "other processes share these cores"
    who = (
        f"this process runs {threads} thread{'s' * (threads > 1)}"
        if ranks == 1
        else f"this machine's {ranks} ranks run {threads * ranks} threads ({threads} each)"
    )
    on = (
        f"{cpus} CPU{'s' * (cpus > 1)}"
        if allowed == cpus
        else f"a CPU quota of {quota:g} (a container's limit)"
    )
    if ranks > max(allowed, 1):
        n = max(1, int(allowed))
        fix = f"start at most {n} rank{'s' * (n > 1)} on this machine (torchrun --nproc_per_node)"
    elif threads > 1:
        fix = f"set OMP_NUM_THREADS={max(1, int(allowed // ranks))}"
    else:
        fix = "give it more CPU time"
    return f"{who} on {on}: {fix}"


_fitted_to: float | None = None  # the CPU quota fit_threads_to_quota fitted the threads to


def fit_threads_to_quota(device: torch.device) -> None:
    """For steps on the CPU `device`, under a container's CPU quota (cpu_quota) that allows fewer CPUs than PyTorch
    runs threads, run as many threads as the quota allows CPUs, rounded (at least one; under torchrun, this
    machine's ranks share them), unless OMP_NUM_THREADS sets the count. PyTorch counts the CPUs this process may
    run on, not its quota, and threads beyond the quota wait for each other. On 2 cores (BENCHMARKS.md, "Fitting
    the threads to a CPU quota"), a fast.yaml epoch took, with 1 thread against 2: 6.3 s against 7.1 under a
    quota of 1 CPU, 5.9 against 6.0 under 1.25, 6.3 against 5.3 under 1.5."""
    global _fitted_to
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or (quota := cpu_quota()) is None:
        return
    threads = max(1, int(quota / memory.local_ranks() + 0.5))
    if threads < torch.get_num_threads():
        torch.set_num_threads(threads)
        _fitted_to = quota


def cpu_threads() -> str:
    """This process's CPU threads, for a run's first line: "2 threads", or "1 thread for a CPU quota of 1"."""
    threads = torch.get_num_threads()
    said = f"{threads} thread{'s' * (threads > 1)}"
    return said if _fitted_to is None else f"{said} for a CPU quota of {_fitted_to:g}"


def set_up(device: torch.device) -> None:
    """Set this process up for steps on `device` as training does: on the CPU, freed memory kept for reuse
    (keep_freed_memory) and the threads fitted to a container's CPU quota (fit_threads_to_quota)."""
    keep_freed_memory(device)
    fit_threads_to_quota(device)


def check_memory(
    model: nn.Module,
    cfg: ModelConfig,
    data: tuple[int, int, int],
    batches: tuple[int, int],
    precision: str,
    smaller_eval: str = "lower train.eval_batch_size or data.resize",
    state: int = 0,
) -> None:
    """Refuse a CPU run whose training step or evaluation batch cannot fit in the memory this process may take
    (reslab.memory.available), before it loads anything more: the kernel's OOM killer would end it without a word.
    `model` is the run's, built from `cfg`; `data` the images' channels, side and classes; `batches` the images
    of a micro-batch (0: no training) and of an evaluation batch; `smaller_eval` says how to make the latter
    smaller; `state` the bytes a training step keeps beside its activations (optim.state_bytes). The need is a
    floor (models.activation_bytes), so nothing that fits is refused; under torchrun each of this machine's ranks
    needs it in the memory they share. A copy of the model runs one forward pass at the side, or at 64 pixels
    scaled up by the area when the side is larger; near the limit, the count at the side itself decides, on the
    meta device (shapes only, but its first use imports torch._dynamo: 1.5-2 s). A model of your own that cannot
    run there is not checked."""
    from ..models import activation_bytes, build_model

    if (free := memory.available()) is None:
        return
    ranks = memory.local_ranks()  # this machine's torchrun ranks, each with a step of its own
    half = 1 if precision == "fp32" else 2  # bf16 and fp16 keep activations in 2 bytes, not 4
    channels, side, classes = data
    small = min(side, 64)
    try:
        with torch.random.fork_rng(devices=[]):  # a dropout's draws: the run's random stream stays as it was
            kept, largest = activation_bytes(copy.deepcopy(model).train(), (channels, small, small))
        if side > small:
            scale = (side / small) ** 2 / half
            scaled = max(batches[0] * kept * scale + state, batches[1] * largest * scale)
            if scaled * ranks < free / 2:
                return  # far below the limit
            with torch.device("meta"):
                net = build_model(cfg.name, channels, classes, **cfg.options)
            kept, largest = activation_bytes(net.train(), (channels, side, side))
    except Exception:  # the library's own models all run there (test_models)
        return
    image = f"{channels}x{side}x{side}"
    step = "lower train.batch_size or data.resize, or raise train.accum_steps"
    if state * ranks > free:  # not even a micro-batch of one image fits beside them
        step = "choose a smaller model, or an optimiser with fewer slots (adamw keeps two, sgd one)"
    for what, n, each, kept_too, advice in (
        ("a training step", batches[0], kept, state, step),
        ("an evaluation batch", batches[1], largest, 0, smaller_eval),
    ):
        if n and (need := n * each // half + kept_too) * ranks > free:
            held = "gradients, optimiser state and the guard's rollback copy"
            plus = f", plus {memory.amount(kept_too)} of {held}" if kept_too else ""
            raise ReslabError(
                f"{what} of {cfg.name} needs at least {memory.amount(need)} ({n:,} image{'s' * (n > 1)} of {image}, "
                f"{precision}{plus}){memory.on_each_rank(need)}, more than the {memory.amount(free)} this "
                f"machine has free: {advice}{memory.or_fewer_ranks()}"
            )


def crowded_warning(m: dict) -> str:
    """The one-time warning of a run whose threads wait for a CPU (an epoch's metrics `m`)."""
    threads = torch.get_num_threads()
    return (
        f"reslab: warning: epoch {m['epoch']}'s {threads} thread{'s' * (threads > 1)} waited for a CPU "
        f'{m["cpu_wait"]:.0%} of the time: {crowding_cause()}; README.md, "Sharing the CPU", says what helps'
    )


__all__ = [
    "check_memory",
    "cpu_quota",
    "cpu_threads",
    "cpu_wait_seconds",
    "crowded_warning",
    "crowding_cause",
    "fit_threads_to_quota",
    "keep_freed_memory",
    "make_cpu_group",
    "set_up",
    "wait_share",
]
