"""Is a deleted unit's cost its residual's average, or what varies from image to image? (docs/studies/units.md,
"Zero or mean").

A lesion sets a unit's residual F(x) to zero (lesion.without). A unit whose F has a large average, the same for
every image, moves the whole stream when it goes; nothing between the stream and the classifier re-centres it
where the net has no BatchNorm on the stream (every unit but full pre-activation, BN after the addition and
the 1x1-conv shortcut, whose projection has one), even with the statistics re-estimated. Here each deletable
unit goes twice, each time with the BatchNorm statistics re-estimated on the first --recalibrate training images
(lesion.recalibrate_norms):
- zero: F(x) = 0, the study's lesion;
- mean: F(x) = its mean over those training images at every channel and position, the same for every image.
If the cost is the lost average, the mean lesion costs little; if it is what F does for each image, both cost
alike. Beside them, how much of F is its average: rms(mean) / rms(F).

Evaluated on the first --images test images, in eval mode, in the precision training resolves to (as the study).

Usage: .venv/bin/python benchmarks/lesion_mean.py RUN_DIR... [--units stage1.0,stage2.1] [--images 10000]
           [--recalibrate 1000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.files import make_file_dir
from reslab.studies import lesion
from reslab.studies.common import machine


class MeanBranch(nn.Module):
    """A residual branch replaced by a constant: its average output, broadcast to the batch."""

    def __init__(self, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean.to(x.dtype).expand(len(x), -1, -1, -1)


@torch.no_grad()
def branch_moments(model: nn.Module, units: list[str], batches, precision: str) -> dict[str, tuple]:
    """Per unit: the mean of its residual's output over the batches (channels x height x width), and the rms of
    that output and of its mean, in eval mode."""
    sums = {u: [0.0, 0.0, 0] for u in units}  # sum of outputs, sum of squares, images

    def hook(u: str):
        def read(module, inputs, output):
            out = output.float()
            sums[u][0] = sums[u][0] + out.sum(0)
            sums[u][1] += out.square().sum().item()
            sums[u][2] += len(out)

        return read

    handles = [model.get_submodule(u).residual.register_forward_hook(hook(u)) for u in units]
    try:
        lesion.feed(model.eval(), batches, precision)
    finally:
        for h in handles:
            h.remove()
    moments = {}
    for u, (total, squares, n) in sums.items():
        mean = total / n
        moments[u] = (mean, (squares / (n * mean.numel())) ** 0.5, mean.square().mean().sqrt().item())
    return moments


def measure(run: Path, units: list[str] | None, images: int, recalibrate: int) -> dict:
    model, batches, calibration, precision = lesion.of_run(run, images, recalibrate)
    units = units or lesion.deletable(model)
    moments = branch_moments(model, units, calibration, precision)

    def error(net: nn.Module) -> float:
        return lesion.error_on(lesion.recalibrate_norms(net, calibration, precision), batches, precision)

    intact = error(lesion.without(model, []))
    rows = []
    for u in units:
        mean, rms, mean_rms = moments[u]
        with_mean = lesion.without(model, [])
        with_mean.get_submodule(u).residual = MeanBranch(mean)
        row = {
            "unit": u,
            "zero": error(lesion.without(model, [u])),
            "mean": error(with_mean),
            "branch_rms": rms,
            "mean_share": mean_rms / rms,
        }
        rows.append(row)
        print(
            f"{run.name} {u}: cost zero {100 * (row['zero'] - intact):.1f} points, mean"
            f" {100 * (row['mean'] - intact):.1f}; rms(mean)/rms(F) {row['mean_share']:.2f}",
            flush=True,
        )
    return {"run": str(run), "intact": intact, "units": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories with a last.pt")
    p.add_argument("--units", help="comma-separated unit names (default: every deletable unit)")
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--recalibrate", type=int, default=1000)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    units = args.units.split(",") if args.units else None
    try:
        out = args.out and make_file_dir(args.out, "results.json")
        nets = [measure(run, units, args.images, args.recalibrate) for run in args.runs]
    except ReslabError as e:
        p.error(str(e))
    if out:
        out.write_text(
            json.dumps(
                {"images": args.images, "recalibrate": args.recalibrate, "nets": nets, "machine": machine()},
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
