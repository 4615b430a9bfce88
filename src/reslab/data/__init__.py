"""Datasets as in-memory tensors and the batch loader over them."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ReslabError
from . import fashion_mnist
from .loader import Augment, TensorLoader, black, flip, pad, random_crop, random_erasing, resize


@dataclass
class Dataset:
    """A split dataset in memory: uint8 images (N, C, H, W), int64 labels, class names, pixel statistics; with
    data.val, the training images held out for validation."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    def validation(self) -> Dataset:
        """The held-out images in the test split's place: what make_test_loader reads for a validation loader."""
        return replace(self, test_images=self.val_images, test_labels=self.val_labels)

    def training(self) -> Dataset:
        """The training images in the test split's place: make_test_loader then reads them unaugmented."""
        return replace(self, test_images=self.train_images, test_labels=self.train_labels)


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]. A constant channel (an RGB folder of red
    shapes: green and blue all 0) gets std 1, not 0: dividing by 0 made every input NaN."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    std = x.std(1)
    return tuple(x.mean(1).tolist()), tuple(torch.where(std > 0, std, 1.0).tolist())


def input_side(cfg: DataConfig) -> int | None:
    """The side in pixels of the square images a recipe's model sees, known without loading the data: its resize,
    else Fashion-MNIST's own; None for other data, whose side the files decide."""
    return cfg.resize or (fashion_mnist.SIDE if cfg.name == "fashion-mnist" else None)


def describe(cfg: DataConfig) -> tuple[tuple[int, int, int], int]:
    """((channels, height, width), classes) of the images a recipe's model sees. Fashion-MNIST's are known; other
    data's from its files: an IDX dataset's (small, read whole), a folder's layout and image headers."""
    if cfg.name == "fashion-mnist":
        side = input_side(cfg)
        return (1, side, side), len(fashion_mnist.CLASSES)
    if cfg.name == "folder":
        from .folder import describe as describe_folder

        channels, side, classes = describe_folder(cfg.root, cfg.split, cfg.resize, cfg.classes)
        return (channels, side, side), classes
    arrays = fashion_mnist.load_arrays(cfg.root, tuple(cfg.classes) if cfg.classes else None, cfg.download)
    height, width = arrays.train_images.shape[1:]  # IDX images are gray: (N, H, W)
    return (1, cfg.resize or height, cfg.resize or width), len(arrays.classes)


def load_dataset(cfg: DataConfig, train_images: bool = True) -> Dataset:
    """Read the configured dataset into memory (uint8), first `limit` images of each split if set. Without
    `train_images`, for a report on the test set alone, folder data reads no training image (IDX data reads them
    all the same: 0.4 s for Fashion-MNIST's); its statistics are then 0 and 1, for a caller with a model's own."""
    if cfg.name == "folder":
        from .folder import load_folder

        arrays = load_folder(cfg.root, cfg.split, cfg.resize, cfg.classes, train_images)
    else:
        classes = fashion_mnist.CLASSES if cfg.name == "fashion-mnist" else cfg.classes
        arrays = fashion_mnist.load_arrays(cfg.root, tuple(classes) if classes else None, cfg.download)

    def tensor(a: np.ndarray) -> torch.Tensor:
        a = a[: cfg.limit] if cfg.limit else a
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.unsqueeze(1) if t.ndim == 3 else t

    train_x, test_x = tensor(arrays.train_images), tensor(arrays.test_images)
    if cfg.resize is None and (shape := test_x.shape[-2:]) != (side := train_x.shape[-2:]):
        # the model would be tested on maps of another size than it trained on, and say nothing
        raise ReslabError(
            f"data: the test images are {shape[-2]}x{shape[-1]}, the training images {side[-2]}x{side[-1]}; "
            "set data.resize to bring both to one size"
        )
    train_y, val_x, val_y = tensor(arrays.train_labels).long(), None, None
    if cfg.val:
        train_x, train_y, val_x, val_y = hold_out(train_x, train_y, cfg.val)
    if not cfg.normalize or not len(train_x):
        mean, std = (0.0,) * test_x.shape[1], (1.0,) * test_x.shape[1]
    elif cfg.name == "fashion-mnist":
        mean, std = (fashion_mnist.MEAN,), (fashion_mnist.STD,)
    else:
        mean, std = _stats(train_x)
    return Dataset(
        train_x,
        train_y,
        test_x,
        tensor(arrays.test_labels).long(),
        arrays.classes,
        mean,
        std,
        arrays.source,
        val_x,
        val_y,
    )


def hold_out(
    images: torch.Tensor, labels: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, labels, validation images, labels): `n` training images drawn for validation by a generator
    of its own (seed 0), so every run of the same data holds out the same ones; each part keeps the files' order."""
    if n >= len(images):
        raise ReslabError(
            f"data.val: holding out {n} of {len(images)} training images leaves none to train on"
        )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    val, train = order[:n].sort().values, order[n:].sort().values
    return images[train], labels[train], images[val], labels[val]


def make_loaders(
    data: Dataset,
    cfg: DataConfig,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    tta_shift: int = 0,
) -> tuple[TensorLoader, TensorLoader]:
    """The training and test loaders. The crop's padding, known to fit only once the data is read, is checked
    here against the stored images; the test-time shift in make_test_loader."""
    native = min(data.train_images.shape[-2:])
    if cfg.crop_padding >= native:
        raise ReslabError(
            f"data.crop_padding: must be smaller than the {native}-pixel images, got {cfg.crop_padding}"
        )
    test = make_test_loader(data, cfg, eval_batch_size, device, rank, world_size, tta_shift)
    augment = Augment(cfg.crop_padding, cfg.flip, cfg.erasing, alternate=cfg.alternate_flip)
    train = TensorLoader(
        data.train_images,
        data.train_labels,
        batch_size,
        train=True,
        augment=augment,
        seed=seed,
        **_common(data, cfg, device, rank, world_size),
    )
    return train, test


def tta_shift_fault(tta_shift: int, seen: int) -> str | None:
    """Why a test-time shift of `tta_shift` pixels cannot shift inputs of `seen` pixels (None if it can)."""
    if tta_shift >= seen:
        return f"train.tta_shift: must be smaller than the {seen}-pixel inputs, got {tta_shift}"
    return None


def make_test_loader(
    data: Dataset,
    cfg: DataConfig,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    tta_shift: int = 0,
) -> TensorLoader:
    """The test loader alone (`reslab eval`); `tta_shift` must be smaller than the images the model sees."""
    if why := tta_shift_fault(tta_shift, cfg.resize or min(data.test_images.shape[-2:])):
        raise ReslabError(why)
    return TensorLoader(
        data.test_images,
        data.test_labels,
        batch_size,
        train=False,
        **_common(data, cfg, device, rank, world_size),
    )


def _common(data: Dataset, cfg: DataConfig, device: torch.device, rank: int, world_size: int) -> dict:
    return dict(
        mean=data.mean, std=data.std, resize=cfg.resize, device=device, rank=rank, world_size=world_size
    )


__all__ = [
    "Augment",
    "Dataset",
    "TensorLoader",
    "black",
    "describe",
    "flip",
    "hold_out",
    "input_side",
    "load_dataset",
    "make_loaders",
    "make_test_loader",
    "pad",
    "random_crop",
    "random_erasing",
    "resize",
    "tta_shift_fault",
]
