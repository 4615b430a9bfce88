"""Device, numeric precision and memory layout: what `auto` means, the autocast context for a step."""

from __future__ import annotations

import contextlib
import sys

import torch

from ..errors import ReslabError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ReslabError("device cuda: no CUDA GPU is visible to PyTorch; use device=cpu or device=auto")
    return torch.device(name)


def bf16_native(device: torch.device) -> bool:
    """Whether the hardware computes bf16 natively (CPU: AVX-512 BF16 / AMX; else bf16 is emulated, ~100x slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ReslabError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if name == "bf16" and not bf16_native(device):
        print(
            f"warning: this {device.type} has no native bf16; bf16 will be slow (precision=auto picks fp32)",
            file=sys.stderr,
        )
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of a run's model and batches: channels_last (NHWC) or PyTorch's default (NCHW)."""
    return torch.channels_last if channels_last else torch.contiguous_format
