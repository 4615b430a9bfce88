"""The residual unit y = h(x) + F(x), x' = f(y) and its variants (He et al. 2015; 2016).

One class, `ResidualUnit`, covers every unit of both papers:
- the shortcut h: identity, 1x1 projection (with or without BN), the zero-padding
  option A of the 2015 paper, or none at all (a plain net with the same layers);
- the residual function F: basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1, expansion 4);
- the unit order, one of the five of the 2016 paper's Table 2 (`ORDERS`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ReslabError, is_count

ORDERS = ("original", "bn-after-add", "relu-before-add", "relu-preact", "full-preact")
SHORTCUTS = ("identity", "projection", "projection-nobn", "zeropad", "none")
KINDS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ReslabError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return value


class ZeroPadShortcut(nn.Module):
    """Option A of He et al. 2015: strided identity, extra channels are zeros. No parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:  # x[:, :, ::2, ::2] as a pooling: its gradient keeps x's memory format, where a
            # slice's is a new NCHW tensor that turns the ReLU's backward before it into a slow strided copy
            x = nn.functional.avg_pool2d(x, 1, self.stride)
        if self.extra > 0:
            # pad (W left, W right, H top, H bottom, C front, C back)
            x = nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


def make_shortcut(
    kind: str, in_channels: int, out_channels: int, stride: int, bias: bool, always_project: bool = False
) -> nn.Module | None:
    """The shortcut h. Identity where shapes allow it (the papers' option A and B), unless always_project
    (option C, and the notebook's `Residual(..., use_1x1conv=True)` at equal shapes)."""
    check_choice("shortcut", kind, SHORTCUTS)
    if always_project and not kind.startswith("projection"):
        raise ReslabError(f"always_project needs shortcut projection or projection-nobn, not {kind}")
    if kind == "none":
        return None
    same_shape = stride == 1 and in_channels == out_channels
    if kind == "identity" or (same_shape and not always_project):
        if not same_shape:
            raise ReslabError(
                f"identity shortcut cannot map {in_channels} to {out_channels} channels at stride {stride}; "
                "use shortcut projection, projection-nobn or zeropad"
            )
        return nn.Identity()
    if kind == "zeropad":
        if out_channels < in_channels:  # option A pads channels; it has none to drop
            raise ReslabError(
                f"zeropad shortcut cannot narrow {in_channels} to {out_channels} channels; "
                "use shortcut projection or projection-nobn"
            )
        return ZeroPadShortcut(in_channels, out_channels, stride)
    if kind == "projection-nobn":
        return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


def _convs(kind: str, in_channels: int, channels: int, stride: int, bias: bool) -> list[nn.Conv2d]:
    if kind == "basic":
        return [
            nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=bias),
            nn.Conv2d(channels, channels, 3, padding=1, bias=bias),
        ]
    # bottleneck, stride on the 3x3 as in torchvision ("ResNet v1.5")
    return [
        nn.Conv2d(in_channels, channels, 1, bias=bias),
        nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=bias),
        nn.Conv2d(channels, channels * 4, 1, bias=bias),
    ]


