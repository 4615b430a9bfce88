"""One whole training run with each step timed (fit's on_step hook): the median and spread of the steps' times in
each epoch, which say whether an epoch is slower throughout or by a few long pauses. Then, on the finished run's
last.pt, how many subnormal numbers (non-zero, below float32's smallest normal: slow on many CPUs) its weights and
momentum hold, and one training batch's gradients and activations. `--flush` runs with flush-to-zero
(torch.set_flush_denormal), which computes subnormals as zeros.
Usage: .venv/bin/python benchmarks/epoch_steps.py --out runs/steps [--config configs/fast.yaml] [--set seed=0]
           [--flush]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from reslab import config
from reslab.engine import checkpoint
from reslab.engine.fit import fit
from reslab.engine.run import prepare, restore

TINY = torch.finfo(torch.float32).tiny


def subnormals(tensors) -> str:
    counts = [
        (((t != 0) & (t.abs() < TINY)).sum().item(), t.numel()) for t in (t.detach().float() for t in tensors)
    ]
    return f"{sum(c for c, _ in counts):,} of {sum(n for _, n in counts):,}"


def census(cfg, out: Path) -> None:
    """Subnormals in the finished run's net: its weights and momentum, one batch's gradients and activations."""
    run = prepare(cfg, Path("/nonexistent"), quiet=True)
    restore(run, checkpoint.load(out / "last.pt"))
    acts = []
    leaves = [m for m in run.model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o.detach())) for m in leaves]
    x, y = next(iter(run.train_loader.batches(0)))
    mem = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    run.model.train()
    nn.functional.cross_entropy(run.model(x.contiguous(memory_format=mem)), y).backward()
    for h in hooks:
        h.remove()
    params = list(run.model.parameters())
    print(
        "subnormal numbers: weights",
        subnormals(params),
        "| momentum",
        subnormals(s["momentum_buffer"] for s in run.optimizer.state.values() if "momentum_buffer" in s),
        "| gradients",
        subnormals(p.grad for p in params if p.grad is not None),
        "| activations",
        subnormals(acts),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fast.yaml")
    p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--out", required=True)
    p.add_argument("--flush", action="store_true", help="flush subnormals to zero (torch.set_flush_denormal)")
    args = p.parse_args()
    cfg = config.load(args.config, args.set)
    if args.flush and not torch.set_flush_denormal(True):
        raise SystemExit("epoch_steps.py: this CPU cannot flush subnormals to zero")
    marks = []
    summary = fit(
        cfg,
        args.out,
        quiet=True,
        overwrite=True,
        on_step=lambda r: marks.append((r.epoch, time.perf_counter())),
    )
    torch.set_flush_denormal(False)
    steps: dict[int, list[float]] = {}
    for (e0, t0), (e1, t1) in zip(marks, marks[1:]):
        if e0 == e1:  # between two steps of one epoch: no testing or checkpoint between them
            steps.setdefault(e0, []).append(t1 - t0)
    for e, d in steps.items():
        d, mid = sorted(d), statistics.median(d)
        p10, p90 = (d[round(f * (len(d) - 1))] * 1e3 for f in (0.1, 0.9))
        print(
            f"epoch {e + 1}: {len(d)} steps, median {mid * 1e3:.1f} ms, p10 {p10:.1f}, p90 {p90:.1f}, "
            f"max {d[-1] * 1e3:.0f}; {sum(x > 2 * mid for x in d)} over twice the median; sum {sum(d):.1f} s"
        )
    print(f"final test accuracy {summary['test_acc']}, {summary['wall_seconds']:.0f} s")
    census(cfg, Path(args.out))


if __name__ == "__main__":
    main()
