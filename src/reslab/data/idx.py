"""A strict reader of the IDX format (LeCun's MNIST files), gzip-compressed or raw.

Layout: two zero bytes, a dtype code, the number of dimensions n, then n big-endian uint32 sizes,
then the payload in big-endian order. Every malformation ends in one `IdxError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from ..errors import ReslabError

# dtype code -> big-endian numpy dtype
DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_BYTES = 2**31  # refuse to inflate more than 2 GiB: a hostile gzip cannot exhaust memory


class IdxError(ReslabError):
    """A file that is not valid IDX data."""


def read_bytes(path: str | os.PathLike, name: str | None = None) -> bytes:
    """The file's content, decompressed when it starts with the gzip magic. Its errors call it `name` (a
    download's URL, where `path` is a temporary file), else its path."""
    name = name or os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise IdxError(f"{name}: cannot read ({e.strerror or e})") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        data = d.decompress(raw, MAX_BYTES)
        if d.unconsumed_tail:
            raise IdxError(f"{name}: decompresses to more than {MAX_BYTES} bytes; refusing")
        if not d.eof:
            raise IdxError(f"{name}: truncated gzip stream (the download or copy was cut short)")
        return data
    except (zlib.error, gzip.BadGzipFile, EOFError) as e:
        raise IdxError(f"{name}: corrupt gzip data ({e})") from None


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a native-endian array; raise IdxError on anything malformed."""
    if len(data) == 0:
        raise IdxError(f"{name}: empty file")
    if len(data) < 4:
        raise IdxError(f"{name}: truncated header ({len(data)} bytes, need at least 4)")
    if data[0] != 0 or data[1] != 0:
        raise IdxError(f"{name}: wrong magic number 0x{data[:4].hex()} (not an IDX file, or not gzip)")
    code, ndim = data[2], data[3]
    if code not in DTYPES:
        raise IdxError(f"{name}: unknown IDX dtype code 0x{code:02x}")
    if ndim == 0:
        raise IdxError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{name}: truncated header (declares {ndim} dimensions)")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got < expected:
        raise IdxError(f"{name}: truncated payload ({got} bytes, header {shape} needs {expected})")
    if got > expected:
        raise IdxError(f"{name}: {got - expected} bytes of trailing data after the payload of shape {shape}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def idx_bytes(array: np.ndarray) -> bytes:
    """An array as IDX data: the reader's inverse, for any dtype in DTYPES."""
    codes = {dtype.newbyteorder("="): code for code, dtype in DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise IdxError(f"IDX has no code for dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool = True) -> str | os.PathLike:
    """Write `array` as an IDX file, gzip-compressed unless `compress` is false; returns the path."""
    data = idx_bytes(array)
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)
    return path


def read_idx(path: str | os.PathLike) -> np.ndarray:
    return parse_idx(read_bytes(path), os.fspath(path))


def check_pair(
    images: np.ndarray, labels: np.ndarray, num_classes: int | None, names: tuple[str, str]
) -> None:
    """Structural agreement of an images file and its labels file."""
    img_name, lab_name = names
    if images.ndim != 3:
        raise IdxError(f"{img_name}: images must have 3 dimensions (N, H, W), found shape {images.shape}")
    if images.dtype != np.uint8:
        raise IdxError(f"{img_name}: images must be unsigned bytes, found {images.dtype}")
    if labels.ndim != 1:
        raise IdxError(f"{lab_name}: labels must have 1 dimension, found shape {labels.shape}")
    if len(images) != len(labels):
        raise IdxError(f"{lab_name}: {len(labels)} labels for {len(images)} images in {img_name}")
    if len(labels) == 0:
        raise IdxError(f"{lab_name}: no examples")
    if labels.dtype.kind not in "iu":
        raise IdxError(f"{lab_name}: labels must be integers, found {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bad = low if low < 0 else high
        limit = f"0..{num_classes - 1}" if num_classes else ">= 0"
        raise IdxError(f"{lab_name}: label {bad} out of range {limit}")
