"""Name -> builder table: `build_model(name, in_channels, num_classes, **options)` and `list_models()`."""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable

from torch import nn

from ..errors import ReslabError, is_count
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


def _unwrap(name: str) -> tuple[Callable[..., nn.Module], dict[str, object]]:
    """A registered model's builder function and the arguments its registration fixed."""
    builder = _get(name)
    if isinstance(builder, functools.partial):
        return builder.func, builder.keywords
    return builder, {}


def model_options(name: str) -> dict[str, object]:
    """The options a model accepts, with their defaults (for the CLI and error messages)."""
    func, fixed = _unwrap(name)
    return {
        p.name: fixed.get(p.name, p.default)
        for p in inspect.signature(func).parameters.values()
        if p.name not in _FIXED
    }


def _get(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise ReslabError(f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check_options(name: str, options: dict[str, object], prefix: str = "") -> None:
    """One clear error for an option the model lacks, or a value of the wrong type or range: booleans must be
    true or false, integers (widths, strides) > 0, floats finite. `prefix` names where the options came from."""
    valid = model_options(name)
    hints = typing.get_type_hints(_unwrap(name)[0])
    for key, value in options.items():
        if key not in valid:
            raise ReslabError(
                f"{prefix}{key}: {name} has no such option; its options: {', '.join(valid) or 'none'}"
            )
        kind = hints.get(key)
        if type(None) in typing.get_args(kind):  # optional (int | None): None leaves it to the builder
            if value is None:
                continue
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is bool and not isinstance(value, bool):
            raise ReslabError(f"{prefix}{key}: must be true or false, got {value!r}")
        if kind is int and not is_count(value):
            raise ReslabError(f"{prefix}{key}: must be an integer > 0, got {value!r}")
        if kind is float and not (number and math.isfinite(value)):
            raise ReslabError(f"{prefix}{key}: must be a finite number, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ReslabError(f"{prefix}{key}: must be a string, got {value!r}")


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, **options) -> nn.Module:
    """Build a registered model. Options (unit order, shortcut, stem, ...) depend on the family:
    `model_options(name)` lists them."""
    for what, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not is_count(value):
            raise ReslabError(f"{what} must be an integer > 0, got {value!r}")
    check_options(name, options)
    return _get(name)(in_channels=in_channels, num_classes=num_classes, **options)


def input_size(name: str) -> int:
    """The image side a model is built for here: 224 for the ImageNet-style nets, 96 for the notebook's (seed.yaml
    resizes Fashion-MNIST to it), 28 (Fashion-MNIST's own) for the CIFAR-style and wide nets."""
    return {imagenet_resnet: 224, d2l_resnet18: 96}.get(_unwrap(name)[0], 28)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
