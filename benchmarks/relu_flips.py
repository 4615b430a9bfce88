"""Why two runs that should agree drift apart: one training step's gradients in fp32, with and without
channels_last and on 1 and 2 threads, against the same step in fp64, and the ReLUs whose input fell on the other
side of 0 (a flipped mask passes a gradient the fp64 step stops, or stops one it passes).

A rounding of 1e-7 moves a weight by as little; a flipped ReLU changes the gradient below it by a whole pixel's
share, and later steps amplify it. This is why tests/test_dist.py compares 1 process in 4 micro-batches with 2
ranks in 2 each after one step: the two sum the same gradients in another order.
Usage: .venv/bin/python benchmarks/relu_flips.py [--config fast] [--batch 64] [--seed 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

from reslab import config
from reslab.models.registry import build_model
from reslab.studies.common import machine


def step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype, channels_last: bool, threads: int):
    """The gradients of one step and each ReLU's input, computed in `dtype` on `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _step(net, x, y, dtype, channels_last)
    finally:
        torch.set_num_threads(before)


def _step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype, channels_last: bool):
    net = copy.deepcopy(net).to(dtype)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net, x = net.to(memory_format=layout), x.to(dtype).contiguous(memory_format=layout)
    inputs = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # the hook reads the input the ReLU saw
            m.register_forward_hook(
                lambda _m, i, _o, name=name: inputs.__setitem__(name, i[0].detach().double())
            )
    nn.functional.cross_entropy(net(x), y).backward()
    return {n: p.grad.double() for n, p in net.named_parameters()}, inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="fast", help="the recipe whose model takes the step")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model = config.load(args.config).model
    net = build_model(model.name, 1, 10, **model.options)
    x, y = torch.randn(args.batch, 1, args.size, args.size), torch.randint(0, 10, (args.batch,))
    grads64, inputs64 = step(net, x, y, torch.float64, False, torch.get_num_threads())
    rows = []
    for channels_last in (False, True):
        for threads in (1, 2):
            grads, inputs = step(net, x, y, torch.float32, channels_last, threads)
            # the largest error of a parameter's gradient, as a share of that gradient's largest value
            worst, where = max(
                ((grads[n] - g).abs().max().item() / g.abs().max().item(), n) for n, g in grads64.items()
            )
            flips = {}
            for name, a in inputs64.items():
                flipped = (a > 0) != (inputs[name] > 0)
                if flipped.any():
                    flips[name] = [f"{v:.1e}" for v in a[flipped].tolist()]  # the fp64 inputs that flipped
            rows.append(
                {
                    "channels_last": channels_last,
                    "threads": threads,
                    "worst_gradient_error": worst,
                    "worst_parameter": where,
                    "flipped_relus": flips,
                }
            )
            print(
                f"fp32{' channels_last' if channels_last else ''}, {threads} thread{'s' if threads > 1 else ''}: "
                f"worst gradient error {worst:.1e} ({where}); ReLU inputs on the other side of 0: {flips or 'none'}"
            )
    if args.out:
        args.out.write_text(
            json.dumps({"machine": machine(), **vars(args), "out": str(args.out), "rows": rows})
        )


if __name__ == "__main__":
    main()
