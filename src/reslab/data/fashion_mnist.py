"""Find, verify and (if need be) download the four Fashion-MNIST files; read them into uint8 arrays.

Search order: the given root (config `data.root`, `--data-dir`, or `RESLAB_DATA`), the user cache
`~/.cache/reslab/fashion-mnist`, Debian's `/usr/share/datasets/fashion-mnist` (package dataset-fashion-mnist),
then the official download into the cache.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ReslabError
from .idx import IdxError, check_pair, parse_idx, read_bytes

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SIDE = 28  # pixels, square
TRAIN_IMAGES = 60_000  # and 10,000 test images
# Pixel statistics of the 60,000 training images on the [0, 1] scale (computed by tests/test_data.py).
MEAN = 0.2860
STD = 0.3530

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the *decompressed* canonical files: the same for the official .gz downloads and for
# re-compressed copies such as Debian's, whose .gz bytes differ but whose content does not.
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CACHE = Path.home() / ".cache" / "reslab" / "fashion-mnist"
SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Arrays:
    """The four arrays of a split dataset: images (N, H, W) uint8 and labels (N,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _complete(directory: Path) -> dict[str, Path] | None:
    found = {key: _find_file(directory, stem) for key, stem in FILES.items()}
    return found if all(found.values()) else None  # type: ignore[return-value]


def user_root(root: str | os.PathLike | None) -> Path | None:
    """The directory the user named (config, --data-dir, or RESLAB_DATA), if any."""
    root = root or os.environ.get("RESLAB_DATA")
    return Path(root).expanduser() if root else None


def download(directory: Path = CACHE, url: str | None = None, quiet: bool = False) -> dict[str, Path]:
    """Download the four files from `url` (default: the official URL) into `directory`, each SHA-256 checked and
    written atomically."""
    from tqdm import tqdm

    url = url or URL
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, stem in FILES.items():
        target = directory / (stem + ".gz")
        out[key] = target
        if target.is_file():
            continue
        with urllib.request.urlopen(url + stem + ".gz", timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{stem}.", suffix=".part")
            try:
                with (
                    os.fdopen(fd, "wb") as f,
                    tqdm(
                        total=total,
                        unit="B",
                        unit_scale=True,
                        desc=stem,
                        disable=quiet or not sys.stderr.isatty(),
                    ) as bar,
                ):
                    while chunk := response.read(1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
                    got = f.tell()
                # http.client ends a body the server cut short as if it were whole
                if total and got < total:
                    raise ConnectionError(
                        f"{stem}.gz: the connection closed after {got:,} of {total:,} bytes"
                    )
                verify(Path(tmp), stem, source=url + stem + ".gz")
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return out


def verify(path: Path, stem: str, source: str | None = None) -> bytes:
    """The file's decompressed bytes, after checking them against the canonical SHA-256. A download's (`source`,
    its URL) problems name the URL: its temporary file is deleted."""
    try:
        data = read_bytes(path, source)
    except IdxError as e:
        if source is None:
            raise
        raise IdxError(f"{e}; nothing was kept") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[stem]:
        fix = "delete it to download it again" if source is None else "nothing was kept"
        raise IdxError(
            f"{source or path}: SHA-256 {digest[:12]}... does not match the official Fashion-MNIST file "
            f"({SHA256[stem][:12]}...); {fix}"
        )
    return data


def locate(root: str | os.PathLike | None = None, download_ok: bool = True) -> tuple[dict[str, Path], bool]:
    """(paths, canonical). A directory the user names is the only place looked at, and is validated by
    structure only (any IDX dataset works there); otherwise the cache, Debian's directory, then a download,
    all checked against the canonical checksums."""
    user = user_root(root)
    if user is not None:
        found = _complete(user)
        if found:
            return found, False
        missing = [s for s in FILES.values() if not _find_file(user, s)] if user.is_dir() else []
        what = f"is missing {', '.join(missing)}" if missing else "does not exist"
        raise ReslabError(f"data directory {user} {what} (each file as .gz or raw IDX)")
    for directory in (CACHE, SYSTEM):
        found = _complete(directory)
        if found:
            return found, True
    if download_ok:
        try:
            return download(CACHE), True
        except OSError as e:
            reason = f"the download failed ({e})"
    else:
        reason = "downloads are off (data.download: false)"
    raise ReslabError(
        f"Fashion-MNIST not found in {CACHE} or {SYSTEM}, and {reason}; fix: "
        "`apt-get install dataset-fashion-mnist`, or put the four files in a directory and pass --data-dir DIR"
    )


def load_arrays(
    root: str | os.PathLike | None = None,
    classes: tuple[str, ...] | None = CLASSES,
    download_ok: bool = True,
) -> Arrays:
    """Read the four IDX files into memory (47 MB of training images), verified."""
    paths, canonical = locate(root, download_ok)
    arrays = {}
    for key, path in paths.items():
        stem = FILES[key]
        data = verify(path, stem) if canonical else read_bytes(path)
        arrays[key] = parse_idx(data, str(path))
    num_classes = len(classes) if classes else None
    for split in ("train", "test"):
        names = (str(paths[f"{split}_images"]), str(paths[f"{split}_labels"]))
        check_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"], num_classes, names)
    if not classes:
        top = int(max(arrays["train_labels"].max(), arrays["test_labels"].max()))
        classes = tuple(str(i) for i in range(top + 1))
    if len(classes) < 2:  # its loss is 0 whatever the model does, as a folder of one class would be
        raise IdxError(f"{paths['train_labels']}: every label is 0, one class; a classifier needs at least 2")
    return Arrays(
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int64),
        tuple(classes),
        str(paths["train_images"].parent),
    )
