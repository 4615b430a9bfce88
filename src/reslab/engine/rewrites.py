"""Rewrites of a built model that leave its function, its gradients and its state_dict exactly as they were, and
make its training steps cheaper.

pool_before_relu: a stem's ReLU then 3x3/2 max-pool (d2l-resnet18, the ImageNet-style ResNets) computes the same
as the max-pool then the ReLU, on a quarter of the pixels. ReLU is monotone, so max(relu(a)) = relu(max(a)); the
gradient reaches the same input pixel either way (the window's first maximum if it is positive, none otherwise:
ReLU's gradient is 0 at 0 and below). On the notebook's net at 96 px and batch 256 the ReLU and its backward then
run on 9.4M values instead of 37.7M. Measured: BENCHMARKS.md, "Machine C".
"""

from __future__ import annotations

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
