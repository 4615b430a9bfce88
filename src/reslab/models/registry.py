"""Name -> builder table: `build_model(name, in_channels, num_classes, **options)` and `list_models()`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn

from ..errors import ReslabError
from .nets import cifar_resnet, d2l_resnet18, imagenet_resnet, wide_resnet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_FIXED = ("in_channels", "num_classes", "depth", "widen")


def register(name: str, builder: Callable[..., nn.Module], **fixed) -> None:
    _REGISTRY[name] = functools.partial(builder, **fixed) if fixed else builder


register("d2l-resnet18", d2l_resnet18)
for _depth in (8, 14, 20, 32, 44, 56, 110, 1202):
    register(f"resnet{_depth}", cifar_resnet, depth=_depth)
for _depth in (8, 14, 20, 32, 44, 56, 110):
    # the plain twins: the same layers, no shortcuts (He et al. 2015, Fig. 6 left)
    register(f"plain{_depth}", cifar_resnet, depth=_depth, shortcut="none")
register("preact-resnet110", cifar_resnet, depth=110, order="full-preact", shortcut="projection-nobn")
for _depth in (164, 1001):
    register(
        f"preact-resnet{_depth}",
        cifar_resnet,
        depth=_depth,
        kind="bottleneck",
        order="full-preact",
        shortcut="projection-nobn",
    )
for _depth in (18, 34, 50, 101, 152):
    register(f"resnet{_depth}", imagenet_resnet, depth=_depth)
for _depth in (18, 34):
    register(f"plain{_depth}", imagenet_resnet, depth=_depth, shortcut="none")
for _depth, _widen in ((16, 4), (16, 8), (28, 10), (40, 4)):
    register(f"wrn-{_depth}-{_widen}", wide_resnet, depth=_depth, widen=_widen)


def list_models() -> list[str]:
    return list(_REGISTRY)


def model_options(name: str) -> dict[str, object]:
    """The options a model accepts, with their defaults (for the CLI and error messages)."""
    builder = _get(name)
    fixed = builder.keywords if isinstance(builder, functools.partial) else {}
    func = builder.func if isinstance(builder, functools.partial) else builder
    return {
        p.name: fixed.get(p.name, p.default)
        for p in inspect.signature(func).parameters.values()
        if p.name not in _FIXED
    }


def _get(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise ReslabError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, **options) -> nn.Module:
    """Build a registered model. Options (unit order, shortcut, stem, ...) depend on the family:
    `model_options(name)` lists them."""
    builder = _get(name)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        choices = ", ".join(valid) or "none"
        raise ReslabError(f"model {name!r} has no option {unknown[0]!r}; its options: {choices}")
    return builder(in_channels=in_channels, num_classes=num_classes, **options)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
