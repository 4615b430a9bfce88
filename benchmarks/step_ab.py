"""Bare training steps of two variants of one recipe, side by side in one run: each variant is the recipe with its
own overrides (model options, batch size, precision), its step made as training's (bench.recipe_step). Each round
times `--steps` steps of each, back to back in alternating order; prints each round's milliseconds a step, the
medians, and the median of the rounds' ratios (B's time over A's).
Usage: .venv/bin/python benchmarks/step_ab.py --config configs/fast.yaml --a model.options.stem_width=16 \
           --b model.options.stem_width=32 [--set precision=fp32] [--rounds 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from reslab import bench, config
from reslab.engine.precision import resolve_precision


def variant(recipe: str, overrides: list[str], steps: int):
    cfg = config.load(recipe, overrides)
    step = bench.recipe_step(cfg, resolve_precision(cfg.precision, torch.device("cpu")))

    def run():
        for _ in range(steps):
            step()

    run.model = step.model
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fast.yaml")
    p.add_argument("--a", nargs="*", default=[], help="overrides of variant A (key=value)")
    p.add_argument("--b", nargs="*", default=[], help="overrides of variant B (key=value)")
    p.add_argument("--set", nargs="*", default=[], help="overrides of both")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    fns = {k: variant(args.config, [*args.set, *o], args.steps) for k, o in (("A", args.a), ("B", args.b))}
    times = bench.paired(fns, args.rounds, warmup=1)
    for k, overrides in (("A", args.a), ("B", args.b)):
        ms = [t[k] / args.steps * 1e3 for t in times]
        print(
            f"{k} {' '.join(overrides) or '(the recipe)'}: {statistics.median(ms):.1f} ms a step, rounds",
            end=" ",
        )
        print(", ".join(f"{m:.1f}" for m in ms))
    print(f"B / A: {statistics.median(t['B'] / t['A'] for t in times):.3f}, median of {args.rounds} rounds")


if __name__ == "__main__":
    main()
