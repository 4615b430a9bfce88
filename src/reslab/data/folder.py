"""A user's own images: `root/train/<class>/*.png` and `root/test/<class>/*.png`, or `root/<class>/*.png` with a
held-out fraction. Loaded once into the same in-memory uint8 arrays as Fashion-MNIST, resized once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import memory
from ..errors import ReslabError
from .fashion_mnist import Arrays

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _hidden(path: Path) -> bool:
    """Not data: hidden folders and files (.ipynb_checkpoints; macOS's ._name.png beside each image of a zip) and
    the __MACOSX folder macOS zips carry."""
    return path.name.startswith(".") or path.name == "__MACOSX"


def _scan(directory: Path) -> dict[str, list[Path]]:
    """Class name -> its image files."""
    classes = sorted(p for p in directory.iterdir() if p.is_dir() and not _hidden(p))
    return {
        c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in EXTENSIONS and not _hidden(f))
        for c in classes
    }


def _channels(files: list[Path]) -> int:
    """1 when every image is gray (report.is_gray), else 3: one colour image makes the data RGB (the first image
    alone decided, so a gray first image turned every colour image gray, and a float TIFF counted as colour)."""
    from PIL import Image

    from ..report import is_gray, open_image

    for f in files:
        try:
            with open_image(f) as img:  # the header only
                if not is_gray(img.mode):
                    return 3
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue  # reading it says what is wrong with it
    return 1


def _layout(root: str, split: float, classes: list[str] | None) -> tuple[Path, dict, dict, list[str]]:
    """(the folder, train and test files by class name, the class names), checked."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ReslabError(f"data.root {base} is not a directory of class folders")
    if (base / "train").is_dir() and (base / "test").is_dir():
        train, test = _scan(base / "train"), _scan(base / "test")
        if sorted(train) != sorted(test):
            raise ReslabError(
                f"{base}: train/ and test/ hold different class folders: {sorted(train)} vs {sorted(test)}"
            )
    else:
        if not 0 < split < 1:
            raise ReslabError(
                f"{base} has no train/ and test/ folders: set data.split, e.g. 0.2, to hold out a test fraction"
            )
        rng = np.random.default_rng(0)
        train, test = {}, {}
        for name, files in _scan(base).items():
            order = rng.permutation(len(files))
            cut = max(1, round(len(files) * split)) if len(files) > 1 else 0
            test[name] = [files[i] for i in sorted(order[:cut])]
            train[name] = [files[i] for i in sorted(order[cut:])]
    names = sorted(train)
    if classes and len(classes) != len(names):
        raise ReslabError(f"data.classes names {len(classes)} classes, {base} has {len(names)} class folders")
    if len(names) < 2 or not any(train.values()):
        raise ReslabError(
            f"{base}: need at least 2 class folders with images ({', '.join(sorted(EXTENSIONS))})"
        )
    if untrained := [n for n in names if not train[n]]:  # a class the model would never see, yet must predict
        raise ReslabError(
            f"{base}: class folder{'s' if len(untrained) > 1 else ''} {', '.join(untrained)} "
            f"{'hold' if len(untrained) > 1 else 'holds'} no training images ({', '.join(sorted(EXTENSIONS))})"
        )
    return base, train, test, names


def _side(train: dict, size: int | None) -> int:
    """The side of the square images the folder loads as: `size`, else the first image's larger side."""
    from PIL import Image

    from ..report import open_image, read_image

    first = next(f for files in train.values() for f in files)
    try:
        with open_image(first) as img:
            return size or max(img.size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        read_image(first, 1, 1)  # says in one line what is wrong with it
        raise


def describe(
    root: str, split: float, size: int | None, classes: list[str] | None = None
) -> tuple[int, int, int]:
    """(channels, side, classes) of what load_folder would give, from the folder's layout and image headers."""
    _, train, test, names = _layout(root, split, classes)
    every = [f for split_files in (train, test) for files in split_files.values() for f in files]
    return _channels(every), _side(train, size), len(names)


def load_folder(
    root: str, split: float, size: int | None, classes: list[str] | None = None, train_images: bool = True
) -> Arrays:
    """The folder's images and labels; without `train_images`, the training split is empty (a test-set report
    needs none of them: 60,000 PNG files took 10 of the 14 s)."""
    from ..report import read_image

    base, train, test, names = _layout(root, split, classes)
    side = _side(train, size)
    n = sum(len(files) for part in ((train, test) if train_images else (test,)) for files in part.values())
    need = n * side * side  # bytes if gray: a floor (RGB needs 3x)
    if (free := memory.available()) is not None and need * memory.local_ranks() > free:
        raise ReslabError(
            f"{base}: its {n:,} images at {side}x{side} pixels need at least {memory.amount(need)} in memory"
            f"{memory.on_each_rank(need)}, more than the {memory.amount(free)} this machine has free: "
            f"{'lower' if size else 'set'} data.resize{memory.or_fewer_ranks()}"
        )

    def read(split_files: dict[str, list[Path]]) -> tuple[list[np.ndarray], np.ndarray]:
        # each image decoded once, as it is (gray or RGB): the data's channels are known after the last
        images = [read_image(f, None, side) for name in names for f in split_files[name]]
        labels = [label for label, name in enumerate(names) for _ in split_files[name]]
        return images, np.array(labels, dtype=np.int64)

    train_x, train_y = read(train if train_images else {name: [] for name in names})
    test_x, test_y = read(test)
    if not len(test_y):
        raise ReslabError(f"{base}: its test split has no images")
    # one colour image makes the data RGB: the training images not read decide by their headers
    unread = [] if train_images else [f for files in train.values() for f in files]
    colour = any(a.ndim == 3 for a in (*train_x, *test_x)) or (bool(unread) and _channels(unread) == 3)

    def stack(images: list[np.ndarray]) -> np.ndarray:
        if not images:  # the training split, not asked for
            return np.zeros((0, 3 if colour else 1, side, side), np.uint8)
        if not colour:
            return np.stack(images)
        # a gray image in RGB data: its band three times, as PIL converts L to RGB
        rgb = [a if a.ndim == 3 else np.repeat(a[..., None], 3, 2) for a in images]
        return np.stack(rgb).transpose(0, 3, 1, 2)

    return Arrays(stack(train_x), train_y, stack(test_x), test_y, tuple(classes or names), str(base))
