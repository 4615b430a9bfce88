"""Layer responses (He et al. 2015, Sec. 4.2 and Fig. 7): why the shortcuts help.

The paper measures the standard deviation of each 3x3 layer's output after its BN and before the ReLU or the
addition. A ResNet's responses are smaller than its plain twin's: its residual functions stay closer to zero, as
the reformulation intends (a layer only has to learn a small change to its input). The deeper the ResNet, the
smaller each layer's response: each layer modifies the signal less.

Here the responses are read from forward hooks on every BatchNorm2d of a net in the original unit order with
option-A shortcuts (the degradation study's nets): there, each BN follows one 3x3 convolution and precedes a
ReLU or the addition. Each layer's std is taken over all its output values (images, channels, positions) on
the whole test set, in eval mode and fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


@torch.no_grad()
def layer_responses(model: nn.Module, batches) -> list[float]:
    """The std of every BatchNorm2d's output over the given batches, in the order the forward pass reaches
    them (stem first)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    order: dict[nn.Module, int] = {}
    moments = torch.zeros(len(bns), 3, dtype=torch.float64)  # per layer: count, sum, sum of squares

    def hook(module, inputs, output):  # read at once: the ReLU after it works in place
        i = order.setdefault(module, len(order))
        o = output.detach().double()
        moments[i] += torch.stack([torch.tensor(o.numel(), dtype=torch.float64), o.sum(), (o * o).sum()])

    handles = [bn.register_forward_hook(hook) for bn in bns]
    try:
        model.eval()
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    n, total, squares = moments[: len(order)].T
    mean = total / n
    return (squares / n - mean * mean).clamp(min=0).sqrt().tolist()


def of_runs(run_dirs: dict[str, Path], data_cfg) -> dict:
    """{"images": n, "nets": {name: responses}}: the responses of each run directory's final weights on all n
    test images of the data every run trained on (2,000 of them left the stds up to 0.008 off). A run whose
    last.pt is gone or unreadable (its summary.json and metrics kept) is left out with a note: the study's
    tables need only those."""
    from ..data import load_dataset, make_test_loader
    from ..engine.checkpoint import CheckpointError
    from ..report import load_model

    models = {}
    for name, d in run_dirs.items():
        try:
            models[name] = load_model(d / "last.pt")[0]
        except CheckpointError as e:
            print(f"note: no layer responses for {name}: {e}", flush=True)
    if not models:
        return {"images": 0, "nets": {}}

    cpu = torch.device("cpu")
    data = load_dataset(data_cfg)
    test = make_test_loader(data, data_cfg, 500, cpu)
    nets = {name: layer_responses(model, (x for x, _ in test)) for name, model in models.items()}
    return {"images": test.num_examples, "nets": nets}


def figure(responses: dict, path: Path) -> None:
    """Like the paper's Fig. 7: the std per layer in the net's order (top) and sorted by size (bottom)."""
    from ..plots import plt, save  # matplotlib on its Agg backend

    fig, axes = plt.subplots(2, 1, figsize=(7, 6.4))
    for name, stds in responses["nets"].items():
        style = "-" if name.startswith("resnet") else "--"
        label = name.replace("resnet", "ResNet-").replace("plain", "plain-")
        axes[0].plot(range(1, len(stds) + 1), stds, style, lw=1.5, marker=".", label=label)
        axes[1].plot(range(1, len(stds) + 1), sorted(stds, reverse=True), style, lw=1.5, label=label)
    axes[0].set(xlabel="layer index (original order)", ylabel="std of response")
    axes[1].set(xlabel="layer index (sorted by magnitude)", ylabel="std of response")
    for ax in axes:  # log scale: a net that failed to train can respond thousands of times more
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
