"""How much memory this process may take: the kernel's MemAvailable, or less where a control group (a container's
memory limit) allows less. A run that cannot fit is refused before it starts: on Linux the kernel's OOM killer
ends a process that takes too much with SIGKILL, without a word, often minutes in."""

from __future__ import annotations

from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _limits(proc: Path, root: Path) -> list[int]:
    """The memory limits in bytes of this process's control groups and the groups above (v2's memory.max, v1's
    memory.limit_in_bytes; v1 writes about 2**63 for none)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return []
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2's single hierarchy
            top, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            top, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        group = top / path.lstrip("/")
        while group.is_relative_to(top):
            try:
                limits.append(int((group / name).read_text()))
            except (OSError, ValueError):
                pass  # "max", or a group without the controller's files
            group = group.parent
    return limits


def available(
    meminfo: Path = Path("/proc/meminfo"), proc: Path = Path("/proc/self/cgroup"), root: Path = CGROUP
) -> int | None:
    """Bytes this process may still take at most: MemAvailable, or a control group's whole limit where that is
    smaller (what the group's processes use already is not taken off: an upper bound, so that a check against it
    refuses only what cannot fit). None where the kernel does not tell (not Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        free = int(fields["MemAvailable"].split()[0]) * 1024  # "23595520 kB"
    except (OSError, KeyError, ValueError, IndexError):
        return None
    return min([free, *_limits(proc, root)])


def amount(n: float) -> str:
    """Bytes as people read them: "1.5 GB", "32 MB"."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
