"""The backward signal over the first training steps of the degradation study's nets: how soon the plain nets'
gradient explosion at initialisation (docs/studies/degradation.md, "Backward signals") subsides.

Trains each net with the study's recipe at its 2,800-step budget (all images, 6 epochs, crops and flips, seed 0)
and, at step 0 and every --every steps up to --steps, measures `studies.gradients.layer_gradients` on the first
1,024 test images, then stops the run. A probe leaves weights and BN running statistics as they were, and clears
only gradients the next step would clear, so the probes change nothing of the run.

Usage: .venv/bin/python benchmarks/early_gradients.py [--nets plain56,resnet56] [--steps 450] [--every 25]
           [--out docs/studies/degradation-early-gradients-c]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import torch

from reslab import config
from reslab.data import load_dataset, make_test_loader
from reslab.engine import prepare, train_one_epoch
from reslab.studies import degradation
from reslab.studies.common import machine
from reslab.studies.gradients import layer_gradients
from reslab.studies.responses import label

BUDGET = ["train.epochs=6", "data.crop_padding=2", "data.flip=true", "seed=0"]


class Enough(Exception):
    """Raised from the step hook once the last probe is taken."""


def probe_run(name: str, steps: int, every: int, sample: list) -> list[dict]:
    """The first `steps` training steps of `name` under the study's recipe, probed every `every` steps."""
    cfg = config.load(None, degradation.RECIPE + BUDGET + [f"model.name={name}"])
    probes: list[dict] = []

    def measure(model: torch.nn.Module, step: int) -> None:
        # leaves the model in train mode, as it was but for its gradients
        rms = layer_gradients(model, sample)
        probes.append({"step": step, "first_over_last": rms[0] / rms[-1], "rms": rms})

    done = 0

    def on_step(run) -> None:
        nonlocal done
        done += 1
        if done % every == 0:
            measure(run.model, done)
        if done >= steps:
            raise Enough

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        run = prepare(cfg, Path(tmp) / name, quiet=True)
        measure(run.model, 0)  # the run's own initialisation, before its first update
        with contextlib.suppress(Enough):
            for epoch in range(cfg.train.epochs):
                train_one_epoch(run, epoch, on_step)
                run.finish_epoch()  # as fit() goes on
    return probes


def figure(found: dict, path: Path) -> None:
    from reslab.plots import plt, save

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, probes) in enumerate(found.items()):
        style = "-" if name.startswith("resnet") else "--"
        ax.plot(
            [p["step"] for p in probes],
            [p["first_over_last"] for p in probes],
            style,
            marker=".",
            color=f"C{i}",
            label=label(name),
        )
    ax.set(
        xlabel="training step",
        ylabel="gradient RMS, first 3x3 layer / last",
        yscale="log",
        title="the backward signal over the first steps (warm-up: 234 steps)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="plain56,resnet56")
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    data_cfg = config.load(None, BUDGET).data
    test = make_test_loader(load_dataset(data_cfg), data_cfg, 128, torch.device("cpu"))
    sample = [b for _, b in zip(range(8), test)]
    found = {}
    for name in args.nets.split(","):
        found[name] = probe_run(name, args.steps, args.every, sample)
        line = ", ".join(f"{p['step']}: {p['first_over_last']:.3g}" for p in found[name])
        print(f"{label(name)}, first / last layer's gradient RMS by step: {line}", flush=True)
    seconds = time.perf_counter() - start
    print(f"{seconds:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "nets": found,
            "images": sum(len(y) for _, y in sample),
            "machine": machine(),
            "seconds": seconds,
        }
        (args.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        figure(found, args.out / "figure.png")


if __name__ == "__main__":
    main()
