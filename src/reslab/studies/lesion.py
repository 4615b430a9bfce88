"""Lesions (Veit, Wilber and Belongie 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks"): delete units of a trained net at test time and measure its test error.

A unit whose input and output have the same shape can be deleted. In a ResNet its residual branch goes (F(x) = 0)
and the rest stays: x' = f(s h(x)), which is x itself for an unscaled identity shortcut in every order but BN after
the addition (in the original order relu(x) = x, since x comes out of a ReLU). In its plain twin, which has no
shortcut, the unit is replaced by the identity: two layers leave the only path. Veit et al. found that a ResNet
barely notices one unit gone and degrades smoothly as more go, as an ensemble of many paths of different lengths
would, while a plain net fails (a VGG falls to chance). Units that change the shape (a stride or more channels)
stay. A unit can also go whole (without(whole=True)): x' = x, where the branch deletion leaves relu(BN(x)) with BN
after the addition, or x/2 with the shortcut scaled by 0.5 (benchmarks/lesion_whole.py sets the two side by side).

Beside the errors, each unit's change to the stream (stream_measures): how far its output lies from what deleting
it leaves, relative to that, and the stream's size. Does a unit that changes the stream little cost little to
delete? Mostly, not always (docs/studies/units.md).

Evaluated in eval mode, in the precision training resolves to on this machine, on the first `images` test images,
with BatchNorm's running statistics as trained (as Veit et al.) or re-estimated after each deletion on training
images (recalibrate_norms). The difference is what a deletion costs only because the layers after it keep the
statistics of a stream that had the unit in it. Each net's lesions are kept in its run directory (lesion.json, or
lesion-recalibrated.json), keyed by its checkpoint's SHA-256 and the settings, so a study run again reads them
back.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
from pathlib import Path

import torch
from torch import nn

from ..engine.precision import autocast, resolve_precision
from ..errors import ReslabError
from ..files import make_file_dir
from ..models import ResidualUnit
from .common import final_nets, machine, write_json

CPU = torch.device("cpu")
KEPT = "lesion.json"  # in a run directory: its net's lesions, under the key they were read with
KEPT_RECALIBRATED = "lesion-recalibrated.json"  # the same with the statistics re-estimated
STREAM = {"change", "stream"}  # what stream_measures adds to a net's lesions
KS = (2, 4, 8, 16)  # how many units the studies delete at random at a time


def deletable(model: nn.Module) -> list[str]:
    """The names of the units that keep their input's shape, input side first."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, ResidualUnit):
            first = next(c for c in m.residual if isinstance(c, nn.Conv2d))
            if first.stride == (1, 1) and first.in_channels == m.out_channels:
                names.append(name)
    return names


class NoBranch(nn.Module):
    """A deleted residual branch: F(x) = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def without(model: nn.Module, names: list[str], whole: bool = False) -> nn.Module:
    """A copy of `model` with the named units deleted: a unit with a shortcut loses its residual branch, one
    without (plain) is replaced by the identity. With `whole`, every named unit is replaced by the identity:
    x' = x, where losing only the branch leaves f(s h(x)) (the same in the units whose f(s h(x)) is x)."""
    lesioned = copy.deepcopy(model)
    for name in names:
        unit = lesioned.get_submodule(name)
        if unit.shortcut is not None and not whole:
            unit.residual = NoBranch()
        else:
            parent, _, child = name.rpartition(".")
            setattr(lesioned.get_submodule(parent), child, nn.Identity())
    return lesioned


@torch.no_grad()
def error_on(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str) -> float:
    """The share of the batches' images the model, in eval mode, gets wrong."""
    model.eval()
    wrong = total = 0
    with autocast(CPU, precision):
        for x, y in batches:
            wrong += (model(x).argmax(1) != y).sum().item()
            total += len(y)
    return wrong / total


@torch.no_grad()
def feed(model: nn.Module, batches, precision: str) -> None:
    """Each batch through the model in `precision`, the outputs dropped: for what its hooks, or its BatchNorms in
    train mode, read on the way."""
    with autocast(CPU, precision):
        for x, _ in batches:
            model(x)


@torch.no_grad()
def recalibrate_norms(model: nn.Module, batches, precision: str) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics, in place, as the plain average of its batch statistics
    over the batches (a moving average would weigh the last batches most); the model is returned in eval mode,
    its layers' momenta as they were. Nothing else changes: no gradient, no weight; every other layer reads in
    eval mode (no dropout)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
        m.train()
    try:
        feed(model, batches, precision)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model


