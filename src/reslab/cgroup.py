"""The limits a process's control groups set on it (a container's CPU quota or memory limit), read along its group
and the groups above in cgroup v2's single hierarchy or v1's hierarchy of the controller. Free of torch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
SELF = Path("/proc/self/cgroup")


def limits(
    controller: str,
    read_v2: Callable[[Path], object],
    read_v1: Callable[[Path], object],
    proc: Path = SELF,
    root: Path = ROOT,
) -> list:
    """What `read_v2` or `read_v1` reads from each group along this process's path, its own and those above; a
    reader returns None for a group that sets no limit, and one whose files are missing or unreadable (OSError,
    ValueError) is passed over. [] where the kernel does not tell."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2's single hierarchy
            top, read = root, read_v2
        elif controller in controllers.split(","):
            top, read = root / controller, read_v1
        else:
            continue
        group = top / path.lstrip("/")
        while group.is_relative_to(top):
            try:
                if (value := read(group)) is not None:
                    found.append(value)
            except (OSError, ValueError):
                pass  # a group without the controller's files
            group = group.parent
    return found
