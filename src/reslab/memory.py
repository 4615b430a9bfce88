"""How much memory this process may take: the kernel's MemAvailable, or less where a control group (a container's
memory limit) allows less. A run that cannot fit is refused before it starts: on Linux the kernel's OOM killer
ends a process that takes too much with SIGKILL, without a word, often minutes in."""

from __future__ import annotations

import os
from pathlib import Path

from . import cgroup


def _v2_limit(group: Path) -> int:
    return int((group / "memory.max").read_text())  # "max": a ValueError, no limit


def _v1_limit(group: Path) -> int:
    return int((group / "memory.limit_in_bytes").read_text())  # about 2**63 for none


def available(
    meminfo: Path = Path("/proc/meminfo"), proc: Path = cgroup.SELF, root: Path = cgroup.ROOT
) -> int | None:
    """Bytes this process may still take at most: MemAvailable, or a control group's whole limit where that is
    smaller (what the group's processes use already is not taken off: an upper bound, so that a check against it
    refuses only what cannot fit). None where the kernel does not tell (not Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        free = int(fields["MemAvailable"].split()[0]) * 1024  # "23595520 kB"
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return min([free, *cgroup.limits("memory", _v2_limit, _v1_limit, proc, root)])


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


def amount(n: float) -> str:
    """Bytes as people read them: "1.5 GB", "32 MB"."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
