"""Model rewrites (engine/rewrites.py) keep the function, every gradient and the state_dict bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_overrides
from torch import nn

from reslab import config
from reslab.engine import gemm_conv, rewrites, run
from reslab.models import ResidualUnit, build_model


def step(
    model: nn.Module, x: torch.Tensor, bf16: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """(output, input gradient then parameter gradients, state_dict after) of one train-mode forward and backward."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    out.float().sum().backward()  # a gradient of 1 everywhere: none vanishes on its way down
    return out.detach(), [x.grad] + [p.grad for p in model.parameters()], model.state_dict()


@pytest.mark.parametrize(
    "name, size, bf16",
    [("d2l-resnet18", 40, False), ("d2l-resnet18", 40, True), ("resnet18", 40, False)],
)
def test_pool_before_relu_leaves_outputs_gradients_and_state_bit_identical(name, size, bf16):
    torch.manual_seed(0)
    model = build_model(name, 1, 10).train()
    swapped = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert rewrites.pool_before_relu(swapped) == 1
    assert [type(m) for m in swapped[0]][2:] == [nn.MaxPool2d, nn.ReLU]
    assert list(swapped.state_dict()) == keys
    x = torch.randn(4, 1, size, size)
    (out, grads, state), (out2, grads2, state2) = step(model, x, bf16), step(swapped, x, bf16)
    assert torch.equal(out, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    assert all(torch.equal(state[k], state2[k]) for k in keys)  # BatchNorm's running statistics too


def test_pool_before_relu_is_exact_on_ties_and_on_windows_with_nothing_positive():
    x = torch.tensor(
        [
            [-1.0, -2.0, 0.0, -3.0, -1.0, 0.0],
            [2.0, 2.0, -1.0, 0.0, -2.0, -4.0],
            [0.0, 1.0, 1.0, -1.0, -1.0, 0.0],
            [3.0, -1.0, 3.0, -2.0, 0.0, -1.0],
            [-1.0, 0.0, -2.0, 1.0, 5.0, 5.0],
            [0.0, -3.0, 1.0, 0.0, 2.0, -2.0],
        ]
    ).view(1, 1, 6, 6)
    plain = nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    swapped = nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    assert rewrites.pool_before_relu(swapped) == 1
    (out, grads, _), (out2, grads2, _) = step(plain, x), step(swapped, x)
    assert torch.equal(out, out2) and torch.equal(grads[0], grads2[0])
    assert (out == 0).sum() == 2  # two windows whose maximum is 0 (tied): no gradient reaches them
    assert grads[0].view(6, 6).nonzero().tolist() == [
        [1, 0],
        [1, 1],
        [3, 0],
        [3, 2],
        [4, 4],
    ]  # ties: the first


def test_pool_before_relu_swaps_only_a_relu_directly_before_a_max_pool():
    others = nn.Sequential(
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.LeakyReLU(),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2, return_indices=True),
    )
    before = [type(m) for m in others]
    assert rewrites.pool_before_relu(others) == 0
    assert [type(m) for m in others] == before
    assert rewrites.pool_before_relu(build_model("resnet20", 1, 10)) == 0  # no max-pool in the CIFAR nets


