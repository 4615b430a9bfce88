"""A run directory's lock: one training process at a time in a run directory, and who holds it now. Free of
torch, so that `reslab runs` starts at once."""

from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import ReslabError


def lock_dir(path: Path):
    """An exclusive lock on the run directory `path` (the file path/.lock, holding the owner's pid), to use as a
    context manager: a second `reslab train` into the same directory fails at once instead of interleaving its
    checkpoints with the first one's. The OS frees the lock when the process ends, however it ends."""
    import fcntl

    try:
        f = open(path / ".lock", "a+")
    except OSError as e:
        raise ReslabError(f"cannot write {path / '.lock'}: {e.strerror or e}") from None
    for attempt in range(3):  # `reslab runs` holds a shared lock for a moment while it looks
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt < 2:
                time.sleep(0.1)
                continue
            f.seek(0)
            owner = f.read().strip()
            f.close()
            raise ReslabError(
                f"{path} is in use by another training process{f' (pid {owner})' if owner else ''}; "
                "wait for it to end or choose another --out"
            ) from None
        except OSError:
            return f  # a filesystem without locks (some network mounts): go on unlocked
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def lock_owner(path: Path) -> str | None:
    """The pid of the process training in run directory `path` now (the holder of its lock), or None."""
    import fcntl

    try:
        f = open(path / ".lock")
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # freed again as the file closes
        except BlockingIOError:
            return f.read().strip() or "unknown"
        except OSError:
            return None
    return None


__all__ = ["lock_dir", "lock_owner"]
