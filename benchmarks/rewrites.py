"""Whole training steps with and without engine/rewrites.py's pool_before_relu (the stem's ReLU after its max-pool),
side by side in one run: alternating rounds, medians. Every other choice is training's (gemm_conv where it pays).
Usage: .venv/bin/python benchmarks/rewrites.py [--rounds 9] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from gemm_conv import alternate  # benchmarks/gemm_conv.py

from reslab import bench
from reslab.engine.host import keep_freed_memory
from reslab.engine.precision import bf16_native
from reslab.studies.common import machine

CPU = torch.device("cpu")
# (model, size, batch, precision): the seed recipe's step, the bench's, and the notebook's net in fp32
STEPS = [
    ("d2l-resnet18", 96, 256, "bf16"),
    ("d2l-resnet18", 96, 64, "bf16"),
    ("d2l-resnet18", 96, 64, "fp32"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    keep_freed_memory(CPU)
    rows = []
    for name, size, batch, precision in STEPS:
        if precision == "bf16" and not bf16_native(CPU):
            continue  # emulated bf16: minutes a step, and not what training runs here
        fns = {
            "relu_first": bench.make_step(name, size, batch, precision, pool_first=False),
            "pool_first": bench.make_step(name, size, batch, precision, pool_first=True),
        }
        t = alternate(fns, args.rounds)
        row = {"case": f"{name} @ {size}, batch {batch}, {precision} channels_last"}
        row |= {f"{k}_img_s": batch / s for k, s in t.items()} | {
            "speedup": t["relu_first"] / t["pool_first"]
        }
        print(
            f"{row['case']:<48} ReLU then pool {row['relu_first_img_s']:6.1f} img/s, "
            f"pool then ReLU {row['pool_first_img_s']:6.1f} img/s: {row['speedup']:.3f}x",
            flush=True,
        )
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps({"machine": machine(), "rounds": args.rounds, "steps": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
