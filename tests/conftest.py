"""Shared fixtures: tiny IDX datasets written by the tests themselves (no network, no real files needed)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from reslab.data.idx import idx_bytes, write_idx  # noqa: F401 (the tests import them from here)

REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
# marks of a test or parameter that needs a CUDA GPU: skipped without one, selected by `pytest -m cuda`
NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def make_images(n: int, seed: int, size: int = 28, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: class k is a bright horizontal band at row 2k+3 (not mirror-symmetric: a
    bright left half), plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    for i, k in enumerate(labels):
        row = 2 * int(k) + 3
        images[i, row : row + 2, : size // 2 + 4] = 230
    return images, labels


def make_dataset(directory: Path, n_train: int = 512, n_test: int = 256, compress: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = make_images(n, seed)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return directory


def load_script(name: str) -> types.ModuleType:
    """benchmarks/<name>.py as a module, for testing its functions (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture(autouse=True)
def no_crowded_warning(monkeypatch):
    """Runs in the test process never warn that their threads waited for a CPU: whether they wait depends on what
    else the machine runs, and a test that counts stderr's lines would fail on a busy machine. The warning itself
    is tested in subprocesses (test_host.py), which this leaves alone."""
    fit_module = importlib.import_module("reslab.engine.fit")  # reslab.engine's `fit` is the function
    monkeypatch.setattr(fit_module, "CROWDED", 1.1)  # above any share of the time


@pytest.fixture(scope="session", autouse=True)
def subprocess_temp_dir(tmp_path_factory):
    """torchrun leaves a directory of each run's logs in the temp directory (~40 a session in /tmp): the tests'
    processes take pytest's own, which pytest clears with its old sessions."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        yield


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


def tiny_overrides(data_dir: Path, **extra) -> list[str]:
    """Overrides for a fast run on the tiny dataset."""
    values = {
        "data.root": str(data_dir),
        "model.name": "resnet8",
        "train.epochs": 2,
        "train.batch_size": 64,
        "train.eval_batch_size": 128,
        "optim.lr": 0.05,
        "precision": "fp32",
        "device": "cpu",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


class Crash(Exception):
    pass


def crash_then_resume(cfg, out: Path, epoch: int = 1, batch: int = 5) -> None:
    """Train `cfg` into `out`, crash at (epoch, batch), check that the crash came, then resume from the run's own
    config.yaml to the end."""
    from reslab import config
    from reslab.engine import fit

    def crash(run):
        if run.epoch == epoch and run.batch == batch:
            raise Crash

    with pytest.raises(Crash):
        fit(cfg, out, quiet=True, on_step=crash)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == epoch  # the epochs finished before it
    fit(config.load(out / "config.yaml"), out, resume=True, quiet=True)
