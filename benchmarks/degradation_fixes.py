"""A test of the degradation study's mechanism (docs/studies/degradation.md, "Do the plain nets' gradients
vanish?"). If a plain net trains worse because the gradient explosion of its first steps grows its early layers'
weights, and so shrinks those layers' effective learning rate, then a change that limits or undoes that growth
should train it better: a longer warm-up (smaller steps while the gradients explode), stronger weight decay
(which shrinks grown weights back), or clipping the gradients' global norm to 1 or 10 (which bounds every step,
however large the gradient).

Trains one net with the study's recipe at its 2,800-step budget (all images, 6 epochs, crops and flips, seed 0
unless --seed), as the study does and with each change, then reports the final training and test error, each 3x3
layer's weight norm after training over its norm at initialisation (`studies.gradients.weight_growth`), and the
ratio of the first 3x3 layer's gradient RMS to the last's after training (`layer_gradients`, first 1,024 test
images), and the first epoch's training error and the first and last epochs' gradient norms (metrics.jsonl).
Runs already in OUT/runs are not trained again.

Usage: .venv/bin/python benchmarks/degradation_fixes.py [--net plain56] [--out runs/degradation-fixes]
    [--changes as-in-the-study,warmup-2-epochs,weight-decay-5e-4] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from early_gradients import BUDGET  # the study's 2,800-step budget, seed 0

from reslab import config
from reslab.data import load_dataset
from reslab.studies import degradation
from reslab.studies.common import final_nets, machine, run_grid
from reslab.studies.gradients import of_nets

CHANGES = {
    "as-in-the-study": [],
    "warmup-2-epochs": ["optim.warmup_epochs=2"],
    "weight-decay-5e-4": ["optim.weight_decay=5e-4"],
    "grad-clip-1": ["optim.grad_clip=1"],
    "grad-clip-10": ["optim.grad_clip=10"],
}


def norms(epoch: dict) -> str:
    """An epoch's mean gradient norm (largest): '-' for a run from before reslab kept them."""
    return f"{epoch['grad_norm']:.3g} ({epoch['grad_norm_max']:.3g})" if "grad_norm" in epoch else "-"


def table(net: str, rows: list[dict]) -> str:
    lines = [
        f"| {net}: change | train error | test error | weight growth: stem | 2nd-3rd layers | median "
        "| layers grown > 2x | gradient first / last, trained | train error, epoch 1 "
        "| gradient norm, epoch 1 / last: mean (largest) | steps clipped, epoch 1 / last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        g, first, last = r["growth"], r["epochs"][0], r["epochs"][-1]
        clipped = "-" if "clipped" not in first else f"{first['clipped']:.0%} / {last['clipped']:.0%}"
        lines.append(
            f"| {r['change']} | {r['train_error']:.3f} | {r['test_error']:.3f} | {g[0]:.2f} | "
            f"{min(g[1:3]):.2f}-{max(g[1:3]):.2f} | {statistics.median(g):.2f} | {sum(x > 2 for x in g)} of "
            f"{len(g)} | {r['first_over_last']:.3g} | {1 - first['train_acc']:.3f} | {norms(first)} / "
            f"{norms(last)} | {clipped} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="plain56")
    parser.add_argument("--out", type=Path, default=Path("runs/degradation-fixes"))
    parser.add_argument(
        "--changes",
        default="as-in-the-study,warmup-2-epochs,weight-decay-5e-4",
        help=f"comma-separated, of: {', '.join(CHANGES)}",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chosen = args.changes.split(",")
    if unknown := [c for c in chosen if c not in CHANGES]:
        parser.error(f"unknown change {', '.join(unknown)}; the changes are: {', '.join(CHANGES)}")
    start = time.perf_counter()
    fixed = [f"model.name={args.net}", f"seed={args.seed}"]
    runs = [(name, config.load(None, degradation.RECIPE + BUDGET + CHANGES[name] + fixed)) for name in chosen]
    results = run_grid(runs, args.out)
    data_cfg = runs[0][1].data
    found = of_nets(final_nets({n: args.out / "runs" / n for n, _ in runs}), load_dataset(data_cfg), data_cfg)
    rows = []
    for r in results:
        name, s = r["name"], r["summary"]
        rms = found["trained"][name]
        rows.append(
            {
                "change": name,
                "overrides": CHANGES[name],
                "train_error": 1 - s["train_acc"],
                "test_error": 1 - s["test_acc"],
                "growth": found["growth"][name],
                "first_over_last": rms[0] / rms[-1],
                "epochs": [  # each epoch's training accuracy and, from runs that kept them, its gradient norms
                    {k: h[k] for k in ("train_acc", "grad_norm", "grad_norm_max", "clipped") if k in h}
                    for h in r["history"]
                ],
            }
        )
    text = table(args.net, rows)
    print(text)
    payload = {
        "net": args.net,
        "seed": args.seed,
        "rows": rows,
        "machine": machine(),
        "seconds": time.perf_counter() - start,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "table.md").write_text(text)


if __name__ == "__main__":
    main()
