"""Convolutions on small maps as matrix multiplies (engine/gemm_conv.py): exact against PyTorch's own convolution,
forward and backward, and the same module contract as nn.Conv2d."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import crash_then_resume, tiny_overrides
from torch import nn

from reslab import config
from reslab.engine import checkpoint, fit, gemm_conv, run
from reslab.engine.precision import bf16_native
from reslab.models import build_model

# (batch, in, out, kernel, stride, padding, input size): ResNet's 3x3 convolutions, plain and strided (with an odd
# input, whose last row no output reads), a strided 1x1 projection shortcut, the 7x7 stem, a non-square map
GEOMETRIES = [
    (4, 8, 16, 3, 1, 1, (6, 6)),
    (3, 8, 16, 3, 2, 1, (7, 7)),
    (2, 16, 8, 1, 2, 0, (6, 6)),
    (2, 1, 4, 7, 2, 3, (11, 11)),
    (2, 3, 5, 3, 1, 1, (4, 6)),
]


@pytest.mark.parametrize("all_gemm", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("b, cin, cout, k, s, p, hw", GEOMETRIES)
def test_forward_and_gradients_equal_pytorchs(b, cin, cout, k, s, p, hw, bias, all_gemm):
    torch.manual_seed(0)
    f64 = torch.float64
    x = torch.randn(b, cin, *hw, dtype=f64, requires_grad=True)
    w = torch.randn(cout, cin, k, k, dtype=f64, requires_grad=True)
    bb = torch.randn(cout, dtype=f64, requires_grad=True) if bias else None
    inputs = [x, w] + ([bb] if bias else [])
    expected = nn.functional.conv2d(x, w, bb, stride=s, padding=p)
    got = gemm_conv._Conv2dFn.apply(x, w, bb, (s, s), (p, p), all_gemm)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    for g, e in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e)


def step(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    out.backward(grad)
    return out, x.grad, conv.weight.grad, conv.bias.grad


def test_conv_matches_nn_conv_in_bf16_and_takes_small_maps_only():
    torch.manual_seed(0)
    plain = nn.Conv2d(16, 32, 3, padding=1).to(memory_format=torch.channels_last)
    fast = nn.Conv2d(16, 32, 3, padding=1).to(memory_format=torch.channels_last)
    fast.load_state_dict(plain.state_dict())
    assert gemm_conv.use_gemm_convs(fast) == 1 and type(fast) is gemm_conv.Conv2d
    # 3x3 output maps are all matrix multiplies, 6x6 take the weight gradient as one, 7x7 none
    for size, taken in ((3, True), (6, True), (7, False)):
        x = torch.randn(8, 16, size, size).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(8, 32, size, size, dtype=torch.bfloat16)
        plain.zero_grad(), fast.zero_grad()
        expected, got = step(plain, x, grad), step(fast, x, grad)
        assert ("_Conv2dFn" in type(got[0].grad_fn).__name__) is taken
        assert got[0].dtype == torch.bfloat16 and got[2].dtype == got[3].dtype == torch.float32
        for g, e in zip(got, expected):  # bf16 products either way, summed in another order
            torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2 * e.abs().max().item())


def test_fp32_keeps_the_plain_convolution_and_no_grad_works():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    gemm_conv.use_gemm_convs(conv)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.grad_fn is None and out.shape == (2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an unbatched image, as nn.Conv2d takes it
        assert conv(x[0]).shape == (4, 5, 5)


def test_a_model_keeps_its_state_dict_and_only_plain_convolutions_change():
    model = build_model("resnet20", 1, 10)
    keys = list(model.state_dict())
    convs = sum(type(m) is nn.Conv2d for m in model.modules())
    assert gemm_conv.use_gemm_convs(model) == convs > 0
    assert list(model.state_dict()) == keys
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    assert gemm_conv.use_gemm_convs(depthwise) == 0 and type(depthwise) is nn.Conv2d


@pytest.mark.parametrize(
    "precision, amx, compiled, converted, small_maps",
    [
        ("bf16", True, False, True, True),
        ("bf16", True, True, True, True),
        ("fp32", True, False, False, False),
        ("bf16", False, False, True, False),
    ],
)
def test_training_converts_for_bf16_and_takes_small_maps_on_amx_only(
    tiny_data, tmp_path, monkeypatch, precision, amx, compiled, converted, small_maps
):
    """Compiled training too: torch.compile traces the matrix multiplies into its graph (BENCHMARKS.md, "Naming the
    cause, and the seed recipe compiled"). Without AMX, bf16 training converts them for the weight gradients that
    oneDNN gets wrong alone."""
    monkeypatch.setattr(gemm_conv, "has_amx", lambda: amx)
    cfg = config.load(None, tiny_overrides(tiny_data, precision=precision, **{"train.compile": compiled}))
    r = run.prepare(cfg, tmp_path / "run", quiet=True)
    convs = [m for m in r.model.modules() if isinstance(m, nn.Conv2d)]
    assert {type(m) for m in convs} == ({gemm_conv.Conv2d} if converted else {nn.Conv2d})
    assert all(getattr(m, "small_maps", False) is small_maps for m in convs)


def whole_net_gradients(model: nn.Module, bf16: bool, backend: str | None = None) -> list[torch.Tensor]:
    """The gradients of a copy of `model` on a fixed batch of 64 12-px images, in fp64 for comparing; through
    torch.compile with `backend` when one is named."""
    net = copy.deepcopy(model)
    call = torch.compile(net, backend=backend) if backend else net
    torch.manual_seed(1)
    x = torch.randn(64, 1, 12, 12).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        nn.functional.cross_entropy(call(x), y).backward()
    return [p.grad.double() for p in net.parameters()]


def error(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    diff = sum(((g - r) ** 2).sum() for g, r in zip(grads, reference))
    return (diff / sum((r**2).sum() for r in reference)).sqrt().item()


def test_a_whole_net_in_bf16_is_as_close_to_fp32_as_with_onednn():
    """ResNet-8 on 12 px images has 12x12 (oneDNN), 6x6 (weight gradient) and 3x3 (all matrix multiplies) maps.
    Compiled (torch.compile traces the matrix multiplies into its graph, as compiled training does) as close too.
    Where training never converts (no AMX) the compiled graph runs eagerly (aot_eager): Inductor's first build of
    its bf16 kernels took 106 s of this test's 111 s on a 2-core AVX-512 EPYC, ~2 minutes where bf16 is emulated,
    against ~20 s in fp32."""
    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10).to(memory_format=torch.channels_last)
    fp32, onednn = whole_net_gradients(model, False), whole_net_gradients(model, True)
    fast = copy.deepcopy(model)
    assert gemm_conv.use_gemm_convs(fast) == 7
    assert 0 < error(onednn, fp32) < 0.2  # bf16's own error: ~0.09
    assert error(whole_net_gradients(fast, True), fp32) < 1.1 * error(onednn, fp32)
    backend = "inductor" if gemm_conv.has_amx() else "aot_eager"
    assert error(whole_net_gradients(fast, True, backend), fp32) < 1.1 * error(onednn, fp32)


@pytest.mark.parametrize("model_name, size", [("resnet18", 16), ("d2l-resnet18", 16), ("resnet8", 2)])
def test_a_convolution_striding_past_its_input_gets_the_right_weight_gradient_in_bf16(
    model_name, size, monkeypatch
):
    """An ImageNet-style ResNet on 16-px images strides its last stage by 2 over a 1x1 map. There PyTorch 2.13's bf16
    weight gradient (oneDNN's), on a 2-core AVX-512 BF16 EPYC without AMX, was NaN, inf or wrong in most calls:
    found as a run of the notebook's net at data.resize=4 that diverged at its first step in bf16 and trained in
    fp32 (benchmarks/onednn_bf16_scan.py). As training prepares the net on a CPU without AMX, its gradients are as
    close to fp32's as those of PyTorch's reference bf16 kernels (oneDNN off), which are right and slow."""
    monkeypatch.setattr(gemm_conv, "has_amx", lambda: False)
    torch.manual_seed(0)
    model = build_model(model_name, 1, 10).to(memory_format=torch.channels_last)
    ours = copy.deepcopy(model)
    run.speed_up(ours, torch.device("cpu"), "bf16")
    x = torch.randn(32, 1, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,))

    def gradients(net: nn.Module, bf16: bool = True) -> list[torch.Tensor]:
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            nn.functional.cross_entropy(net(x), y).backward()
        return [p.grad.double() for p in net.parameters()]

    fp32 = gradients(model, bf16=False)
    with torch.backends.mkldnn.flags(enabled=False):
        reference = error(gradients(copy.deepcopy(model)), fp32)  # bf16's own error here: 0.09-0.4
    assert error(gradients(ours), fp32) < 1.2 * reference


@pytest.mark.skipif(not bf16_native(torch.device("cpu")), reason="bf16 is emulated on this CPU: far too slow")
def test_a_bf16_run_through_gemm_convs_resumes_bit_identical(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(gemm_conv, "has_amx", lambda: True)  # on any CPU with native bf16
    im2col, calls = gemm_conv.im2col, []
    monkeypatch.setattr(gemm_conv, "im2col", lambda *args: calls.append(1) or im2col(*args))
    # 12 px images through ResNet-8: stages at 12x12 (oneDNN), 6x6 (weight gradient), 3x3 (all matrix multiplies)
    cfg = config.load(None, tiny_overrides(tiny_data, precision="bf16", **{"data.resize": 12}))
    fit(cfg, tmp_path / "a", quiet=True)
    crash_then_resume(cfg, tmp_path / "b")
    a, b = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    assert calls  # the matrix multiplies ran
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_an_in_place_relu_may_follow_a_small_map_convolution():
    # a model of your own may put nn.ReLU(inplace=True) straight after a convolution (squeeze-and-excitation's
    # 1x1 layers on a 1x1 map): autograd refuses to modify a custom Function's output in place if it is a view
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(inplace=True))
    fast = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(inplace=True))
    fast.load_state_dict(plain.state_dict())
    assert gemm_conv.use_gemm_convs(fast) == 1
    x = torch.randn(4, 8, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = fast(x), plain(x)
    assert "_Conv2dFn" in type(got.grad_fn.next_functions[0][0]).__name__
    got.float().sum().backward()
    expected.float().sum().backward()
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast[0].weight.grad, plain[0].weight.grad, rtol=2e-2, atol=2e-2)
