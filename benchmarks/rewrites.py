"""Whole training steps with and without engine/rewrites.py's pool_before_relu (the stem's ReLU after its max-pool),
side by side in one run. Every other choice is training's (gemm_conv where it pays). Each round times one step of
each, back to back in alternating order; the speed-up is the median of the rounds' ratios, with its quartiles:
the gain is a few percent, the size of a shared machine's noise. Each variant's ReLU kernels are also timed under
torch.profiler (their own CPU time per step), which is what the rewrite changes.
Usage: .venv/bin/python benchmarks/rewrites.py [--rounds 20] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.profiler import profile

from reslab import bench
from reslab.engine.host import set_up
from reslab.engine.precision import bf16_native
from reslab.studies.common import machine

CPU = torch.device("cpu")
RELU_OPS = ("aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_", "aten::threshold_backward")
# (model, size, batch, precision): the seed recipe's step, the bench's, and the notebook's net in fp32
STEPS = [
    ("d2l-resnet18", 96, 256, "bf16"),
    ("d2l-resnet18", 96, 64, "bf16"),
    ("d2l-resnet18", 96, 64, "fp32"),
]


def relu_ms(step, steps: int = 3) -> float:
    """Milliseconds per step spent in ReLU kernels, forward and backward (their own CPU time, profiled)."""
    with profile() as prof:
        for _ in range(steps):
            step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in RELU_OPS) / steps / 1000


def compare(name: str, size: int, batch: int, precision: str, rounds: int) -> dict:
    fns = {
        "relu_first": bench.make_step(name, size, batch, precision, pool_first=False),
        "pool_first": bench.make_step(name, size, batch, precision, pool_first=True),
    }
    times = bench.paired(fns, rounds)
    ratios = [t["relu_first"] / t["pool_first"] for t in times]
    row = {"case": f"{name} @ {size}, batch {batch}, {precision} channels_last"}
    for k, fn in fns.items():
        row[f"{k}_img_s"] = batch / statistics.median(t[k] for t in times)
        row[f"{k}_relu_ms"] = relu_ms(fn)
    row["speedup"] = statistics.median(ratios)
    row["speedup_quartiles"] = statistics.quantiles(ratios, n=4)[::2]
    q1, q3 = row["speedup_quartiles"]
    print(
        f"{row['case']:<48} ReLU then pool {row['relu_first_img_s']:6.1f} img/s, then ReLU "
        f"{row['pool_first_img_s']:6.1f} img/s: {row['speedup']:.3f}x (quartiles {q1:.3f}, {q3:.3f}); "
        f"ReLU kernels {row['relu_first_relu_ms']:.1f} vs {row['pool_first_relu_ms']:.1f} ms a step",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    set_up(CPU)
    rows = []
    for name, size, batch, precision in STEPS:
        if precision == "bf16" and not bf16_native(CPU):
            continue  # emulated bf16: minutes a step, and not what training runs here
        rows.append(compare(name, size, batch, precision, args.rounds))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps({"machine": machine(), "rounds": args.rounds, "steps": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
