"""Fine-tuning (`model.init`) against training from scratch, on Fashion-MNIST split by class.

The six clothing classes (T-shirt, trouser, pullover, dress, coat, shirt) train a source net with the default
recipe, fast.yaml, on all their 36,000 training images. The four others (sandal, sneaker, bag, ankle boot) are
the new task, with few labelled images: the first N training images of each class. Each target run trains with
the same recipe, images and seed twice, from scratch and from the source's weights (with a new classifier), and
is tested on all 4,000 test images of its classes. A target run's batch is a tenth of its images, clipped to 8 to
128, with the peak learning rate scaled by it (0.2 at 128): 5, 10 and 31 steps an epoch at 10, 100 and 1,000
images a class.

Usage: .venv/bin/python benchmarks/finetune.py [--per-class 10,100,1000] [--seeds 3] [--epochs 20]
           [--work runs/finetune] [--out docs/results/finetune]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np

from reslab import config
from reslab.data import fashion_mnist
from reslab.data.idx import write_idx
from reslab.engine import fit
from reslab.studies.common import machine

SOURCE = (0, 1, 2, 3, 4, 6)  # clothes
TARGET = (5, 7, 8, 9)  # shoes and bags


def write_subset(arrays, classes: tuple[int, ...], per_class: int | None, out: Path) -> Path:
    """IDX files of `classes` (labels renumbered 0..k-1): the first `per_class` training images of each
    class in file order (all if None), and every test image of those classes."""
    out.mkdir(parents=True, exist_ok=True)
    for split, images, labels in (
        ("train", arrays.train_images, arrays.train_labels),
        ("t10k", arrays.test_images, arrays.test_labels),
    ):
        keep = [np.flatnonzero(labels == c)[: per_class if split == "train" else None] for c in classes]
        index = np.sort(np.concatenate(keep))
        relabel = np.searchsorted(classes, labels[index]).astype(np.uint8)
        write_idx(out / f"{split}-images-idx3-ubyte.gz", images[index])
        write_idx(out / f"{split}-labels-idx1-ubyte.gz", relabel)
    return out


def train(root: Path, classes: tuple[int, ...], out: Path, extra: list[str]) -> dict:
    names = (
        "[" + ",".join(fashion_mnist.CLASSES[c].replace(" ", "_").replace("/", "_") for c in classes) + "]"
    )
    overrides = ["data.name=idx", f"data.root={root}", f"data.classes={names}", *extra]
    if (out / "summary.json").exists():  # finished in an earlier call
        return json.loads((out / "summary.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):  # the epochs are in each run's metrics.jsonl
        return fit(config.load("fast", overrides), out, quiet=True, overwrite=True)


def table(rows: list[dict]) -> str:
    lines = [
        "| labelled images per class | from scratch | from the clothes net | gain, median of the seeds' pairs |",
        "|---:|---:|---:|---:|",
    ]
    for n in sorted({r["per_class"] for r in rows}):
        pairs = [r for r in rows if r["per_class"] == n]
        scratch = [r["scratch"] for r in pairs]
        init = [r["init"] for r in pairs]
        gain = statistics.median(r["init"] - r["scratch"] for r in pairs)

        def cell(values: list[float]) -> str:
            return f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})"

        lines.append(f"| {n:,} | {cell(scratch)} | {cell(init)} | {gain:+.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", default="10,100,1000")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("runs/finetune"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    arrays = fashion_mnist.load_arrays()
    source_dir = args.work / "source"
    source = train(write_subset(arrays, SOURCE, None, args.work / "data-source"), SOURCE, source_dir, [])
    print(
        f"source: {len(SOURCE)} classes, test acc {source['test_acc']:.4f}, {source['train_seconds']:.0f} s"
    )
    rows = []
    for n in (int(v) for v in args.per_class.split(",")):
        root = write_subset(arrays, TARGET, n, args.work / f"data-{n}")
        batch = min(128, max(8, len(TARGET) * n // 10))
        recipe = [
            f"train.epochs={args.epochs}",
            f"train.batch_size={batch}",
            f"optim.lr={0.2 * batch / 128:g}",
        ]
        for seed in range(args.seeds):
            row = {"per_class": n, "seed": seed, "batch": batch}
            for arm, init in (("scratch", []), ("init", [f"model.init={source_dir}"])):
                s = train(root, TARGET, args.work / f"{arm}-{n}-s{seed}", [*recipe, f"seed={seed}", *init])
                row[arm], row[f"{arm}_seconds"] = s["test_acc"], s["train_seconds"]
            print(
                f"{n:>5} per class, seed {seed}: scratch {row['scratch']:.4f}, from the clothes net {row['init']:.4f}"
            )
            rows.append(row)
    result = {
        "source": {"classes": [fashion_mnist.CLASSES[c] for c in SOURCE], "test_acc": source["test_acc"]},
        "target_classes": [fashion_mnist.CLASSES[c] for c in TARGET],
        "epochs": args.epochs,
        "runs": rows,
        "machine": machine(),
        "seconds": time.perf_counter() - start,
    }
    print(table(rows), end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "table.md").write_text(table(rows))


if __name__ == "__main__":
    main()
