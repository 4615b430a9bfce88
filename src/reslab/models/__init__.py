"""The model library: residual units, every ResNet of the two papers, a registry and a summary tool."""

from .blocks import ORDERS, SHORTCUTS, ResidualUnit, ZeroPadShortcut
from .nets import cifar_resnet, d2l_resnet18, imagenet_resnet, init_weights, make_stage, wide_resnet
from .registry import (
    build_model,
    check_config_options,
    check_forward,
    check_options,
    check_strides,
    count_params,
    input_size,
    list_models,
    model_options,
    register,
    registered_by,
    unused_parameters,
)
from .summary import activation_bytes, summary

__all__ = [
    "ORDERS",
    "SHORTCUTS",
    "ResidualUnit",
    "ZeroPadShortcut",
    "activation_bytes",
    "build_model",
    "check_config_options",
    "check_forward",
    "check_options",
    "check_strides",
    "cifar_resnet",
    "count_params",
    "d2l_resnet18",
    "imagenet_resnet",
    "init_weights",
    "input_size",
    "list_models",
    "make_stage",
    "model_options",
    "register",
    "registered_by",
    "summary",
    "unused_parameters",
    "wide_resnet",
]
