"""Rewrites of a built model that leave its function, its gradients and its state_dict exactly as they were, and
make its training steps cheaper.

pool_before_relu: a stem's ReLU then 3x3/2 max-pool (d2l-resnet18, the ImageNet-style ResNets) computes the same
as the max-pool then the ReLU, on a quarter of the pixels. ReLU is monotone, so max(relu(a)) = relu(max(a)); the
gradient reaches the same input pixel either way (the window's first maximum if it is positive, none otherwise:
ReLU's gradient is 0 at 0 and below). On the notebook's net at 96 px and batch 256 the ReLU and its backward then
run on 9.4M values instead of 37.7M. Measured: BENCHMARKS.md, "Machine C".

global_avg_pool: every net's head averages its last maps to 1x1 (nn.AdaptiveAvgPool2d(1), a mean over height and
width). PyTorch's backward of that mean expands the gradient to the input's shape and divides it, writing a new
tensor in the default (NCHW) layout; in a channels_last net the layers below then meet two layouts in one
elementwise kernel, which runs strided. GlobalAvgPool divides first and hands back a broadcast view: every input
pixel gets the same value, g / (H * W), and nothing of the map's size is written. fast.yaml's bf16 step is ~4%
faster on the CPU, examples/se_resnet.py's (a pool in every unit) ~8% (BENCHMARKS.md, "The head's pool").
"""

from __future__ import annotations

import torch
from torch import nn


def pool_before_relu(model: nn.Module) -> int:
    """In every nn.Sequential of `model`, make a ReLU directly followed by a MaxPool2d the max-pool followed by an
    in-place ReLU, in place. Returns how many pairs were swapped."""
    n = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            relu, pool = seq._modules[a], seq._modules[b]
            if type(relu) is nn.ReLU and type(pool) is nn.MaxPool2d and not pool.return_indices:
                seq._modules[a], seq._modules[b] = pool, nn.ReLU(inplace=True)
                n += 1
    return n


class _MeanHW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return x.mean((-2, -1), keepdim=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return (grad / (ctx.shape[-2] * ctx.shape[-1])).expand(ctx.shape)


class GlobalAvgPool(nn.Module):
    """nn.AdaptiveAvgPool2d(1) whose backward returns a broadcast view of the gradient (the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MeanHW.apply(x)


def global_avg_pool(model: nn.Module) -> int:
    """Make every nn.AdaptiveAvgPool2d to 1x1 in `model` a GlobalAvgPool, in place. Returns how many."""
    n = 0
    for parent in list(model.modules()):
        for key, child in parent._modules.items():
            if type(child) is nn.AdaptiveAvgPool2d and child.output_size in (1, (1, 1)):
                parent._modules[key] = GlobalAvgPool()
                n += 1
    return n


REWRITES = {"pool_before_relu": pool_before_relu, "global_avg_pool": global_avg_pool}
