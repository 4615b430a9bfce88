"""Convolutions on small feature maps as matrix multiplies, where oneDNN's bf16 kernels are slow on AMX CPUs.

On a CPU with AMX (Intel Xeon since Sapphire Rapids), oneDNN 3.12's bf16 convolution kernels run far below the
matrix-multiply peak beside them when the output map is a few pixels (ResNet's last stages). Measured on
machine C at batch 256: the backward-weights kernel runs at 60-170 GFLOP/s on 3x3 to 6x6 maps (on 3x3 slower
than its own fp32 kernel), where the same gradient as one matrix multiply (output gradient times im2col, the
input values under each output pixel) takes 3-10x less time. On 3x3 maps forward and backward-data run at
~250 GFLOP/s, and as matrix multiplies (im2col times the weights; the output gradient times the weights, then
col2im) take 2.4x less. So:

- output maps up to 6x6: the weight gradient is a matrix multiply;
- up to 3x3: forward and input gradient are too;
- larger maps keep oneDNN throughout, which wins there (at 12x12, 2-3x).

The choice depends only on shapes, so a run stays deterministic and resumes exactly. Measured: BENCHMARKS.md,
"Machine C".

On every CPU, bf16 training also takes the weight gradient as a matrix multiply where a convolution strides past
its input's side (stride 2 over a 1x1 map: the last stage of an ImageNet-style ResNet, or of the notebook's, on
images of 16 px or less). There, on a 2-core AVX-512 BF16 EPYC without AMX (PyTorch 2.13.0), oneDNN's bf16
backward-weights kernel (jit_bf16:avx512_core_bf16) returns a gradient that changes from call to call, as memory
it never wrote would: NaN, inf, 1e31 or a finite wrong value in most calls, the right one in some, where fp32, the
forward pass and the input gradient are right. In a scan of maps of 1-10 px, kernels 1-7, strides 1-4 and padding 0-3
(benchmarks/onednn_bf16_scan.py; BENCHMARKS.md, "Machine B, session 83"), every wrong one strode past its input's
side, with padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_GRAD_PIXELS = 36  # output maps up to 6x6 (at 7x7 the two were about even on machine C)
ALL_GEMM_PIXELS = 9  # output maps up to 3x3 (at 4x4 even, at 6x6 oneDNN faster)


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (and Linux lets PyTorch use them)."""
    try:
        return bool(torch._C._cpu._init_amx())
    except AttributeError:
        return False


