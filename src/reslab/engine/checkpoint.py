"""Atomic checkpoint writes and safe loads.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
`torch.load(weights_only=True)`: a file that carries code is refused, never executed. Writes are reslab.files'
atomic ones: a crash at any moment leaves either the old or the new checkpoint, both complete.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..config import MAX_RESIZE
from ..errors import ReslabError, is_count
from ..files import atomic_write
from ..history import epoch_fault, finite

FORMAT_VERSION = 1


class CheckpointError(ReslabError):
    """A checkpoint that cannot be written or trusted."""


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
    error line; None where they fit (`saved` as `fault` checked it). With `shapes` False only the names count."""
    for a, b, where in ((own, saved, "the checkpoint"), (saved, own, "this model")):
        absent = [k for k in a if k not in b]
        if absent:
            return f"{len(absent)} tensors are not in {where} (first: {absent[0]})"
    for key, mine in own.items() if shapes else ():
        if saved[key].shape != mine.shape:
            return f"{key} is {tuple(saved[key].shape)} in the checkpoint, {tuple(mine.shape)} here"
    return None


def exported(path: Path) -> str | None:
    """The kind of model file `reslab export` writes that `path` is (TorchScript, torch.export, ONNX); None if none.
    torch.load reads none of them as a checkpoint, and a TorchScript archive draws a warning first."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
            if any("/code/__torch__/" in n or n.endswith("/constants.pkl") for n in names):
                return "TorchScript"
            return "torch.export (.pt2)" if any(n.endswith("/archive_format") for n in names) else None
        with open(path, "rb") as f:
            head = f.read(32)
    except (OSError, zipfile.BadZipFile):
        return None  # torch.load says why
    # an ONNX model opens with its ir_version field (0x08) and names its producer, "pytorch"
    return "ONNX" if head.startswith(b"\x08") and b"pytorch" in head else None


def load(path: str | Path, resume: bool = False) -> dict[str, Any]:
    """Load a reslab checkpoint safely (weights only) onto the CPU, checked as `fault` checks it: for a resume
    (`resume`) also its training state."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    if kind := exported(path):
        raise CheckpointError(
            f"{path}: a model exported as {kind} (reslab export), not a reslab checkpoint: give the run "
            "directory, or its best.pt or last.pt"
        )
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
    if why := fault(state, resume):
        raise CheckpointError(f"{path}: damaged, or not written by reslab: {why}")
    return state


def fault(state: dict[str, Any], resume: bool = False) -> str | None:
    """What in a loaded checkpoint is not as reslab writes it, in a phrase for an error line; None where nothing
    is. Always its weights, and the EMA's; with `resume`, also its config, history and the training state a
    resume restores, and the same of the snapshot a mid-epoch last.pt holds. Whether the tensors fit a model is
    the loader's to check (misfit); what eval, predict and export read besides, theirs (description_fault)."""
    if (why := _weights_fault(state)) or not resume:
        return why
    if not _settings(state.get("config")):
        return "config: not a mapping of settings"
    history = state.get("history")
    if not isinstance(history, list):
        return "history: not a list of epochs"
    for i, h in enumerate(history, 1):
        if why := epoch_fault(h, i):
            return f"history: entry {i}: {why}"
    if why := _training_fault(state):
        return why
    if len(history) != state["epoch"]:
        return f"history: {len(history)} epochs, where it has trained {state['epoch']}"
    start = state.get("epoch_start")  # the rollback point of a last.pt written mid-epoch
    if start is None:
        return None
    why = (_weights_fault(start) or _training_fault(start)) if isinstance(start, dict) else "not a mapping"
    return f"epoch_start: {why}" if why else None


