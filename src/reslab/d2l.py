"""The seed notebook's names, on top of reslab. `from reslab.d2l import Residual, resnet_block, ...` lets the
notebook's cells run unchanged: these are thin wrappers over the library, not a second implementation."""

from __future__ import annotations

from torch import nn

from .models.blocks import ResidualUnit


class Residual(ResidualUnit):
    """The notebook's residual block: two 3x3 convs with bias, BN, ReLU after the addition, and an optional
    1x1 conv (with bias) on the shortcut. `Residual(3, 3, use_1x1conv=True, strides=2)` maps (4,3,6,6) to
    (4,3,3,3)."""

    def __init__(self, input_channels: int, num_channels: int, use_1x1conv: bool = False, strides: int = 1):
        super().__init__(
            input_channels,
            num_channels,
            stride=strides,
            kind="basic",
            order="original",
            shortcut="projection-nobn" if use_1x1conv else "identity",
            bias=True,
            always_project=use_1x1conv,
        )


def resnet_block(
    input_channels: int, num_channels: int, num_residuals: int, first_block: bool = False
) -> list[nn.Module]:
    """The notebook's stage builder: a list of `num_residuals` blocks; the first halves the resolution and
    projects, except in the first stage (`first_block=True`)."""
    blk: list[nn.Module] = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels, use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(num_channels, num_channels))
    return blk
