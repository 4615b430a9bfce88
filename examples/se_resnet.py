"""A model of your own, from the library's parts: fast.yaml's ResNet-8 with squeeze-and-excitation (Hu et al.
2018, "Squeeze-and-Excitation Networks") on each unit's residual branch.

    reslab train --import examples/se_resnet.py --set model.name=se-resnet8 --out runs/se

SE rescales the channels of F(x) before the sum y = h(x) + F(x) by weights computed from F(x) itself: global
average pooling ("squeeze"), a bottleneck of two 1x1 layers and a sigmoid ("excitation"). README.md, "A model of
your own", has what it gave against the plain ResNet-8.
"""

from __future__ import annotations

import torch
from torch import nn

from reslab.models import ResidualUnit, cifar_resnet, register


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),  # (B, C, 1, 1)
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


@register("se-resnet8")
def se_resnet8(
    in_channels: int,
    num_classes: int,
    width: int = 32,
    first_stride: int = 2,
    stem_width: int | None = 16,
    reduction: int = 4,
) -> nn.Module:
    """fast.yaml's net (its width, strides and stem by default) with SE after each residual branch's last layer."""
    net = cifar_resnet(
        8, in_channels, num_classes, width=width, first_stride=first_stride, stem_width=stem_width
    )
    for unit in net.modules():
        if isinstance(unit, ResidualUnit):
            unit.residual.append(SqueezeExcite(unit.out_channels, reduction))
    return net