@torch.no_grad()
def stream_measures(model: nn.Module, batches, precision: str) -> dict[str, list[float]]:
    """For each deletable unit, over the batches' values: "stream", the size rms(d(x)) of what deleting it leaves
    on the stream (d is the unit deleted, `without`; x itself for an identity shortcut in every order but BN after
    the addition), and "change", how much the unit changes that: rms(u(x) - d(x)) / rms(d(x)), u the unit. With
    an identity shortcut and no f after the addition (full pre-activation) the change is |F(x)| / |x|; in the
    original order, x' = relu(x + F(x)), it is what the ReLU lets through. In eval mode, in `precision`."""
    units = deletable(model)
    deleted = without(model, units).eval()
    # per unit: the sum of squares of u(x) - d(x), that of d(x), and the number of values
    sums = torch.zeros(len(units), 3, dtype=torch.float64)

    def hook(i: int):
        def read(module, inputs, output):  # at once: the next unit may work on its input in place
            kept = deleted.get_submodule(units[i])(inputs[0]).double()
            sums[i, 0] += (output.double() - kept).square().sum()
            sums[i, 1] += kept.square().sum()
            sums[i, 2] += kept.numel()

        return read

    handles = [model.get_submodule(u).register_forward_hook(hook(i)) for i, u in enumerate(units)]
    try:
        feed(model.eval(), batches, precision)
    finally:
        for h in handles:
            h.remove()
    return {
        "change": (sums[:, 0] / sums[:, 1]).sqrt().tolist(),
        "stream": (sums[:, 1] / sums[:, 2]).sqrt().tolist(),
    }


def lesions(
    model: nn.Module, batches, precision: str, ks: tuple[int, ...], samples: int, calibration=None
) -> dict:
    """One net's {"units", "intact", "single", "random", "change", "stream"} (of_nets); each net, the intact one
    too, with its statistics re-estimated on the `calibration` batches first where there are any."""
    units = deletable(model)

    def error(names: list[str]) -> float:
        return error_without(model, names, batches, precision, calibration)

    return {
        "units": units,
        "intact": error([]),
        "single": [error([u]) for u in units],
        "random": [
            {"k": k, "errors": [error(names) for names in drawn]} for k, drawn in draws(units, ks, samples)
        ],
        **stream_measures(model, batches, precision),
    }


def error_without(
    model: nn.Module, names: list[str], batches, precision: str, calibration=None, whole: bool = False
) -> float:
    """The test error on the batches of `model` with the named units deleted (`without`), its statistics
    re-estimated on the `calibration` batches first where there are any."""
    lesioned = without(model, names, whole)
    if calibration:
        recalibrate_norms(lesioned, calibration, precision)
    return error_on(lesioned, batches, precision)


def settings_of(batches, calibration, ks: tuple[int, ...], samples: int, precision: str) -> dict:
    """What a net's lesions were read with, beside its weights in the key they are kept under (key_of): the
    images, the ks and draws, the precision, and the calibration images where there are any (a key without them
    is that of the errors as trained, kept apart)."""
    settings = {
        "images": sum(len(y) for _, y in batches),
        "ks": list(ks),
        "samples": samples,
        "precision": precision,
    }
    if calibration:
        settings["recalibrate"] = sum(len(y) for _, y in calibration)
    return settings


def draws(units: list[str], ks: tuple[int, ...], samples: int) -> list[tuple[int, list[list[str]]]]:
    """For each k of `ks` below the number of units, `samples` sets of k units drawn at random: seeded, so every
    call (a study run again, a script beside it) draws the same sets."""
    draw = random.Random(0)
    return [(k, [draw.sample(units, k) for _ in range(samples)]) for k in ks if k < len(units)]


def draws_of(run_dir: Path, units: list[str], ks: list[int], samples: int) -> dict[int, list[list[str]]]:
    """The study's draws (draws, over KS) of each k in `ks`, for a script beside it; a k the study does not draw,
    as it draws only k below the number of units, is refused in one line rather than left out."""
    drawn = {k: sets for k, sets in draws(units, KS, samples) if k in ks}
    if missing := [str(k) for k in ks if k not in drawn]:
        raise ReslabError(
            f"--ks {','.join(missing)}: {run_dir} has {len(units)} deletable units; the study draws fewer at a time"
        )
    return drawn


def key_of(run_dir: Path, settings: dict) -> dict:
    """The key a run's lesions are kept under: its last.pt's SHA-256 and the settings they were read with."""
    return {"checkpoint_sha256": hashlib.sha256((run_dir / "last.pt").read_bytes()).hexdigest(), **settings}


