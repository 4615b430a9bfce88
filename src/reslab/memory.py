"""How much memory this process may take: the kernel's MemAvailable, or less where a control group (a container's
memory limit) allows less. A run that cannot fit is refused before it starts: on Linux the kernel's OOM killer
ends a process that takes too much with SIGKILL, without a word, often minutes in."""

from __future__ import annotations

import os
from pathlib import Path

from . import cgroup


def _held(stat: Path, key: str) -> int:
    """The group's memory that cannot be reclaimed (its processes' own pages, not the page cache), from its
    memory.stat; 0 where the file does not tell."""
    try:
        fields = dict(line.split(" ", 1) for line in stat.read_text().splitlines() if " " in line)
        return int(fields.get(key, 0))
    except (OSError, ValueError):
        return 0


def _v2_room(group: Path) -> int:
    limit = int((group / "memory.max").read_text())  # "max": a ValueError, no limit
    return limit - _held(group / "memory.stat", "anon")


def _v1_room(group: Path) -> int:
    limit = int((group / "memory.limit_in_bytes").read_text())  # about 2**63 for none
    return limit - _held(group / "memory.stat", "total_rss")  # "total_": its own groups' too


def available(
    meminfo: Path = Path("/proc/meminfo"), proc: Path = cgroup.SELF, root: Path = cgroup.ROOT
) -> int | None:
    """Bytes this process may still take at most: MemAvailable, or less where a control group's limit leaves less
    room beside the pages its processes hold already (anonymous memory; the page cache, which the kernel takes
    back under the limit, is not taken off: an upper bound, so that a check against it refuses only what cannot
    fit). None where the kernel does not tell (not Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        free = int(fields["MemAvailable"].split()[0]) * 1024  # "23595520 kB"
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return min([free, *cgroup.limits("memory", _v2_room, _v1_room, proc, root)])


def local_ranks() -> int:
    """How many processes torchrun started on this machine (1 without torchrun): each holds its own data and
    activations in the memory they share."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def on_each_rank(need: int) -> str:
    """Words for an error line about `need` bytes that each of this machine's torchrun ranks takes: "" where
    there is one rank."""
    ranks = local_ranks()
    return (
        f" on each of this machine's {ranks} torchrun ranks ({amount(ranks * need)} in all)"
        if ranks > 1
        else ""
    )


def or_fewer_ranks() -> str:
    """The advice that ends a memory error line under torchrun with several ranks on this machine: "" without."""
    return ", or start fewer ranks on this machine" if local_ranks() > 1 else ""


def amount(n: float) -> str:
    """Bytes as people read them: "1.5 GB", "32 MB"."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