def _residual_branch(order: str, convs: list[nn.Conv2d], dropout: float = 0.0) -> nn.Sequential:
    """F as a flat Sequential, its layers placed by the unit order (2016 paper, Fig. 4), with dropout (when > 0)
    on the input of each convolution but the first, as wide ResNets place it "between convolutions"."""
    layers: list[nn.Module] = []
    last = len(convs) - 1
    for i, conv in enumerate(convs):
        drop = [nn.Dropout(dropout)] if dropout > 0 and i > 0 else []
        if order == "full-preact":
            # the first BN-ReLU is applied by the unit itself (shared with a projection shortcut)
            if i > 0:
                layers += [nn.BatchNorm2d(conv.in_channels), nn.ReLU(inplace=True)]
            layers += [*drop, conv]
        elif order == "relu-preact":
            # not in place on the unit's input: the identity shortcut still needs x
            layers += [nn.ReLU(inplace=i > 0), *drop, conv, nn.BatchNorm2d(conv.out_channels)]
        else:  # original, bn-after-add, relu-before-add
            layers += [*drop, conv]
            if i < last or order != "bn-after-add":
                layers.append(nn.BatchNorm2d(conv.out_channels))
            if i < last or order == "relu-before-add":
                layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualUnit(nn.Module):
    """y = scale * h(x) + F(x), x' = f(y).

    Args:
        in_channels: channels of x.
        channels: width of F; the unit outputs channels * expansion.
        stride: spatial stride of the unit (on the first 3x3 of F and on h).
        kind: "basic" or "bottleneck".
        order: one of ORDERS (He et al. 2016, Table 2).
        shortcut: one of SHORTCUTS; "none" gives the plain unit with the same layers.
        bias: convolutions carry a bias (the d2l notebook's convs do; the papers' do not).
        shortcut_scale: constant scaling of h (2016 paper, Table 1, 0.5), 1.0 = none.
        always_project: project even where shapes allow the identity (2015 paper's option C).
        dropout: probability of dropping each activation between the convolutions of F (Zagoruyko & Komodakis
            2016 use 0.3 in wide nets); 0 = none.
        preact_shortcut: full pre-activation only: a shortcut that is not the identity (a downsampling unit's)
            sees BN-ReLU(x), as in the paper's code; False: the stream x itself, as an identity does.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        kind: str = "basic",
        order: str = "original",
        shortcut: str = "projection",
        bias: bool = False,
        shortcut_scale: float = 1.0,
        always_project: bool = False,
        dropout: float = 0.0,
        preact_shortcut: bool = True,
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("channels", channels), ("stride", stride)):
            if not is_count(value):
                raise ReslabError(f"ResidualUnit {name} must be an integer > 0, got {value!r}")
        if not 0 <= dropout < 1:
            raise ReslabError(f"dropout must be at least 0 and below 1, got {dropout!r}")
        check_choice("block kind", kind, KINDS)
        self.order = check_choice("unit order", order, ORDERS)
        if not preact_shortcut and order != "full-preact":
            raise ReslabError(
                f"preact_shortcut=False needs order full-preact; in {order} the shortcut sees x"
            )
        if shortcut == "none" and shortcut_scale != 1.0:
            raise ReslabError(
                f"shortcut_scale={shortcut_scale} needs a shortcut to scale; this unit has none"
            )
        self.preact_shortcut = preact_shortcut
        self.expansion = EXPANSION[kind]
        self.out_channels = channels * self.expansion
        self.shortcut_scale = shortcut_scale
        # full pre-activation: BN-ReLU on x before F (and before a projection shortcut, as in the paper's code)
        self.pre = (
            nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=False))
            if order == "full-preact"
            else None
        )
        self.residual = _residual_branch(order, _convs(kind, in_channels, channels, stride, bias), dropout)
        self.shortcut = make_shortcut(shortcut, in_channels, self.out_channels, stride, bias, always_project)
        if order == "original":
            self.post = nn.ReLU(inplace=True)
        elif order == "bn-after-add":
            self.post = nn.Sequential(nn.BatchNorm2d(self.out_channels), nn.ReLU(inplace=True))
        else:
            self.post = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(x) if self.pre is not None else x
        out = self.residual(pre)
        if self.shortcut is not None:
            # a projection sees the pre-activated input; an identity keeps the clean x (2016 paper)
            clean = isinstance(self.shortcut, nn.Identity) or not self.preact_shortcut
            identity = self.shortcut(x if clean else pre)
            if self.shortcut_scale != 1.0:
                identity = identity * self.shortcut_scale
            out = out + identity
        if self.post is not None:
            out = self.post(out)
        return out

    def zero_init_last(self) -> None:
        """Start F at zero, so that the unit starts as f(h(x)) (Goyal et al. 2017): the BN after F's last
        convolution gets gamma = 0; in the orders where no BN follows it (full pre-activation, BN after the
        addition) the convolution itself starts at zero, as timm does for pre-activation units."""
        layers = list(self.residual)
        last_conv = max(i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d))
        norms = [m for m in layers[last_conv + 1 :] if isinstance(m, nn.BatchNorm2d)]
        zeroed = norms[0] if norms else layers[last_conv]
        nn.init.zeros_(zeroed.weight)
        if zeroed.bias is not None:
            nn.init.zeros_(zeroed.bias)
