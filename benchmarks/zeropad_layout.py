"""The zero-padding shortcut before and after d841b80, side by side in one process: subsampling by slicing, whose
gradient is a new NCHW tensor, against a 1x1 average pool of stride 2, whose gradient keeps the input's layout.
Checks that both give the same gradients, then times bare training steps (forward, backward, SGD) of the two in
alternating rounds and compares the medians.

Usage: .venv/bin/python benchmarks/zeropad_layout.py [--model resnet8 --set width=32 first_stride=2]
       [--batch 128] [--device cpu] [--precision fp32] [--rounds 7] [--steps 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from reslab import bench
from reslab.models import ZeroPadShortcut, build_model

POOLED = ZeroPadShortcut.forward


def sliced(self, x: torch.Tensor) -> torch.Tensor:
    """ZeroPadShortcut.forward as it was before d841b80."""
    if self.stride > 1:
        x = x[:, :, :: self.stride, :: self.stride]
    if self.extra > 0:
        x = nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra))
    return x


VARIANTS = {"slice (before)": sliced, "1x1 average pool (now)": POOLED}


def gradients(name: str, size: int, device: torch.device, options: dict) -> list[list[torch.Tensor]]:
    """Each variant's parameter gradients of the same model and batch."""
    out = []
    for forward in VARIANTS.values():
        ZeroPadShortcut.forward = forward
        torch.manual_seed(0)
        model = build_model(name, 1, 10, **options).to(device=device, memory_format=torch.channels_last)
        x = torch.randn(8, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
        model(x).square().mean().backward()
        out.append([p.grad for p in model.parameters()])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--set", nargs="*", default=["width=32", "first_stride=2"], dest="options")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=8, help="steps of each variant a round")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.options)}
    device = torch.device(args.device)

    before, now = gradients(args.model, args.size, device, options)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(before, now))
    # the same model and batch for both; each round below sets the variant's forward before its steps
    steps = {
        label: bench.make_step(args.model, args.size, args.batch, args.precision, True, device, **options)
        for label in VARIANTS
    }
    img_s = {label: [] for label in steps}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for label, step in steps.items():
            ZeroPadShortcut.forward = VARIANTS[label]
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            bench.wait(device)
            if round_:
                img_s[label].append(args.steps * args.batch / (time.perf_counter() - start))
    ZeroPadShortcut.forward = POOLED
    medians = {label: statistics.median(v) for label, v in img_s.items()}
    (old, new) = medians.values()
    print(
        f"{args.model} {options}, batch {args.batch}, {args.precision}, {device.type}, {args.rounds} rounds of "
        f"{args.steps} steps; largest gradient difference {max_diff:.3g}"
    )
    for label, value in medians.items():
        print(f"  {label:<24} {value:9,.0f} img/s (median)")
    print(f"  speed-up {new / old:.3f}x")
    if args.out:
        result = {
            **vars(args),
            "options": options,
            "max_grad_diff": max_diff,
            "img_s": img_s,
            "medians": medians,
        }
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
