"""Stems, stages, heads, and the builders of every architecture of the two papers.

Every net is an `nn.Sequential` whose top-level children are stem, stages, pooling and head, so that
`summary()` prints one row per stage, exactly as the d2l notebook's shape printout did.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..errors import ReslabError
from .blocks import EXPANSION, KINDS, ResidualUnit, check_choice


def make_stage(
    in_channels: int, channels: int, blocks: int, stride: int, **unit_options
) -> tuple[nn.Sequential, int]:
    """`blocks` residual units; the first one strides. Returns (stage, out_channels)."""
    units = []
    for i in range(blocks):
        unit = ResidualUnit(in_channels, channels, stride if i == 0 else 1, **unit_options)
        units.append(unit)
        in_channels = unit.out_channels
    return nn.Sequential(*units), in_channels


def init_weights(model: nn.Module, zero_init_residual: bool = False) -> nn.Module:
    """Kaiming-normal convs (He et al. 2015, fan-out as torchvision), BN gamma 1 and beta 0. A model built on the
    meta device (shapes only, as `reslab models` counts parameters) has no values to set."""
    if any(p.is_meta for p in model.parameters()):
        return model
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        # each unit starts as the identity: helps very deep nets train from step one (Goyal et al. 2017)
        for m in model.modules():
            if isinstance(m, ResidualUnit):
                m.zero_init_last()
    return model


def _assemble(
    stem: nn.Module, stages: list[nn.Module], width: int, num_classes: int, order: str
) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
    for i, stage in enumerate(stages, 1):
        layers[f"stage{i}"] = stage
    # pre-activation units leave the last sum un-normalised: close with BN-ReLU (or ReLU)
    if order == "full-preact":
        layers["final"] = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    elif order == "relu-preact":
        layers["final"] = nn.ReLU(inplace=True)
    layers["pool"] = nn.AdaptiveAvgPool2d((1, 1))
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)


def _stem(conv: nn.Conv2d, order: str, *pool: nn.Module) -> nn.Sequential:
    """conv, then what the unit order leaves to the stem, then `pool`. Pre-activation units normalise their own
    input: a full pre-activation stem is the bare convolution (as timm's ResNetV2), a ReLU-only one ends at BN."""
    width = conv.out_channels
    if order == "full-preact":
        return nn.Sequential(conv, *pool)
    if order == "relu-preact":
        return nn.Sequential(conv, nn.BatchNorm2d(width), *pool)
    return nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True), *pool)


def _stem_3x3(in_channels: int, width: int, order: str, stride: int = 1) -> nn.Sequential:
    return _stem(nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False), order)


def _staged(
    stem: nn.Module,
    stem_width: int,
    widths: tuple[int, ...],
    blocks: tuple[int, ...],
    strides: tuple[int, ...],
    num_classes: int,
    zero_init_residual: bool,
    **unit_options,
) -> nn.Sequential:
    in_channels, stages = stem_width, []
    for width, n, stride in zip(widths, blocks, strides):
        stage, in_channels = make_stage(in_channels, width, n, stride, **unit_options)
        stages.append(stage)
    net = _assemble(stem, stages, in_channels, num_classes, unit_options.get("order", "original"))
    return init_weights(net, zero_init_residual)


