"""Which convolution geometries PyTorch's own bf16 CPU convolution (oneDNN) gets the weight gradient of wrong, and
whether reslab's (engine/gemm_conv.Conv2d as bf16 training uses it on every CPU) gets each right.

For every map side, kernel, stride and padding in the grid, a few calls of each (half channels_last) compare the
weight gradient in bf16 with fp32's; a relative error over 0.03 (bf16's own is ~0.003) counts as wrong. Prints the
wrong geometries with how many calls of each were wrong, and whether every one strides past its input's side.
A new PyTorch where it prints no wrong geometry no longer needs the workaround. Then what the workaround costs
where nothing strides past its side: fast.yaml's bf16 training step with every convolution a gemm_conv.Conv2d (as
bf16 training on a CPU without AMX has them) against plain nn.Conv2d, alternating rounds, medians.

Usage: .venv/bin/python benchmarks/onednn_bf16_scan.py [--calls 6] [--rounds 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
from torch import nn

from reslab import bench, config
from reslab.engine import gemm_conv


def relative_error(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor, reference: torch.Tensor) -> float:
    conv.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.backward(grad.to(out.dtype))
    # a geometry whose every window reads padding alone has a zero gradient: then any difference is wrong
    return ((conv.weight.grad.float() - reference).norm() / reference.norm().clamp_min(1e-6)).item()


def scan(calls: int) -> list[dict]:
    torch.manual_seed(0)
    rows = []
    for side, kernel, stride, padding in itertools.product(
        range(1, 11), (1, 3, 5, 7), (1, 2, 3, 4), (0, 1, 2, 3)
    ):
        if side + 2 * padding < kernel:
            continue
        wrong = {"pytorch": 0, "reslab": 0}
        for call in range(calls):
            layout = torch.channels_last if call % 2 == 0 else torch.contiguous_format
            plain = nn.Conv2d(16, 32, kernel, stride, padding, bias=False).to(memory_format=layout)
            ours = nn.Conv2d(16, 32, kernel, stride, padding, bias=False).to(memory_format=layout)
            ours.load_state_dict(plain.state_dict())
            gemm_conv.use_gemm_convs(ours, small_maps=False)
            x = torch.randn(4, 16, side, side).contiguous(memory_format=layout)
            grad = torch.randn_like(plain(x))
            reference = torch.autograd.grad(plain(x), plain.weight, grad)[0]
            for name, conv in (("pytorch", plain), ("reslab", ours)):
                wrong[name] += not relative_error(conv, x, grad, reference) < 0.03
        if wrong["pytorch"] or wrong["reslab"]:
            geometry = {"side": side, "kernel": kernel, "stride": stride, "padding": padding}
            rows.append({**geometry, "calls": calls, "wrong": wrong, "past_side": stride > side})
    return rows


def cost(rounds: int, steps: int = 20) -> dict:
    """Median ms of fast.yaml's bf16 step, its convolutions plain and converted (small_maps off)."""
    made = {}
    for name in ("plain", "converted"):
        step = bench.recipe_step(config.load("fast"), "bf16", gemm_convs=False)
        if name == "plain":
            for m in step.model.modules():
                if type(m) is gemm_conv.Conv2d:
                    m.__class__ = nn.Conv2d
        made[name] = step
    times = {name: [] for name in made}
    for step in made.values():
        for _ in range(5):
            step()
    for _ in range(rounds):
        for name, step in made.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - start) / steps * 1000)
    return {name: {"median_ms": statistics.median(v), "rounds_ms": v} for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=6, help="calls of each geometry (default 6)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of the cost (default 7)")
    parser.add_argument("--out", help="write the wrong geometries and the cost as JSON here")
    args = parser.parse_args()
    rows = scan(args.calls)
    for r in rows:
        print(
            f"side {r['side']:2} kernel {r['kernel']} stride {r['stride']} padding {r['padding']}: "
            f"PyTorch wrong {r['wrong']['pytorch']}/{r['calls']}, reslab {r['wrong']['reslab']}/{r['calls']}"
        )
    print(
        f"{len(rows)} geometries wrong in PyTorch {torch.__version__}; all stride past their input's side: "
        f"{all(r['past_side'] for r in rows)}; reslab wrong in {sum(r['wrong']['reslab'] > 0 for r in rows)}"
    )
    ms = cost(args.rounds)
    ratio = ms["converted"]["median_ms"] / ms["plain"]["median_ms"]
    print(
        f"fast.yaml's bf16 step: plain {ms['plain']['median_ms']:.2f} ms, converted "
        f"{ms['converted']['median_ms']:.2f} ms ({ratio:.3f}x), medians of {args.rounds} rounds"
    )
    if args.out:
        with open(args.out, "w") as f:
            result = {"torch": torch.__version__, "calls": args.calls, "wrong": rows, "fast_step": ms}
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