def pays(device: torch.device, precision: str) -> bool:
    """Where the matrix multiplies are measured to pay: bf16 on a CPU with AMX."""
    return device.type == "cpu" and precision == "bf16" and has_amx()


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def im2col(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """(B, Cin, H, W) -> (B * Ho * Wo, kh * kw * Cin): the input values under each output pixel, tap-major."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    b, cin, h, w = x.shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # (B, H + 2ph, W + 2pw, Cin)
    step_b, step_h, step_w, step_c = xp.stride()
    windows = xp.as_strided(
        (b, ho, wo, kh, kw, cin), (step_b, sh * step_h, sw * step_w, step_h, step_w, step_c)
    )
    return windows.reshape(b * ho * wo, kh * kw * cin)  # one copy


def col2im(cols: torch.Tensor, shape, kernel, stride, padding) -> torch.Tensor:
    """The adjoint of im2col: (B * Ho * Wo, kh * kw * Cin) -> (B, Cin, H, W), each tap added where it was read."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    b, cin, h, w = shape
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    cols = cols.view(b, ho, wo, kh * kw, cin)
    acc = torch.promote_types(cols.dtype, torch.float32)  # bf16 taps are summed in fp32, as oneDNN sums them
    xp = cols.new_zeros(b, h + 2 * ph, w + 2 * pw, cin, dtype=acc)
    for t in range(kh * kw):
        i, j = divmod(t, kw)
        xp[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] += cols[:, :, :, t]
    x = xp[:, ph : ph + h, pw : pw + w].to(cols.dtype)
    return x.permute(0, 3, 1, 2)  # channels_last (B, Cin, H, W)


class _Conv2dFn(torch.autograd.Function):
    """A dense 2-D convolution whose weight gradient is a matrix multiply; with `all_gemm`, forward and input
    gradient too."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, all_gemm):
        kernel = weight.shape[2:]
        if all_gemm:
            b, cout = x.shape[0], weight.shape[0]
            ho, wo = (out_size(x.shape[i + 2], kernel[i], stride[i], padding[i]) for i in (0, 1))
            wm = weight.permute(0, 2, 3, 1).reshape(cout, -1)  # (Cout, kh * kw * Cin), tap-major like im2col
            cols = im2col(x, kernel, stride, padding)
            # written straight into a channels_last (B, Cout, Ho, Wo) tensor, read as (B * Ho * Wo, Cout): the
            # output is no view, so an in-place ReLU after it (a model of your own may have one) is allowed
            out = torch.empty(
                (b, cout, ho, wo), dtype=cols.dtype, device=x.device, memory_format=torch.channels_last
            )
            rows = out.permute(0, 2, 3, 1).view(-1, cout)
            if bias is None:
                torch.mm(cols, wm.t(), out=rows)
            else:
                torch.addmm(bias, cols, wm.t(), out=rows)
            ctx.save_for_backward(cols, weight)  # kh * kw times the input's memory, on maps that are tiny
        else:
            out = F.conv2d(x, weight, bias, stride, padding)
            ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, bias is not None, all_gemm, x.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved, weight = ctx.saved_tensors
        stride, padding, has_bias, all_gemm, shape = ctx.geometry
        cout, cin, kh, kw = weight.shape
        g = grad.permute(0, 2, 3, 1).reshape(-1, cout)  # (B * Ho * Wo, Cout)
        gx = gw = gb = None
        if ctx.needs_input_grad[0] and all_gemm:
            wm = weight.permute(0, 2, 3, 1).reshape(cout, -1)
            gx = col2im(g @ wm, shape, (kh, kw), stride, padding)
        elif ctx.needs_input_grad[0]:  # oneDNN's backward-data kernel
            mask = (True, False, False)
            args = (None, stride, padding, (1, 1), False, (0, 0), 1, mask)
            gx = torch.ops.aten.convolution_backward(grad, saved, weight, *args)[0]
        if ctx.needs_input_grad[1]:
            cols = saved if all_gemm else im2col(saved, (kh, kw), stride, padding)
            gw = g.t().contiguous() @ cols  # a contiguous left operand: 1.4x faster
            gw = gw.view(cout, kh, kw, cin).permute(0, 3, 1, 2)  # channels_last (Cout, Cin, kh, kw)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb, None, None, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d that computes in bf16 on the CPU with matrix multiplies where oneDNN is wrong (a stride past the
    input's side), and with `small_maps` on small output maps too (see the module's docstring), with the same
    parameters and state_dict; plain nn.Conv2d everywhere else."""

    small_maps = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if x.device.type != "cpu" or not (autocast_bf16 or x.dtype == self.weight.dtype == torch.bfloat16):
            return super().forward(x)
        # one unbatched image (C, H, W): nn.Conv2d takes it, and a model of your own may pass it
        if x.dim() != 4:
            return super().forward(x)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        pixels = out_size(x.shape[2], kh, sh, ph) * out_size(x.shape[3], kw, sw, pw)
        all_gemm = self.small_maps and pixels <= ALL_GEMM_PIXELS
        past_side = sh > x.shape[2] or sw > x.shape[3]
        weight_gemm = past_side or (self.small_maps and pixels <= WEIGHT_GRAD_PIXELS)
        if not all_gemm and not (weight_gemm and torch.is_grad_enabled()):
            return super().forward(x)
        bf16 = torch.bfloat16
        bias = None if self.bias is None else self.bias.to(bf16)
        return _Conv2dFn.apply(x.to(bf16), self.weight.to(bf16), bias, self.stride, self.padding, all_gemm)


def use_gemm_convs(model: nn.Module, small_maps: bool = True) -> int:
    """Make every plain dense convolution of `model` a Conv2d of this module, in place (parameters and state_dict
    stay as they are): with `small_maps`, small output maps are matrix multiplies (where that pays: AMX); without,
    only the weight gradients oneDNN gets wrong are. Returns how many changed."""
    n = 0
    for m in model.modules():
        plain = type(m) is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
        if plain and not isinstance(m.padding, str):
            m.__class__ = Conv2d
            m.small_maps = small_maps
            n += 1
    return n