def test_training_builds_the_rewritten_model(tiny_data, tmp_path):
    cfg = config.load(None, tiny_overrides(tiny_data, **{"model.name": "d2l-resnet18"}))
    r = run.prepare(cfg, tmp_path / "run", quiet=True)
    assert [type(m) for m in r.model[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU]
    assert sum(type(m) is rewrites.GlobalAvgPool for m in r.model.modules()) == 1


def test_speed_up_skips_the_named_rewrite_and_refuses_a_name_it_does_not_know():
    model = build_model("d2l-resnet18", 1, 10)
    run.speed_up(model, torch.device("cpu"), "fp32", skip=("pool_before_relu",), gemm_convs=False)
    assert [type(m) for m in model[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]  # left in order
    assert sum(type(m) is rewrites.GlobalAvgPool for m in model.modules()) == 1  # the other rewrite ran
    with pytest.raises(ValueError, match="unknown rewrites \\['pool_before_rleu'\\]"):
        run.speed_up(model, torch.device("cpu"), "fp32", skip=("pool_before_rleu",))


@pytest.mark.parametrize(
    "name, size, options",
    [
        ("resnet8", 28, {"width": 32, "first_stride": 2, "stem_width": 16}),  # fast.yaml's
        ("resnet20", 28, {}),
        ("wrn-16-4", 28, {}),
        ("d2l-resnet18", 40, {}),
        ("resnet50", 40, {}),
    ],
)
@pytest.mark.parametrize("bf16", [False, True])
def test_global_avg_pool_leaves_outputs_gradients_and_state_bit_identical(name, size, options, bf16):
    """In channels_last, as training runs: the gradient the layers below the pool receive is a broadcast view
    instead of a new NCHW tensor, with the same values."""
    torch.manual_seed(0)
    model = build_model(name, 1, 10, **options).to(memory_format=torch.channels_last).train()
    swapped = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert rewrites.global_avg_pool(swapped) == 1
    assert list(swapped.state_dict()) == keys
    x = torch.randn(4, 1, size, size).contiguous(memory_format=torch.channels_last)
    (out, grads, state), (out2, grads2, state2) = step(model, x, bf16), step(swapped, x, bf16)
    assert torch.equal(out, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))
    assert all(torch.equal(state[k], state2[k]) for k in keys)


def test_global_avg_pool_replaces_only_pools_to_one_pixel_and_takes_any_input():
    class Pool(nn.AdaptiveAvgPool2d):  # a subclass may do more than average
        pass

    others = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.AdaptiveAvgPool2d((1, None)), Pool(1))
    assert rewrites.global_avg_pool(others) == 0
    pools = nn.Sequential(nn.Sequential(nn.AdaptiveAvgPool2d(1)), nn.AdaptiveAvgPool2d((1, 1)))
    assert rewrites.global_avg_pool(pools) == 2
    assert [type(m) for m in pools.modules()][2:] == [rewrites.GlobalAvgPool] * 2
    for shape in [(2, 3, 5, 7), (3, 5, 7)]:  # batched and unbatched, odd sides
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(rewrites.GlobalAvgPool(), (x,))
        assert torch.equal(rewrites.GlobalAvgPool()(x), nn.AdaptiveAvgPool2d(1)(x))
        y = x * 1  # not a leaf: autograd.grad returns the gradient as the backward made it
        (g,) = torch.autograd.grad(rewrites.GlobalAvgPool()(y).sum(), y)
        assert g.stride()[-2:] == (0, 0)  # a broadcast view: nothing of the map's size written


def test_a_broadcast_gradient_reaches_convolutions_and_layers_of_ones_own():
    """A pool right after a small-map convolution hands gemm_conv's backward a broadcast gradient; squeeze-and-
    excitation (a pool inside the residual branch, its input used twice) accumulates one into another."""
    torch.manual_seed(0)
    conv_head = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
    )
    se = build_model("resnet8", 1, 10)
    for unit in se.modules():
        if isinstance(unit, ResidualUnit):
            c = unit.out_channels
            gate = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, c, 1), nn.Sigmoid()
            )
            unit.residual.append(Gated(gate))
    for model, size in [(conv_head, 3), (se, 12)]:
        model = model.to(memory_format=torch.channels_last).train()
        gemm_conv.use_gemm_convs(model)
        swapped = copy.deepcopy(model)
        assert rewrites.global_avg_pool(swapped) >= 1
        x = torch.randn(4, 1, size, size).contiguous(memory_format=torch.channels_last)
        for bf16 in (False, True):
            (out, grads, _), (out2, grads2, _) = step(model, x, bf16), step(swapped, x, bf16)
            assert torch.equal(out, out2)
            assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


class Gated(nn.Module):
    def __init__(self, gate: nn.Module):
        super().__init__()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)
