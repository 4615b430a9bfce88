"""Name -> builder table: `build_model(name, in_channels, num_classes, **options)`, `list_models()`, and
`register()` for models of your own."""

from __future__ import annotations

import copy
import functools
import inspect
import math
import typing
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ReslabError, first_line, is_count
from .nets import cifar_resnet, d2l_resnet18, imagenet_resnet, wide_resnet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_BUILT_IN: frozenset[str] = frozenset()  # set below, once the library's own models are in
_INPUTS = ("in_channels", "num_classes")  # every builder takes these; the data decides them, not the options
_NAMED = ("depth", "widen")  # a registration that sets these names the net by them: not options
MAX_INT = 2**31 - 1  # an integer option's largest: torch's convolutions take their strides as C ints
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def register(name: str, builder: Callable[..., nn.Module] | None = None, **defaults):
    """Add a model to the table that configs (`model.name`), `build_model` and every command draw on, as
    timm's and torchvision's `register_model` do. `builder(in_channels, num_classes, **options)` returns the
    nn.Module; its other keyword parameters, each with a default, are the model's options (`model.options`),
    checked by their annotations as the library's are (bool, int > 0, float, str, `int | None`). `defaults`
    replace some of those defaults (`depth` and `widen` given here are fixed, as resnet56's and wrn-40-4's
    are: they name the net). As a decorator, without `builder`: `@register("mine")`. Returns the builder.
    A built-in name is refused; a name of your own may be registered again (a notebook cell run twice)."""
    if builder is None:
        return lambda builder: register(name, builder, **defaults)
    if not isinstance(name, str) or not name.strip():
        raise ReslabError(f"a model's name must be a non-empty string, got {name!r}")
    if name in _BUILT_IN:
        raise ReslabError(f"model {name!r} is built in; register yours under another name")
    if not callable(builder):
        raise ReslabError(f"model {name!r}: the builder must be a function or class, got {builder!r}")
    params = inspect.signature(builder).parameters
    named = {k: p for k, p in params.items() if p.kind not in _VARIADIC}
    lacking = [k for k in _INPUTS if k not in named]
    if lacking:
        raise ReslabError(
            f"model {name!r}: the builder must take in_channels and num_classes (lacks {lacking})"
        )
    for key in defaults:
        if key not in named or key in _INPUTS:
            raise ReslabError(f"model {name!r}: the builder has no option {key!r} to give a default")
    for key, p in named.items():
        if key not in _INPUTS and key not in defaults and p.default is p.empty:
            raise ReslabError(f"model {name!r}: option {key!r} needs a default value (or one in register's)")
    _REGISTRY[name] = functools.partial(builder, **defaults) if defaults else builder
    return builder


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
_BUILT_IN = frozenset(_REGISTRY)


def list_models() -> list[str]:
    return list(_REGISTRY)


def registered_by(module: str) -> list[str]:
    """The models whose builder the module of that name defines."""
    return [name for name in _REGISTRY if getattr(_unwrap(name)[0], "__module__", None) == module]


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
        if p.name not in _INPUTS and p.kind not in _VARIADIC and not (p.name in _NAMED and p.name in fixed)
    }


