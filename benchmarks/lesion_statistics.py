"""What deleting a unit does to the statistics the BatchNorm after it was fitted to (docs/studies/units.md,
"Re-estimating the statistics").

For each run directory and each named unit: the input of the first BatchNorm after the unit (the next unit's
first one), on the first --images test images, in fp32, eval mode, with the unit deleted (lesion.without) and
intact. Per channel, how far its mean lies from the BN's running mean, in running standard deviations, and its
variance over the running variance; the medians over the channels the stage's input carried, and over those its
downsampling shortcut zero-pads (where the stream holds only what the stage's units added).

Usage: .venv/bin/python benchmarks/lesion_statistics.py RUN_DIR... [--units stage2.1,stage3.1,stage2.4]
           [--images 2000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from reslab import config
from reslab.data import load_dataset
from reslab.studies import lesion
from reslab.studies.common import final_nets, machine


def next_norm(model: nn.Module, unit: str) -> str:
    """The name of the first BatchNorm after the unit, outside it."""
    names = [n for n, _ in model.named_modules()]
    after = names[names.index(unit) + 1 :]
    return next(
        n
        for n in after
        if not n.startswith(unit + ".") and isinstance(model.get_submodule(n), nn.BatchNorm2d)
    )


@torch.no_grad()
def shift(model: nn.Module, norm: str, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of the BatchNorm's input: (mean - running mean) / running sd, and variance / running var."""
    bn, seen = model.get_submodule(norm), []
    handle = bn.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].float()))
    try:
        lesion.feed(model.eval(), batches, "fp32")
    finally:
        handle.remove()
    x = torch.cat(seen).transpose(0, 1).reshape(bn.num_features, -1)
    return (x.mean(1) - bn.running_mean) / bn.running_var.sqrt(), x.var(1) / bn.running_var


def measure(run: Path, units: list[str], images: int) -> list[dict]:
    ((model, _),) = final_nets({run.name: run}).values()
    data_cfg = config.load(run / "config.yaml").data
    batches = [(x.float(), y) for x, y in lesion.first_images(load_dataset(data_cfg), data_cfg, images)]
    rows = []
    for unit in units:
        norm = next_norm(model, unit)
        first = model.get_submodule(unit.rsplit(".", 1)[0] + ".0")  # the stage's downsampling unit
        carried = next(c for c in first.residual if isinstance(c, nn.Conv2d)).in_channels
        row = {"run": str(run), "unit": unit, "norm": norm, "carried_channels": carried}
        for state, net in (("intact", model), ("deleted", lesion.without(model, [unit]))):
            z, ratio = shift(net, norm, batches)
            for part, cut in (("carried", slice(0, carried)), ("padded", slice(carried, None))):
                if len(z[cut]):
                    row[f"{state}_{part}_mean_shift"] = z[cut].abs().median().item()
                    row[f"{state}_{part}_var_ratio"] = ratio[cut].median().item()
        rows.append(row)
        padded = (
            f"; zero-padded channels |shift| {row['deleted_padded_mean_shift']:.2f}"
            f" var {row['deleted_padded_var_ratio']:.2f}"
            if "deleted_padded_var_ratio" in row
            else ""
        )
        print(
            f"{run} {unit} -> {norm}, deleted: carried channels |shift| {row['deleted_carried_mean_shift']:.2f}"
            f" var {row['deleted_carried_var_ratio']:.2f}{padded} (intact: var {row['intact_carried_var_ratio']:.2f})",
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories with a last.pt")
    p.add_argument("--units", default="stage2.1,stage3.1,stage2.4")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = [row for run in args.runs for row in measure(run, args.units.split(","), args.images)]
    if args.out:
        args.out.write_text(
            json.dumps({"images": args.images, "rows": rows, "machine": machine()}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
