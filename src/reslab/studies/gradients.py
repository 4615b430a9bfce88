"""Backward signals: do the plain nets' gradients vanish?

He et al. 2015 (Sec. 4.1) argue that the plain nets' degradation is not vanishing gradients: "These plain
networks are trained with BN, which ensures forward propagated signals to have non-zero variances. We also
verify that the backward propagated gradients exhibit healthy norms with BN." They show no figures. This measures
it: the root mean square of the loss's gradient with respect to each 3x3 layer's output (the input of its BN),
the signal the backward pass carries down the net, in the forward order (stem first). The loss is summed over
the batch, so the scale is one image's; the nets run in training mode (batch statistics, as training sees them)
in fp32, on the first test batches, once freshly initialised (seed 0) and once with the run's final weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def layer_gradients(model: nn.Module, batches) -> list[float]:
    """The RMS over all values and batches of d(summed loss)/d(output of the layer before each BatchNorm2d), in
    the order the forward pass reaches the BNs. `batches` yields (images, labels). The model comes back in train
    mode with no gradients and its weights and BN running statistics as they were."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # training mode moves the running statistics; an evaluation after this probe must find them unmoved
    kept = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    order: dict[nn.Module, int] = {}
    squares: list[float] = []
    counts: list[int] = []

    def hook(module, inputs, output):
        i = order.setdefault(module, len(order))
        if i == len(squares):
            squares.append(0.0)
            counts.append(0)

        def read(grad: torch.Tensor) -> None:
            squares[i] += grad.double().square().sum().item()
            counts[i] += grad.numel()

        # the conv's output: BN does not change it in place, the ReLU after BN may
        inputs[0].register_hook(read)

    handles = [bn.register_forward_hook(hook) for bn in bns]
    try:
        model.train()
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for bn, state in zip(bns, kept):
            bn.load_state_dict(state)
    return [(s / n) ** 0.5 for s, n in zip(squares, counts)]


def weight_growth(trained: nn.Module, fresh: nn.Module) -> list[float]:
    """Each 3x3 convolution's weight norm after training over its norm at initialisation, in module order. A
    convolution followed by BN computes the same function at any scale of its weights, and its gradient shrinks
    as the weights grow: a layer whose weights grew k-fold learns as if its learning rate were k^2 times smaller."""

    def norms(model: nn.Module) -> list[float]:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        return [m.weight.detach().norm().item() for m in convs]

    return [a / b for a, b in zip(norms(trained), norms(fresh))]


def of_nets(
    nets: dict[str, tuple[nn.Module, dict]], data, data_cfg, batches: int = 8, size: int = 128
) -> dict:
    """{"images": n, "init": {name: rms per layer}, "trained": {name: rms per layer}, "growth": {name: weight
    growth per layer}} for each (trained model, meta) of `nets` (common.final_nets) and the same net freshly
    initialised (seed 0, as the study's runs start), on the first `batches` test batches of `data`."""
    from ..data import make_test_loader
    from ..models import build_model

    found: dict = {"images": 0, "init": {}, "trained": {}, "growth": {}}
    if not nets:
        return found
    test = make_test_loader(data, data_cfg, size, torch.device("cpu"))
    sample = [b for _, b in zip(range(batches), test)]
    found["images"] = sum(len(y) for _, y in sample)
    for name, (model, meta) in nets.items():
        torch.manual_seed(0)
        fresh = build_model(
            meta["model_name"], meta["in_channels"], len(meta["classes"]), **meta["model_options"]
        )
        found["init"][name] = layer_gradients(fresh, sample)
        found["trained"][name] = layer_gradients(model, sample)
        found["growth"][name] = weight_growth(model, fresh)
    return found


def figure(found: dict, path: Path) -> None:
    """The gradient RMS per layer, at initialisation (left) and after training (right), on a log scale; plain
    dashed, ResNet solid."""
    from ..plots import plt, save  # matplotlib on its Agg backend
    from .responses import label

    names = list(found["init"])
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, when, title in zip(axes, ("init", "trained"), ("at initialisation", "after training")):
        for name in names:
            rms = found[when][name]
            style = "-" if name.startswith("resnet") else "--"
            ax.plot(range(1, len(rms) + 1), rms, style, color=colours[name], lw=1.5, label=label(name))
        ax.set(xlabel="3x3 layer (input side first)", title=title, yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("RMS of the loss gradient at the layer's output")
    fig.tight_layout()
    save(fig, path)


__all__ = ["figure", "layer_gradients", "of_nets", "weight_growth"]