def _get(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise ReslabError(
            f"unknown model {name!r}; choose one of: {', '.join(_REGISTRY)} (a model of your own: "
            "reslab.models.register it in a module, and pass the module to the command with --import)"
        )
    return _REGISTRY[name]


def _hints(builder: Callable) -> dict[str, object]:
    """A builder's parameter annotations (a class's, from its __init__); none where they do not resolve (names
    a model of your own imports only for its type checker)."""
    try:
        return typing.get_type_hints(builder.__init__ if isinstance(builder, type) else builder)
    except (NameError, TypeError):
        return {}


def check_options(name: str, options: dict[str, object], prefix: str = "") -> None:
    """One clear error for an option the model lacks, or a value of the wrong type or range: booleans must be
    true or false, integers (widths, strides) > 0, floats finite. `prefix` names where the options came from."""
    valid = model_options(name)
    hints = _hints(_unwrap(name)[0])
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
        if kind is int and not (is_count(value) and value <= MAX_INT):  # torch's kernels overflow above
            raise ReslabError(f"{prefix}{key}: must be an integer from 1 to {MAX_INT}, got {value!r}")
        if kind is float and not (number and math.isfinite(value)):
            raise ReslabError(f"{prefix}{key}: must be a finite number, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ReslabError(f"{prefix}{key}: must be a string, got {value!r}")


def check_config_options(name: str, options: dict[str, object]) -> None:
    """A model's options as a config gives them (model.options; `summary MODEL --set`), each fault one line
    under model.options: check_options, then for one of the library's own models a build on the meta device
    (shapes only: 0.01 s for resnet20, 0.8 s for resnet1202), so that its builder's own checks (a dropout below 1,
    a shortcut to scale, an order the shortcut allows) come before the data loads. A model of your own is left
    to its first build: it may need the data's channels, or take long."""
    check_options(name, options, prefix="model.options.")
    if name not in _BUILT_IN:
        return
    try:
        with torch.device("meta"):
            build_model(name, **options)
    except ReslabError as e:
        raise ReslabError(f"model.options of {name}: {e}") from None


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, **options) -> nn.Module:
    """Build a registered model (the library's or one of your own, `register`). Options (unit order, shortcut, stem, ...) depend on the family:
    `model_options(name)` lists them."""
    for what, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not is_count(value):
            raise ReslabError(f"{what} must be an integer > 0, got {value!r}")
    check_options(name, options)
    model = _get(name)(in_channels=in_channels, num_classes=num_classes, **options)
    if not isinstance(model, nn.Module):
        raise ReslabError(
            f"model {name!r}: its builder returned {type(model).__name__}, not a torch nn.Module"
        )
    return model


def check_forward(model: nn.Module, name: str, in_channels: int, num_classes: int, size: int) -> None:
    """Run a model of your own once on two blank images (eval mode, no gradients: no state changes), so a
    forward that fails, or gives other than one logit per class, is one line before the run writes anything,
    not a traceback at its first step. The library's own models are tested to fit and skip this."""
    if name in _BUILT_IN:
        return
    was_training, shape = model.training, (2, in_channels, size, size)
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(shape))
    except Exception as e:  # the user's code: one line with its own message
        raise ReslabError(
            f"model {name!r} failed on a batch of shape {shape}: {type(e).__name__}: {first_line(str(e))}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ReslabError(
            f"model {name!r} gave {got} for a batch of shape {shape}; training needs (2, {num_classes}): "
            "one logit per class for each image"
        )


def check_strides(model: nn.Module, name: str, size: int) -> None:
    """Refuse a convolution that strides by more than the images' side (model.options first_stride or stem_stride
    of the library's models): its maps are the 1x1 of a stride of the side, and PyTorch's backward pass for it
    slows with the stride squared (one 3x3 convolution of 256 images of 16x28x28, forward and backward, on 2 CPU
    cores: 0.05 s at a stride of 28, 6.7 s at 1024, 128 s at 4096)."""
    for m in model.modules():
        # the library's fixed strides of 2 pass on 1-pixel images (data.resize=1)
        if isinstance(m, nn.Conv2d) and (stride := max(m.stride)) > max(size, 2):
            raise ReslabError(
                f"model {name!r} strides a convolution by {stride}, more than the {size}-pixel images' side: "
                f"a stride of {size} gives the same 1x1 maps, and a larger one only slows the backward pass; "
                "lower the stride options (model.options)"
            )


def unused_parameters(model: nn.Module, name: str, shape: tuple[int, ...]) -> list[str]:
    """The parameters of a model of your own that a training step leaves without a gradient (DDP must be told
    of them, or it fails at the second step): one forward and backward of a copy on blank images of `shape`, the
    random state kept. The library's own models use every parameter."""
    if name in _BUILT_IN:
        return []
    twin = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[]):
        twin(torch.zeros(shape)).float().sum().backward()
    return [n for n, p in twin.named_parameters() if p.requires_grad and p.grad is None]


def input_size(name: str) -> int:
    """The image side a model is built for here: 224 for the ImageNet-style nets, 96 for the notebook's (seed.yaml
    resizes Fashion-MNIST to it), 28 (Fashion-MNIST's own) for the CIFAR-style and wide nets."""
    return {imagenet_resnet: 224, d2l_resnet18: 96}.get(_unwrap(name)[0], 28)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
