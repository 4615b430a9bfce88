"""Whole training steps with and without each of engine/rewrites.py's rewrites, side by side in one run: a recipe's
model, batch, precision and update, with every other rewrite on and gemm_conv where it pays, as training runs them.
Each round times one step of each, back to back in alternating order; the speed-up is the median of the rounds'
ratios, with its quartiles: the gains are a few percent, the size of a shared machine's noise. Each variant is also
profiled, and the operators whose own CPU time the rewrite cuts most are printed, which is what it changes.
Usage: .venv/bin/python benchmarks/rewrites.py [--rounds 20] [--only REWRITE] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import profile

from reslab import bench, config
from reslab.cli import import_modules
from reslab.data import input_side
from reslab.engine.host import set_up
from reslab.engine.precision import bf16_native, resolve_precision
from reslab.engine.rewrites import REWRITES
from reslab.studies.common import machine

CPU = torch.device("cpu")
# (rewrite, recipe, overrides): the rewrite where it acts, on the recipes that train with it
CASES = [
    ("pool_before_relu", "seed", []),  # the notebook's net at 96 px, batch 256
    ("pool_before_relu", "seed", ["train.batch_size=64"]),  # the bench's batch
    ("pool_before_relu", "seed", ["train.batch_size=64", "precision=fp32"]),
    ("global_avg_pool", "fast", []),  # the default recipe's ResNet-8, batch 128
    ("global_avg_pool", "fast", ["precision=fp32"]),
    ("global_avg_pool", "best", []),  # ResNet-20, batch 512
    ("global_avg_pool", "fast", ["model.name=se-resnet8"]),  # examples/se_resnet.py: a pool in every unit
]


def op_ms(step, steps: int = 3) -> Counter:
    """Milliseconds per step of each ATen operator's own CPU time (profiled)."""
    with profile() as prof:
        for _ in range(steps):
            step()
    averages = prof.key_averages()
    return Counter(
        {e.key: e.self_cpu_time_total / steps / 1000 for e in averages if e.key.startswith("aten::")}
    )


def compare(rewrite: str, recipe: str, overrides: list[str], rounds: int) -> dict | None:
    cfg = config.load(recipe, overrides)
    precision = resolve_precision(cfg.precision, CPU)
    if precision == "bf16" and not bf16_native(CPU):
        return None  # emulated bf16: minutes a step, and not what training runs here
    size = input_side(cfg.data)  # for the row
    fns = {
        "without": bench.recipe_step(cfg, precision, skip=(rewrite,)),
        "with": bench.recipe_step(cfg, precision),
    }
    times = bench.paired(fns, rounds)
    ratios = [t["without"] / t["with"] for t in times]
    before, after = op_ms(fns["without"]), op_ms(fns["with"])
    cut = sorted(before, key=lambda k: after[k] - before[k])[:3]
    row = {
        "rewrite": rewrite,
        "case": f"{recipe} {' '.join(overrides)}".strip(),
        "step": f"{cfg.model.name} @ {size}, batch {cfg.train.batch_size}, {precision}",
        "without_img_s": cfg.train.batch_size / statistics.median(t["without"] for t in times),
        "with_img_s": cfg.train.batch_size / statistics.median(t["with"] for t in times),
        "speedup": statistics.median(ratios),
        "speedup_quartiles": statistics.quantiles(ratios, n=4)[::2],
        "ops_cut_ms": {k: [before[k], after[k]] for k in cut},
    }
    q1, q3 = row["speedup_quartiles"]
    ops = ", ".join(f"{k[6:]} {b:.1f} -> {a:.1f}" for k, (b, a) in row["ops_cut_ms"].items())
    print(
        f"{rewrite:<17} {row['step']:<34} without {row['without_img_s']:7.1f} img/s, with {row['with_img_s']:7.1f}"
        f" img/s: {row['speedup']:.3f}x (quartiles {q1:.3f}, {q3:.3f}); ms a step: {ops}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--only", choices=list(REWRITES), help="measure only this rewrite's cases")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    set_up(CPU)
    import_modules([str(Path(__file__).parent.parent / "examples" / "se_resnet.py")])
    rows = [compare(*case, args.rounds) for case in CASES if args.only in (None, case[0])]
    if args.out:
        with open(args.out, "w") as f:
            out = {"machine": machine(), "rounds": args.rounds, "steps": [r for r in rows if r]}
            f.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