def description_fault(state: dict[str, Any]) -> str | None:
    """What in the description of a model a checkpoint holds for eval, predict and export (its config, and its
    meta: model, classes, normalisation, input size) is not as reslab writes it; None where nothing is."""
    if not _settings(state.get("config")):
        return "config: not a mapping of settings"
    meta = state.get("meta")
    if not isinstance(meta, dict):
        return "meta: not a mapping"
    checks = {
        "model_name": lambda v: isinstance(v, str) and v,
        "model_options": lambda v: isinstance(v, dict) and _plain(v),
        "in_channels": is_count,
        "classes": lambda v: isinstance(v, list) and v and all(isinstance(c, str) for c in v),
        "image_size": lambda v: is_count(v) and v <= MAX_RESIZE,
        "resize": lambda v: v is None or is_count(v) and v <= MAX_RESIZE,
    }
    for key, check in checks.items():
        if key not in meta or not check(meta[key]):
            return f"meta: {key}: {meta.get(key)!r}"[:100]
    for key in ("mean", "std"):
        v = meta.get(key)
        n = meta["in_channels"]
        if not isinstance(v, list) or len(v) != n or not all(type(x) is float and finite(x) for x in v):
            return f"meta: {key}: not a finite float for each of its {n} input channels"
    if not all(x > 0 for x in meta["std"]):
        return "meta: std: not all > 0"
    for key in ("epoch", "batch"):  # what eval reports of the run that wrote it
        if key in state and not _count(state[key]):
            return f"{key}: {state[key]!r}, not an integer >= 0"
    return None


def _training_fault(state: dict[str, Any]) -> str | None:
    """What in the training state of a checkpoint (or of the snapshot inside one), besides its weights, is not as
    reslab writes it."""
    optimizer = state.get("optimizer")
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
        and all(
            isinstance(g, dict)
            and isinstance(g.get("params"), list)
            and all(type(i) is int for i in g["params"])
            for g in optimizer["param_groups"]
        )
    ):
        return "optimizer: not torch.optim's state (state, param_groups)"
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        return "scaler: not a mapping"
    if not _generators(state):
        return "rng, cuda_rng: not the generators' states"
    for key in ("rank_rng", "epoch_start_rng"):  # each rank's, under torchrun
        ranks = state.get(key)
        if ranks is not None and not (isinstance(ranks, list) and all(map(_generators, ranks))):
            return f"{key}: not each rank's generators"
    guard = state.get("guard")
    if not (
        isinstance(guard, dict)
        and guard.keys() == {"lr_scale", "retries", "events"}
        and finite(guard["lr_scale"])
        and 0 < guard["lr_scale"] <= 1
        and _count(guard["retries"])
        and isinstance(guard["events"], list)
    ):
        return "guard: not the divergence guard's state (lr_scale in (0, 1], retries, events)"
    for key in ("epoch", "batch"):
        if not _count(state.get(key)):
            return f"{key}: {state.get(key)!r}, not an integer >= 0"
    sums = state.get("sums")
    if not isinstance(sums, list) or len(sums) > 9 or not all(finite(v) for v in sums):
        return "sums: not an epoch's running sums (up to 9 finite numbers)"
    return None


def _weights_fault(state: dict[str, Any]) -> str | None:
    """Whether the model's weights, and the EMA's where it has them, are state_dicts: mappings of names to
    tensors."""
    for key in ("model", "ema"):
        value = state.get(key)
        if key == "ema" and value is None:
            continue
        if (
            not isinstance(value, dict)
            or not value
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
        ):
            return f"{key}: not a mapping of names to tensors"
    return None


def _generators(value: Any) -> bool:
    """A process's generators as reslab saves them: the CPU's state, and CUDA's (a list, empty off a GPU)."""
    if not isinstance(value, dict):
        return False
    rng, cuda = value.get("rng"), value.get("cuda_rng", [])
    return (
        isinstance(rng, torch.Tensor)
        and rng.dtype == torch.uint8
        and rng.shape == torch.get_rng_state().shape
        and isinstance(cuda, list)
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
    )


def _settings(value: Any) -> bool:
    """A config as a checkpoint holds it: a mapping of plain settings."""
    return isinstance(value, dict) and _plain(value)


def _plain(value: Any) -> bool:
    """Settings as a config holds them: mappings, lists, strings, numbers, booleans, None; no tensor."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def _count(value: Any) -> bool:
    """An integer >= 0, not a bool."""
    return type(value) is int and value >= 0
