"""Atomic checkpoint writes and safe loads.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
`torch.load(weights_only=True)`: a file that carries code is refused, never executed. Writes go to a temporary
file in the same directory, are flushed to disk, then renamed over the old file: a crash at any moment leaves
either the old or the new checkpoint, both complete.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .. import faults
from ..errors import ReslabError

FORMAT_VERSION = 1


class CheckpointError(ReslabError):
    """A checkpoint that cannot be written or trusted."""


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


def os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`, if any. A full disk stops torch.save with an OSError, and its zip writer, closing
    the file while that is handled, raises a RuntimeError ("unexpected pos") that carries it as its context."""
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e


def save(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))
    except (OSError, RuntimeError) as e:
        if (cause := os_error(e)) is None:
            raise
        kept = "; the previous one is intact" if path.is_file() else ""
        raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause}{kept}") from None


def find(path: str | Path) -> Path:
    """A checkpoint file as given, or a run directory's best.pt (its last.pt before a best.pt exists)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("best.pt", "last.pt") if (path / name).is_file()]
        if not found:
            raise CheckpointError(
                f"{path} holds no best.pt or last.pt: not a run directory, or none saved yet"
            )
        path = found[0]
    return path


def evaluated_weights(state: dict[str, Any]) -> Any:
    """The weights a run evaluated: its EMA's when it kept one, else the model's (eval, predict, model.init)."""
    return state["ema"] if state.get("ema") else state["model"]


def misfit(own: dict[str, Any], saved: Any, shapes: bool = True) -> str | None:
    """How the tensors `saved` of a checkpoint differ from a model's `own` (its state_dict), in a phrase for an
    error line; None where they fit. With `shapes` False only the names count."""
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        return "its weights are not a mapping of names to tensors"
    for a, b, where in ((own, saved, "the checkpoint"), (saved, own, "this model")):
        absent = [k for k in a if k not in b]
        if absent:
            return f"{len(absent)} tensors are not in {where} (first: {absent[0]})"
    for key, mine in own.items() if shapes else ():
        if saved[key].shape != mine.shape:
            return f"{key} is {tuple(saved[key].shape)} in the checkpoint, {tuple(mine.shape)} here"
    return None


def load(path: str | Path) -> dict[str, Any]:
    """Load a reslab checkpoint safely (weights only) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps the reason in advice about weights_only=False, which reslab never takes
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
        reason = (
            [line for line in lines if not line.startswith(advice)] or lines or ["unsupported content"]
        )[-1]
        if "GLOBAL" in reason:  # a function or class to import and call: what code in a pickle looks like
            raise CheckpointError(
                f"{path}: refused, it holds more than weights (possible code): {reason}"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {msg}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a reslab checkpoint (no model weights inside)")
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this reslab understands ({FORMAT_VERSION}); upgrade reslab"
        )
    return state
