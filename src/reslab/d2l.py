"""The seed notebook's names, on top of reslab. `from reslab.d2l import Residual, resnet_block, ...` lets the
notebook's cells run unchanged: these are thin wrappers over the library, not a second implementation."""

from __future__ import annotations

import torch
from torch import nn

from .config import DataConfig
from .data import TensorLoader, load_dataset, make_loaders
from .engine.host import set_up
from .engine.steps import evaluate, train_step
from .errors import is_count
from .models.blocks import ResidualUnit


class Residual(ResidualUnit):
    """The notebook's residual block: two 3x3 convs with bias, BN, ReLU after the addition, and an optional
    1x1 conv (with bias) on the shortcut. `Residual(3, 3, use_1x1conv=True, strides=2)` maps (4,3,6,6) to
    (4,3,3,3)."""

    def __init__(self, input_channels: int, num_channels: int, use_1x1conv: bool = False, strides: int = 1):
        super().__init__(
            input_channels,
            num_channels,
            stride=strides,
            kind="basic",
            order="original",
            shortcut="projection-nobn" if use_1x1conv else "identity",
            bias=True,
            always_project=use_1x1conv,
        )


def resnet_block(
    input_channels: int, num_channels: int, num_residuals: int, first_block: bool = False
) -> list[nn.Module]:
    """The notebook's stage builder: a list of `num_residuals` blocks; the first halves the resolution and
    projects, except in the first stage (`first_block=True`)."""
    blk: list[nn.Module] = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels, use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(num_channels, num_channels))
    return blk


class _Sized:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class DataIter:
    """Behaves like the notebook's DataLoader: iterate (X, y), `len()` batches, `.dataset` with `len()`.
    Each new iteration of a training iterator is a new epoch with a new shuffle."""

    def __init__(self, loader: TensorLoader):
        self.loader = loader
        self.dataset = _Sized(loader.num_examples)
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.loader.set_epoch(self._epoch)
        self._epoch += 1
        return iter(self.loader)


def load_fashion_mnist_dataset(
    batch_size: int, resize: int | None = None, root: str | None = None, limit: int | None = None
) -> tuple[DataIter, DataIter]:
    """The notebook's loader, in memory: (train_iter, test_iter) of Fashion-MNIST in [0, 1] (as ToTensor),
    resized to `resize` pixels. The training iterator shuffles each epoch and drops the last partial batch
    (the engine's rule: every step sees a full batch); the test iterator covers every image."""
    for name, value, optional in (
        ("batch_size", batch_size, False),
        ("resize", resize, True),
        ("limit", limit, True),
    ):
        if (value is not None or not optional) and not is_count(value):
            raise ValueError(
                f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}"
            )
    cfg = DataConfig(root=root, limit=limit, resize=resize, normalize=False)
    data = load_dataset(cfg)
    train, test = make_loaders(data, cfg, batch_size, batch_size, seed=0, device=torch.device("cpu"))
    if not len(train):  # no full batch: an epoch of no steps
        raise ValueError(f"batch_size {batch_size} exceeds the {train.num_examples} training images")
    return DataIter(train), DataIter(test)


load_data_fashion_mnist = load_fashion_mnist_dataset  # the name in the d2l book


def train_3ch(net, loss, num_epochs, train_iter, optimizer, test_iter, device) -> list[dict]:
    """The notebook's training function on reslab's engine: train mode every epoch (the notebook's NaN bug is
    fixed), guarded steps, true mean losses. Prints the notebook's line for each epoch; returns the metrics.
    `loss` may keep one loss an example (the d2l book's `nn.CrossEntropyLoss(reduction="none")`): steps take
    their mean."""
    device = torch.device(device)
    criterion = (lambda y_hat, y: loss(y_hat, y).mean()) if getattr(loss, "reduction", "") == "none" else loss
    set_up(device)  # as reslab's own runs do
    net.to(device)
    history = []
    for epoch in range(num_epochs):
        net.train()
        loss_sum, correct, count = 0.0, 0, 0
        for b, (X, y) in enumerate(train_iter):
            X, y = X.to(device), y.to(device)
            batch_loss, _, batch_correct = train_step(
                net, X, y, optimizer, criterion, epoch * len(train_iter) + b, device
            ).tolist()
            loss_sum += batch_loss * y.numel()
            correct += batch_correct
            count += y.numel()
        test = evaluate(net, test_iter, device, channels_last=False)
        m = {"epoch": epoch, "train_loss": loss_sum / count, "train_acc": correct / count, **test}
        history.append(m)
        print(
            f"epoch {epoch}, training loss {m['train_loss']:.4f}, training accuracy {m['train_acc']:.4f}, "
            f"testing loss {m['test_loss']:.4f}, testing accuracy {m['test_acc']:.4f}"
        )
    return history
