"""Files written atomically, and the directories they go in; torch-free, so that commands which only read runs
and draw them (`reslab runs --plot`) start without importing torch.

A write goes to a temporary file in the same directory, is flushed to disk, then renamed over the old file: a crash
at any moment leaves either the old file or the new one, both complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import faults
from .errors import ReslabError


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's own is 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_affixes(path: Path) -> tuple[str, str]:
    """The prefix and suffix of atomic_write's temporary files for `path`: `.NAME.<random>.tmp` beside it."""
    return f".{path.name}.", ".tmp"


def remove_temp_files(path: Path) -> None:
    """Remove what writes of `path` left behind in a process killed while writing (SIGKILL, the OOM killer): its
    temporary files. Only for a caller that knows no one else writes `path` now (a run directory's lock)."""
    prefix, suffix = _temp_affixes(path)
    for tmp in path.parent.glob(f"{prefix}*{suffix}"):
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write) -> None:
    """Write a file by calling write(f) on a temporary file beside it, fsync, rename over `path`."""
    tmp = None
    try:
        prefix, suffix = _temp_affixes(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        faults.reached("checkpoint-write" if path.suffix == ".pt" else "write")  # complete, not yet in place
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def make_dir(path: Path) -> Path:
    """Create an output directory and its parents, or say in one line why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ReslabError(f"{path} is a file, not a directory; choose another --out") from None
    except OSError as e:
        raise ReslabError(f"cannot create directory {path}: {e.strerror or e}") from None
    return path


def make_file_dir(path: Path, example: str, flag: str = "--out") -> Path:
    """Make sure `path` (the option `flag`, naming a file to write) is not a directory, and create the directory it
    goes in: checked before the work that will fill it. `example` is a file name to suggest."""
    if path.is_dir():
        raise ReslabError(f"{flag} {path} is a directory; name the file to write, e.g. {path / example}")
    return make_dir(path.parent) / path.name


def write_text(path: Path, text: str) -> None:
    """A text file (a run's config.yaml, metrics.jsonl, summary.json; eval, study and bench results) written
    atomically, like a checkpoint."""
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """A file written atomically (an exported model, a text file); a failure is one line, the old file intact."""
    write_file(path, lambda f: f.write(data))


def write_file(path: Path, write) -> None:
    """atomic_write, with a failure (a full disk, a read-only one) one line naming the file; the old file intact."""
    try:
        atomic_write(path, write)
    except OSError as e:
        raise ReslabError(f"cannot write {path}: {e.strerror or e}") from None
