"""torch.distributed set-up for runs launched by torchrun; a no-op for a single process."""

from __future__ import annotations

import atexit
import datetime
import gc
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ReslabError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def is_main_process() -> bool:
    """Rank 0 under torchrun (read from the environment, before or after setup), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def timeout_seconds() -> float:
    """RESLAB_DIST_TIMEOUT: how long a collective waits for the other ranks (default 600 s)."""
    given = os.environ.get("RESLAB_DIST_TIMEOUT", "600")
    try:
        seconds = float(given)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < math.inf:
        error = ReslabError(f"RESLAB_DIST_TIMEOUT must be a number of seconds > 0, got {given!r}")
        error.every_rank = False  # torchrun gave every rank the same environment
        raise error
    return seconds


def setup(device_type: str) -> DistContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), unless
    this process is in one already. Joined once, the group stays for the process's life and is left at exit: a
    script (or a study) that trains several runs trains them all in it, as a second group after the first is
    destroyed often cannot form (its ranks hung connecting to each other, gloo on the CPU, in half the tries).
    A group the script joined itself serves if its backend carries `device_type`'s tensors, and is one line if
    not (nccl for a CPU run); reslab does not leave it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    # this rank's GPU, also where the script joined the group itself (nccl's object collectives use it)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        seconds = timeout_seconds()
        wait_for_ranks(rank, world, seconds)
        timeout = datetime.timedelta(seconds=seconds)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timeout)
        atexit.register(_leave)
    elif not carries(backend := dist.get_backend(), device_type):
        raise ReslabError(
            f"this process's group (backend {backend}) cannot carry {device_type} tensors: join it with backend "
            f"'cpu:gloo,cuda:nccl' to train on both, or train on {'cuda' if device_type == 'cpu' else 'cpu'}"
        )
    return DistContext(rank, world, local_rank)


def _store(seconds: float) -> dist.Store | None:
    """A client of the store torchrun's agent serves every rank of the run, for a word between the ranks before
    they join the group; None where another launcher set the environment (rank 0's join serves it there)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    timeout = datetime.timedelta(seconds=seconds)
    return dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )


def _key(name: str) -> str:
    """A key of this run's attempt: torchrun keeps its store across the attempts of --max-restarts."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"reslab/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{attempt}/{name}"


def wait_for_ranks(rank: int, world: int, seconds: float) -> None:
    """Wait until every rank has come this far, or one has said it stopped before (`tell_others`). A rank that
    fails before it joins the group (on another machine: a run directory or a config file that machine lacks)
    left the others waiting in the join for RESLAB_DIST_TIMEOUT (10 minutes), to end in a traceback; or, where
    its machine served torchrun's store, in a page of C++ frames. Now they stop at once, and say why."""
    try:
        if (store := _store(min(seconds, 60.0))) is None:  # its agent serves it before any rank starts
            return
        store.add(_key("ready"), 1)
        deadline = time.monotonic() + seconds
        while (ready := store.add(_key("ready"), 0)) < world:
            if store.check([_key("stopped")]):
                error = ReslabError(f"rank {rank} stopped: {store.get(_key('stopped')).decode()}")
                store.add(_key("told"), 1)
                error.after = 1  # torchrun's root cause is the rank that failed first
                raise error
            if time.monotonic() > deadline:
                raise ReslabError(
                    f"rank {rank} stopped: {world - ready} of the {world} ranks did not come to train in "
                    f"RESLAB_DIST_TIMEOUT={seconds:g} s"
                )
            time.sleep(0.05)
    except dist.DistError as e:  # the store's machine went: its agent stops when a rank there fails
        error = ReslabError(
            f"rank {rank} stopped: torchrun's store went away before the ranks met ({e.__class__.__name__}): a "
            "rank on the machine that served it failed, and its message says why"
        )
        error.after = 1
        raise error from None


def tell_others(line: str) -> None:
    """Under torchrun, before this rank joined the group: leave its error `line` where the ranks waiting for it
    read it (`wait_for_ranks`), and give those a moment to read it: where this machine serves torchrun's store,
    it goes when this rank exits. Once joined, the others learn from their next collective instead."""
    if dist.is_initialized():
        return
    try:
        if (store := _store(10.0)) is None:
            return
        said = line.removeprefix("reslab: ").removeprefix("error: ")
        # the first rank to stop is the one quoted
        store.compare_set(
            _key("stopped"), "", f"rank {os.environ.get('RANK', '?')} failed before the ranks met: {said}"
        )
        deadline = time.monotonic() + 5
        while store.add(_key("told"), 0) < store.add(_key("ready"), 0) and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # its own line is said already; the others wait as they did before
        pass


def carries(backend: str, device_type: str) -> bool:
    """Whether a process group of `backend`, as dist.get_backend() names it ("gloo", "nccl", "cpu:gloo,cuda:nccl"),
    carries tensors of `device_type`: nccl only CUDA's, one of "device:backend" pairs only its devices'."""
    pairs = dict(pair.split(":", 1) for pair in backend.split(",") if ":" in pair)
    if pairs:
        return device_type in pairs
    return backend != "nccl" or device_type == "cuda"


def _leave() -> None:
    """At exit: free what keeps gloo's threads busy (a finished run's DDP wrapper, in reference cycles), then leave
    the group, before Python finalizes. A thread still at work then aborted the process ("terminate called
    without an active exception") in 9 of 40 2-rank exits of a DDP script that destroyed the group alone, 0 of
    40 after a collection first (benchmarks/gloo_exit.py; README, "Several processes, several GPUs, several
    machines")."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device, ctx: DistContext) -> list[float]:
    """Sum a few numbers over all ranks (float64); unchanged for a single process."""
    if not ctx.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int, device: torch.device, ctx: DistContext) -> int:
    """The largest of every rank's `value`; unchanged for a single process."""
    if not ctx.active:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_gather_object(obj, ctx: DistContext) -> list | None:
    """Every rank's `obj`, in rank order, on every rank; None for a single process."""
    if not ctx.active:
        return None
    objs = [None] * ctx.world_size
    dist.all_gather_object(objs, obj)
    return objs


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()
