"""Layer responses (He et al. 2015, Sec. 4.2 and Fig. 7): why the shortcuts help.

The paper measures the standard deviation of each 3x3 layer's output after its BN and before the ReLU or the
addition. A ResNet's responses are smaller than its plain twin's: its residual functions stay closer to zero, as
the reformulation intends (a layer only has to learn a small change to its input). The deeper the ResNet, the
smaller each layer's response: each layer modifies the signal less.

Here the responses are read from forward hooks on every BatchNorm2d of a net in the original unit order with
option-A shortcuts (the degradation study's nets): there, each BN follows one 3x3 convolution and precedes a
ReLU or the addition. Each layer's std is taken over all its output values (images, channels, positions) on
the whole test set, in eval mode and fp32, as the paper words it. That std counts the spread of the BN's
per-channel shifts too, so a second measure leaves them out: each channel's std over images and positions,
averaged over the layer's channels (about the mean |BN scale| on the data the running statistics came from).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


@torch.no_grad()
def layer_responses(model: nn.Module, batches) -> dict[str, list[float]]:
    """Every BatchNorm2d's output, over the given batches, in the order the forward pass reaches them (stem
    first): {"all": its std over all output values, "per_channel": the mean over channels of each channel's
    std over images and positions}."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    order: dict[nn.Module, int] = {}
    counts: list[int] = []  # per layer: values per channel
    sums: list[torch.Tensor] = []  # per layer: (2, C) sum and sum of squares per channel, float64

    def hook(module, inputs, output):  # read at once: the ReLU after it works in place
        i = order.setdefault(module, len(order))
        o = output.detach().double()  # (B, C, H, W)
        s = torch.stack([o.sum((0, 2, 3)), (o * o).sum((0, 2, 3))])
        if i == len(sums):
            counts.append(0)
            sums.append(torch.zeros_like(s))
        counts[i] += o.numel() // o.shape[1]
        sums[i] += s

    handles = [bn.register_forward_hook(hook) for bn in bns]
    try:
        model.eval()
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()

    def std(n: int, total: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        mean = total / n
        return (squares / n - mean * mean).clamp(min=0).sqrt()

    return {
        "all": [std(n * s.shape[1], *s.sum(1)).item() for n, s in zip(counts, sums)],
        "per_channel": [std(n, *s).mean().item() for n, s in zip(counts, sums)],
    }


def of_nets(nets: dict[str, tuple[nn.Module, dict]], data, data_cfg) -> dict:
    """{"images": n, "classes": k, "nets": {name: stds}, "per_channel": {name: stds}}: layer_responses of each
    trained model of `nets` (common.final_nets) on all n test images of `data`, the data every run trained on
    (2,000 of them left the stds up to 0.008 off)."""
    from ..data import make_test_loader

    if not nets:
        return {"images": 0, "nets": {}, "per_channel": {}}
    test = make_test_loader(data, data_cfg, 500, torch.device("cpu"))
    found = {name: layer_responses(model, (x for x, _ in test)) for name, (model, _) in nets.items()}
    return {
        "images": test.num_examples,
        "classes": len(data.classes),
        "nets": {name: r["all"] for name, r in found.items()},
        "per_channel": {name: r["per_channel"] for name, r in found.items()},
    }


def figure(responses: dict, path: Path, failed: tuple[str, ...] = ()) -> None:
    """Like the paper's Fig. 7: the std per layer in the net's order (top) and sorted by size (middle), on a
    linear scale. The nets named in failed (ones that did not train) can respond thousands of times more; they
    are left out there, and a last panel shows every net on a log scale (the only one if none trained)."""
    from ..plots import plt, save  # matplotlib on its Agg backend

    nets = responses["nets"]
    trained = {name: stds for name, stds in nets.items() if name not in failed}
    untrained = [label(name) for name in nets if name in failed]
    colours = {name: f"C{i}" for i, name in enumerate(nets)}  # a net keeps its colour in every panel
    panels = [(trained, False), (trained, True)] if trained else []
    if untrained:
        panels.append((nets, False))  # the log panel: last
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.2 * len(panels)), squeeze=False)
    for ax, (shown, by_size) in zip(axes[:, 0], panels):
        for name, stds in shown.items():
            style = "-" if name.startswith("resnet") else "--"
            ys = sorted(stds, reverse=True) if by_size else stds
            marker = "" if by_size else "."
            ax.plot(
                range(1, len(ys) + 1),
                ys,
                style,
                color=colours[name],
                lw=1.5,
                marker=marker,
                label=label(name),
            )
        order = "sorted by magnitude" if by_size else "original order"
        ax.set(xlabel=f"layer index ({order})", ylabel="std of response")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if untrained:
        axes[-1, 0].set_yscale("log")
        axes[-1, 0].set_title(f"every net, log scale ({', '.join(untrained)} did not train)", fontsize=9)
    fig.tight_layout()
    save(fig, path)


def label(name: str) -> str:
    """plain110 -> plain-110, resnet20 -> ResNet-20."""
    return name.replace("resnet", "ResNet-").replace("plain", "plain-")
