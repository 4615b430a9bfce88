"""Fashion-MNIST as a folder of PNG files, the way people keep their own images (`train/<class>/*.png`,
`test/<class>/*.png`): how long `data.name: folder` takes to read 70,000 of them against the IDX files, and whether
it loads the same pixels and labels. `--train` then runs fast.yaml on the folder, to compare with `make train`.
Usage: .venv/bin/python benchmarks/folder_load.py --dir /tmp/fmnist-png [--train runs/fast-folder]
           [--out benchmarks/folder-load.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from reslab.config import DataConfig
from reslab.data import describe, fashion_mnist, load_dataset
from reslab.studies.common import machine


def write_pngs(root: Path) -> float:
    """Each split's images as root/split/<class>/<index>.png; seconds taken (nothing done if already there)."""
    if (root / "test").is_dir():
        return 0.0
    start = time.perf_counter()
    arrays = fashion_mnist.load_arrays()
    for split, images, labels in (
        ("train", arrays.train_images, arrays.train_labels),
        ("test", arrays.test_images, arrays.test_labels),
    ):
        for name in fashion_mnist.CLASSES:
            (root / split / name.replace("/", "-")).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            name = fashion_mnist.CLASSES[label].replace("/", "-")
            Image.fromarray(image).save(root / split / name / f"{i:05d}.png")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True, help="where the PNG files are written (once) and read")
    p.add_argument("--train", type=Path, help="also train fast.yaml on the folder into this run directory")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result = {"machine": machine(), "write_seconds": write_pngs(args.dir)}
    folder = DataConfig(name="folder", root=str(args.dir))
    start = time.perf_counter()
    result["describe"] = describe(folder)
    result["describe_seconds"] = time.perf_counter() - start
    timings = {}
    for name, cfg in (("idx", DataConfig()), ("folder", folder)):
        start = time.perf_counter()
        data = load_dataset(cfg)
        timings[name] = (time.perf_counter() - start, data)
        print(
            f"{name:>6}: {len(data.train_labels):,} + {len(data.test_labels):,} images in {timings[name][0]:.1f} s"
        )
    (idx_s, idx), (folder_s, own) = timings["idx"], timings["folder"]
    # the folder's classes are sorted by name, the IDX files' by label: compare each image with its class name
    folder_name = {
        c.replace("/", "-"): i for i, c in enumerate(idx.classes)
    }  # "T-shirt/top" -> "T-shirt-top"
    order = [folder_name[c] for c in own.classes]
    by_label = {
        split: sorted(zip(map(bytes, images.numpy()), (order[int(k)] for k in labels)))
        for split, images, labels in (
            ("train", own.train_images, own.train_labels),
            ("test", own.test_images, own.test_labels),
        )
    }
    same = all(
        by_label[split] == sorted(zip(map(bytes, images.numpy()), map(int, labels)))
        for split, images, labels in (
            ("train", idx.train_images, idx.train_labels),
            ("test", idx.test_images, idx.test_labels),
        )
    )
    result |= {"idx_seconds": idx_s, "folder_seconds": folder_s, "same_images_and_labels": same}
    print(f"the same images and labels: {same}; describe() in {result['describe_seconds']:.1f} s")
    if args.train:
        cmd = [
            sys.executable,
            "-m",
            "reslab",
            "train",
            "--config",
            "fast",
            "--out",
            str(args.train),
            "--overwrite",
        ]
        start = time.perf_counter()
        subprocess.run([*cmd, "--set", "data.name=folder", f"data.root={args.dir}"], check=True)
        result["train_seconds"] = time.perf_counter() - start
        result["train_summary"] = json.loads((args.train / "summary.json").read_text())
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
