"""In-memory tensor loader and batch augmentations.

The whole dataset lives on the training device as one normalised float tensor (N, C, H, W). An epoch is a
seeded permutation cut into index slices; augmentations are pure functions `(images, generator) -> images`
applied to a batch at once; resize is one `interpolate` per batch. No worker processes, no PIL.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- batch augmentations (pure functions)
def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Random numbers drawn on the CPU, moved to the batch's device. To a GPU the copy goes from pinned
    memory without waiting: a plain copy would make the host wait for every kernel already queued."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def flip(
    images: torch.Tensor, generator: torch.Generator, p: float = 0.5, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mirror each image left-right with probability p, or where `mask` (B,) is true. (B, C, H, W) -> same"""
    if mask is None:
        mask = _to(torch.rand(images.shape[0], generator=generator) < p, images.device)
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def pad(images: torch.Tensor, padding: int, fill: float | tuple[float, ...] = 0.0) -> torch.Tensor:
    """Pad each side of a batch by `padding` pixels of `fill`: one value, or one for each channel (under
    per-channel normalisation, as an RGB folder's, black is a different value in each channel)."""
    fills = (fill,) if isinstance(fill, int | float) else tuple(fill)
    if len(set(fills)) == 1:
        return F.pad(images, (padding,) * 4, value=float(fills[0]))
    h, w = images.shape[-2:]
    inside = torch.zeros(h + 2 * padding, w + 2 * padding, dtype=torch.bool, device=images.device)
    inside[padding : padding + h, padding : padding + w] = True
    value = torch.tensor(fills, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return torch.where(inside, F.pad(images, (padding,) * 4), value)


def random_crop(
    images: torch.Tensor, generator: torch.Generator, padding: int, fill: float | tuple[float, ...] = 0.0
) -> torch.Tensor:
    """Pad by `padding` pixels of `fill` (`pad`) and cut a random window of the original size from each image."""
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    padded = pad(images, padding, fill)
    dy = _to(torch.randint(0, 2 * padding + 1, (b,), generator=generator), images.device)
    dx = _to(torch.randint(0, 2 * padding + 1, (b,), generator=generator), images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_erasing(
    images: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
) -> torch.Tensor:
    """Zhong et al. 2017: with probability p, set a random rectangle of each image to `value` (0 = the mean
    after normalisation). Area fraction in `scale`, aspect ratio (h/w) log-uniform in `ratio`."""
    b, _, h, w = images.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return _to(torch.rand(b, generator=generator) * (high - low) + low, images.device)

    area = uniform(*scale) * h * w
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    eh = torch.sqrt(area * aspect).round().clamp(1, h).long()
    ew = torch.sqrt(area / aspect).round().clamp(1, w).long()
    y0 = (uniform(0, 1) * (h - eh + 1)).floor().long()
    x0 = (uniform(0, 1) * (w - ew + 1)).floor().long()
    apply = uniform(0, 1) < p
    r = torch.arange(h, device=images.device)[None, :, None]
    c = torch.arange(w, device=images.device)[None, None, :]
    rows = (r >= y0[:, None, None]) & (r < (y0 + eh)[:, None, None])  # (B, H, 1)
    cols = (c >= x0[:, None, None]) & (c < (x0 + ew)[:, None, None])  # (B, 1, W)
    inside = rows & cols  # (B, H, W)
    mask = (inside & apply[:, None, None]).unsqueeze(1)  # (B, 1, H, W)
    return images.masked_fill(mask, value)


def black(mean: float | tuple[float, ...], std: float | tuple[float, ...]) -> tuple[float, ...]:
    """The value of a black pixel in each channel after normalisation, (0 - mean) / std."""
    mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    return tuple(((0 - mean_t) / std_t).flatten().tolist())


def resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize of a batch, as torchvision's Resize on PIL images (antialiased when shrinking)."""
    if not size or images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@dataclass
class Augment:
    """Which batch augmentations to apply during training (each optional)."""

    crop_padding: int = 0  # pixels of padding for random crops; 0 = off
    flip: bool = False
    erasing: float = 0.0  # probability of random erasing per image; 0 = off
    fill: float | tuple[float, ...] = 0.0  # value of padded pixels (one, or one a channel): black
    alternate: bool = False  # flip: each image mirrored in every other epoch, from a random first epoch

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, flips: torch.Tensor | None = None
    ) -> torch.Tensor:
        images = random_crop(images, generator, self.crop_padding, self.fill)
        if self.flip:
            images = flip(images, generator, mask=flips)
        if self.erasing > 0:
            images = random_erasing(images, generator, self.erasing)
        return images


# ---------------------------------------------------------------- the loader
class TensorLoader:
    """Batches of (images, labels) from tensors already on the device.

    images: uint8 (N, H, W) or (N, C, H, W); normalised once here to float (x / 255 - mean) / std.
    Each epoch's order is a permutation seeded by (seed, epoch), so an epoch can be replayed exactly after
    a restart, and each of `world_size` ranks takes its own slice of every global batch: the global batch
    is `batch_size`, a rank sees `batch_size // world_size` of it.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        mean: float | tuple[float, ...] = 0.0,
        std: float | tuple[float, ...] = 1.0,
        resize: int | None = None,
        augment: Augment | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ):
        if images.ndim == 3:
            images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self.images = ((images.to(device).float() / 255 - mean_t.to(device)) / std_t.to(device)).contiguous()
        self.labels = labels.to(device=device, dtype=torch.long)
        self.batch_size = batch_size
        self.train = train
        self.resize = resize
        self.augment = augment
        self.seed = seed
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.fill = black(mean, std)  # what random crops and test-time shifts pad with
        if augment is not None:
            augment.fill = self.fill
        # alternating flips: a seeded coin per image for the first epoch (salt -1: no epoch's), the opposite next
        self.first_flips = None
        if train and augment is not None and augment.flip and augment.alternate:
            self.first_flips = (torch.rand(len(labels), generator=self._generator(-1)) < 0.5).to(self.device)
        if train and batch_size % world_size:  # evaluation deals each batch's images out one at a time
            raise ValueError(f"batch size {batch_size} is not divisible by world size {world_size}")

    def __len__(self) -> int:
        """Number of batches per epoch (training drops the last partial batch, evaluation never does)."""
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, *salt: int) -> torch.Generator:
        """A CPU generator for (seed, *salt): every batch's randomness is a pure function of its position."""
        return torch.Generator().manual_seed(hash((self.seed, *salt)) & (2**62 - 1))

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's (images, labels) of each global batch, from batch index `start` on."""
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=self._generator(self.epoch)).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        per_rank = self.batch_size // self.world_size
        for b in range(start, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.train:
                idx = idx[self.rank * per_rank : (self.rank + 1) * per_rank]
            else:
                idx = idx[self.rank :: self.world_size]  # evaluation: every example once over all ranks
            x = self.images[idx]
            if self.train and self.augment is not None:
                flips = None if self.first_flips is None else self.first_flips[idx] ^ bool(self.epoch % 2)
                x = self.augment(x, self._generator(self.epoch, b, self.rank), flips)
            yield resize(x, self.resize), self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()