def kept_in(path: Path) -> tuple[dict, dict] | None:
    """The key and the lesions a kept file holds, or None (no file, unreadable)."""
    try:
        saved = json.loads(path.read_text())
        return saved["key"], saved["lesions"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_kept(path: Path, key: dict) -> dict | None:
    """The lesions the file holds under `key`, or None (no file, another key, unreadable)."""
    found = kept_in(path)
    return found[1] if found is not None and found[0] == key else None


def first_images(data, data_cfg, images: int, train: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `images` test images (training images with `train`, as the test images are: no augmentation),
    normalized, channels_last, in batches of 500."""
    from ..data import make_test_loader

    if train:
        data = data.training()
    batches, n = [], 0
    for x, y in make_test_loader(data, data_cfg, 500, CPU):
        if n >= images:
            break
        batches.append((x[: images - n].contiguous(memory_format=torch.channels_last), y[: images - n]))
        n += len(batches[-1][1])
    return batches


def of_run(run_dir: Path, images: int, recalibrate: int) -> tuple[nn.Module, list, list, str]:
    """What a script lesions a run directory's net with: the net as it ended (channels_last), its first `images`
    test images and first `recalibrate` training images (first_images), and the precision training resolves to
    on this CPU."""
    from .. import config
    from ..data import load_dataset

    if not (nets := final_nets({run_dir.name: run_dir})):
        raise ReslabError(
            f"{run_dir}: no readable last.pt; give a run directory whose training has saved one"
        )
    ((model, _),) = nets.values()
    data_cfg = config.load(run_dir / "config.yaml").data
    data = load_dataset(data_cfg)
    return (
        model.to(memory_format=torch.channels_last),
        first_images(data, data_cfg, images),
        first_images(data, data_cfg, recalibrate, train=True),
        resolve_precision("auto", CPU),
    )


def measure_runs(p: argparse.ArgumentParser, measure) -> None:
    """The main of a script that lesions run directories in the study's draws (lesion_whole.py, lesion_paired.py):
    its shared arguments, --ks checked against the study's and --out before any net is measured, then
    `measure(args, run, ks)` for each run, all written to --out after each (a long run keeps what it measured)."""
    p.add_argument("runs", nargs="+", type=Path, help="run directories with a last.pt")
    p.add_argument("--ks", default="8,16", help="comma-separated: the study's draws of how many units")
    p.add_argument("--samples", type=int, default=20, help="draws for each k (the study's --draws)")
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--recalibrate", type=int, default=10000)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    study_ks = [str(k) for k in KS]  # only the study's draws are shared with its kept lesions
    if not set(args.ks.split(",")) <= set(study_ks):
        p.error(f"--ks {args.ks}: choose among the study's {','.join(study_ks)}")
    ks = [int(k) for k in args.ks.split(",")]
    nets = []
    try:
        out = args.out and make_file_dir(args.out, "results.json")
        for run in args.runs:
            nets.append(measure(args, run, ks))
            if out:
                write_json(out, {"nets": nets, "machine": machine()})
    except ReslabError as e:  # what was measured before is written already
        p.error(str(e))


def of_nets(
    nets: dict[str, tuple[nn.Module, dict]],
    data,
    data_cfg,
    images: int | None = None,
    ks: tuple[int, ...] = KS,
    samples: int = 3,
    run_dirs: dict[str, Path] | None = None,
    recalibrate: int = 0,
) -> dict:
    """{"images": n, "recalibrate": r, "nets": {name: {"units", "intact", "single", "random", "change", "stream"}}}
    for each model of `nets` (common.final_nets) with a unit to delete, on the first `images` test images of `data`
    (None: all): its test error intact, with each deletable unit deleted alone ("single", in the order of "units"),
    and with k of them deleted at random for each k of `ks` below their number ("random": [{"k", "errors"}],
    `samples` draws each, seeded: a rerun draws the same units); and each unit's "change" to the "stream" and its
    size (stream_measures). With `recalibrate`, every error is read after re-estimating the BatchNorm statistics
    on the first that many training images (r, at most all of them).
    A net named in `run_dirs` keeps its lesions in that directory's lesion.json (lesion-recalibrated.json), keyed
    by its last.pt's SHA-256, the images, ks, samples, precision (and recalibration images): read back while they
    match, read again (and rewritten) when any differs; a file written before the stream was measured gets those
    two added."""
    found: dict = {"images": 0, "recalibrate": 0, "nets": {}}
    if not nets:
        return found
    precision = resolve_precision("auto", CPU)
    batches = first_images(data, data_cfg, images or len(data.test_labels))
    calibration = first_images(data, data_cfg, recalibrate, train=True) if recalibrate else []
    settings = settings_of(batches, calibration, ks, samples, precision)
    found["images"], found["recalibrate"] = settings["images"], settings.get("recalibrate", 0)
    kept = KEPT_RECALIBRATED if calibration else KEPT
    for i, (name, (model, _)) in enumerate(nets.items(), 1):
        if not deletable(model):  # every CIFAR-style net has one: its first unit
            continue
        run_dir = (run_dirs or {}).get(name)
        key = saved = None
        if run_dir is not None and (run_dir / "last.pt").is_file():
            key = key_of(run_dir, settings)
            if (saved := read_kept(run_dir / kept, key)) is not None and STREAM <= set(saved):
                print(f"[lesions {i}/{len(nets)}] {name}: kept in {run_dir / kept}", flush=True)
                found["nets"][name] = saved
                continue
        print(f"[lesions {i}/{len(nets)}] {name}", flush=True)  # a minute or two each on all test images
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if saved is None:
            found["nets"][name] = lesions(model, batches, precision, ks, samples, calibration)
        else:  # kept before the changes were measured: the errors stand
            found["nets"][name] = {**saved, **stream_measures(model, batches, precision)}
        if key is not None:
            write_json(run_dir / kept, {"key": key, "lesions": found["nets"][name]})  # atomically
    return found


__all__ = [
    "NoBranch",
    "deletable",
    "error_on",
    "feed",
    "first_images",
    "lesions",
    "of_nets",
    "recalibrate_norms",
    "stream_measures",
    "without",
]