def cifar_resnet(
    depth: int,
    in_channels: int = 1,
    num_classes: int = 10,
    kind: str = "basic",
    order: str = "original",
    shortcut: str = "zeropad",
    width: int = 16,
    zero_init_residual: bool = False,
    shortcut_scale: float = 1.0,
    always_project: bool = False,
    first_stride: int = 1,
    stem_stride: int = 1,
    stem_width: int | None = None,
    dropout: float = 0.0,
    preact_shortcut: bool = True,
) -> nn.Sequential:
    """He et al. 2015 section 4.2: 3x3 stem, three stages of widths w, 2w, 4w (16/32/64), 6n+2 layers
    (9n+2 with bottlenecks), global average pooling and a linear head. Not in the paper, for fast CPU recipes:
    first_stride=2 halves the resolution in the first stage already (a quarter of the cost), stem_stride=2 in
    the stem (the same stages, without the stem's full-resolution maps); stem_width (default: w) sets the stem's
    channels alone, so that a wide net's only full-resolution maps can stay narrow; dropout between the
    convolutions of each unit, as wide_resnet's; preact_shortcut=False (full-preact only) has the downsampling
    units' shortcuts carry the stream x instead of BN-ReLU(x) (ResidualUnit)."""
    per_unit = 2 if check_choice("block kind", kind, KINDS) == "basic" else 3
    n, rest = divmod(depth - 2, 3 * per_unit)
    if rest or n < 1:
        raise ReslabError(f"depth {depth} is not {3 * per_unit}n+2 for {kind} units; e.g. 20, 56, 110, 164")
    stem_width = stem_width or width
    return _staged(
        _stem_3x3(in_channels, stem_width, order, stem_stride),
        stem_width,
        (width, 2 * width, 4 * width),
        (n, n, n),
        (first_stride, 2, 2),
        num_classes,
        zero_init_residual,
        kind=kind,
        order=order,
        shortcut=shortcut,
        shortcut_scale=shortcut_scale,
        always_project=always_project,
        dropout=dropout,
        preact_shortcut=preact_shortcut,
    )


IMAGENET_LAYOUTS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def imagenet_resnet(
    depth: int,
    in_channels: int = 3,
    num_classes: int = 1000,
    stem: str = "standard",
    order: str = "original",
    shortcut: str = "projection",
    zero_init_residual: bool = False,
    shortcut_scale: float = 1.0,
) -> nn.Sequential:
    """He et al. 2015 Table 1 (torchvision layout). stem="small": 3x3 stride 1, no max-pool, for 28-32 px. In the
    pre-activation orders the stem leaves to the first unit what it normalises itself, as the CIFAR nets' does."""
    kind, blocks = IMAGENET_LAYOUTS[depth]
    if stem == "standard":
        conv = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        stem_module = _stem(conv, order, nn.MaxPool2d(3, stride=2, padding=1))
    elif stem == "small":
        stem_module = _stem_3x3(in_channels, 64, order)
    else:
        raise ReslabError(f"unknown stem {stem!r}; choose one of: standard, small")
    return _staged(
        stem_module,
        64,
        (64, 128, 256, 512),
        blocks,
        (1, 2, 2, 2),
        num_classes,
        zero_init_residual,
        kind=kind,
        order=order,
        shortcut=shortcut,
        shortcut_scale=shortcut_scale,
    )


def wide_resnet(
    depth: int,
    widen: int,
    in_channels: int = 1,
    num_classes: int = 10,
    zero_init_residual: bool = False,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Zagoruyko & Komodakis 2016: full pre-activation basic units, widths 16k/32k/64k, (depth-4)/6 per stage;
    `dropout` between each unit's two convolutions (the paper's WRN-28-10-dropout: 0.3)."""
    n, rest = divmod(depth - 4, 6)
    if rest or n < 1:
        raise ReslabError(f"wide ResNet depth {depth} is not 6n+4; e.g. 16, 28, 40")
    return _staged(
        _stem_3x3(in_channels, 16, "full-preact"),
        16,
        (16 * widen, 32 * widen, 64 * widen),
        (n, n, n),
        (1, 2, 2),
        num_classes,
        zero_init_residual,
        order="full-preact",
        shortcut="projection-nobn",
        dropout=dropout,
    )


def d2l_resnet18(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """The d2l notebook's ResNet-18, layer for layer: convs with bias, 1x1-conv projections with bias,
    PyTorch's default initialisation. Children 0..7 as the notebook's `nn.Sequential(b1, ..., Linear)`."""
    b1 = nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )
    stages, width = [], 64
    for i, channels in enumerate((64, 128, 256, 512)):
        stage, width = make_stage(
            width, channels, 2, 1 if i == 0 else 2, bias=True, shortcut="projection-nobn", order="original"
        )
        stages.append(stage)
    return nn.Sequential(
        b1, *stages, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(width, num_classes)
    )


__all__ = [
    "EXPANSION",
    "cifar_resnet",
    "d2l_resnet18",
    "imagenet_resnet",
    "init_weights",
    "make_stage",
    "wide_resnet",
]
