import gzip
import hashlib

import numpy as np
import pytest
import torch
from conftest import REAL_DATA, idx_bytes, make_dataset, write_idx
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from reslab.config import DataConfig
from reslab.data import (
    Augment,
    TensorLoader,
    describe,
    flip,
    hold_out,
    input_side,
    load_dataset,
    pad,
    random_crop,
    random_erasing,
    resize,
)
from reslab.data import fashion_mnist as fm
from reslab.data.idx import IdxError, check_pair, parse_idx, read_idx
from reslab.engine.steps import predict_logits
from reslab.errors import ReslabError


# ------------------------------------------------------------------ the IDX reader
def test_reads_gzip_and_raw(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", a)), a)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a", a, compress=False)), a)
    b = np.array([1, -5, 70000], dtype=np.int32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "b", b)), b)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: b"", "empty file"),
        (lambda d: d[:2], "truncated header"),
        (lambda d: d[:-5], "truncated payload"),
        (lambda d: d + b"xyz", "trailing data"),
        (lambda d: b"\x08\x03" + d[2:], "wrong magic"),
        (lambda d: d[:2] + b"\x42" + d[3:], "unknown IDX dtype"),
        (lambda d: d[:3] + b"\x05" + d[4:], "trailing data"),
        (lambda d: d[:4] + (1000).to_bytes(4, "big") + d[8:], "truncated payload"),
        (lambda d: d[:3] + b"\x00" + d[4:], "0 dimensions"),
    ],
)
def test_each_corruption_gives_its_own_clear_error(tmp_path, mutate, message):
    data = idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(mutate(data))
    with pytest.raises(IdxError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_gzip_faults(tmp_path):
    data = gzip.compress(idx_bytes(np.zeros((30, 28, 28), dtype=np.uint8)))
    (tmp_path / "cut.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(IdxError, match="truncated gzip"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "garbage.gz").write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    with pytest.raises(IdxError, match="corrupt gzip"):
        read_idx(tmp_path / "garbage.gz")
    with pytest.raises(IdxError, match="cannot read"):
        read_idx(tmp_path / "missing.gz")


def test_pair_checks():
    images = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(IdxError, match="2 labels for 3 images"):
        check_pair(images, np.zeros(2, np.uint8), 10, ("img", "lab"))
    with pytest.raises(IdxError, match="label 37 out of range 0..9"):
        check_pair(images, np.array([1, 37, 2], np.uint8), 10, ("img", "lab"))
    with pytest.raises(IdxError, match="3 dimensions"):
        check_pair(np.zeros((3, 16), np.uint8), np.zeros(3, np.uint8), 10, ("img", "lab"))
    with pytest.raises(IdxError, match="1 dimension"):
        check_pair(images, np.zeros((3, 1), np.uint8), 10, ("img", "lab"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_any_bytes_give_an_array_or_the_readers_error(data):
    try:
        out = parse_idx(data)
    except IdxError:
        return
    assert isinstance(out, np.ndarray)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=4, max_size=64))
def test_fuzz_valid_header_with_random_payload(payload):
    header = bytes([0, 0, 0x08, 1]) + len(payload).to_bytes(4, "big")
    assert parse_idx(header + payload).tobytes() == payload


# ------------------------------------------------------------------ finding and verifying files
def test_user_directory_is_validated_by_structure(tmp_path):
    root = make_dataset(tmp_path / "d", 100, 40)
    data = load_dataset(DataConfig(root=str(root), name="idx"))
    assert data.train_images.shape == (100, 1, 28, 28) and data.train_images.dtype == torch.uint8
    assert len(data.test_labels) == 40 and data.classes == tuple(str(i) for i in range(10))
    limited = load_dataset(DataConfig(root=str(root), limit=32))
    assert len(limited.train_labels) == 32 and len(limited.test_labels) == 32
    assert limited.classes == fm.CLASSES


def test_input_side_is_known_before_the_data_loads(tmp_path):
    """What the model sees: the resize, else Fashion-MNIST's 28 px (its files say the same); other data's files decide."""
    assert input_side(DataConfig()) == fm.SIDE == 28 and input_side(DataConfig(resize=96)) == 96
    assert (
        input_side(DataConfig(name="folder")) is None and input_side(DataConfig(name="idx", resize=32)) == 32
    )
    data = load_dataset(DataConfig(root=str(make_dataset(tmp_path / "d", 8, 8)), limit=8))
    assert data.train_images.shape[-2:] == (input_side(DataConfig()),) * 2


def test_describe_tells_the_shape_and_classes_load_dataset_gives(tmp_path):
    """What `reslab summary --config` builds the recipe's model for, read from the files without their pixels: a
    folder recipe's summary showed Fashion-MNIST's 1 channel at 28 px, whatever its images were."""
    assert describe(DataConfig(resize=96)) == ((1, 96, 96), 10)
    rng = np.random.default_rng(0)
    idx = tmp_path / "idx"  # images not square, labels 0..4
    idx.mkdir()
    for split, n in (("train", 12), ("t10k", 6)):
        write_idx(idx / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 12, 20), dtype=np.uint8))
        write_idx(idx / f"{split}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 5)
    folder = tmp_path / "pics"  # one RGB image among gray ones, 30 px at its widest
    for i in range(6):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB" if i == 4 else "L", (30, 18)).save(folder / f"c{i % 3}" / f"{i}.png")
    for cfg, shape, classes in (
        (DataConfig(name="idx", root=str(idx)), (1, 12, 20), 5),
        (DataConfig(name="folder", root=str(folder), split=0.3), (3, 30, 30), 3),
    ):
        data = load_dataset(cfg)
        assert describe(cfg) == (shape, classes) == (tuple(data.train_images.shape[1:]), len(data.classes))
    assert describe(DataConfig(name="idx", root=str(idx), resize=16)) == ((1, 16, 16), 5)
    assert describe(DataConfig(name="folder", root=str(folder), split=0.3, resize=16)) == ((3, 16, 16), 3)
    with pytest.raises(ReslabError, match="is not a directory of class folders"):
        describe(DataConfig(name="folder", root=str(tmp_path / "none")))


def test_idx_data_of_one_class_or_of_two_sizes_is_refused(tmp_path):
    """Found by an ad hoc fuzz of IDX datasets: labels that were all 0 trained a one-class net (loss 0, accuracy 1
    whatever it did), and test images of 20 px beside training images of 28 were scored at 20 px without a word."""
    rng = np.random.default_rng(0)

    def idx(name: str, test_side: int, labels: int) -> str:
        root = tmp_path / name
        root.mkdir()
        for split, n, side in (("train", 12, 28), ("t10k", 6, test_side)):
            write_idx(
                root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, side, side), dtype=np.uint8)
            )
            write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % labels)
        return str(root)

    with pytest.raises(
        ReslabError, match="train-labels-idx1-ubyte.gz: every label is 0, one class; a classifier"
    ):
        load_dataset(DataConfig(name="idx", root=idx("one", 28, 1)))
    sizes = idx("sizes", 20, 3)
    with pytest.raises(
        ReslabError, match="^data: the test images are 20x20, the training images 28x28; set data.resize"
    ):
        load_dataset(DataConfig(name="idx", root=sizes))
    # with data.resize the loader resizes both, batch by batch
    data = load_dataset(DataConfig(name="idx", root=sizes, resize=24))
    assert data.train_images.shape[-1] == 28 and data.test_images.shape[-1] == 20


def test_missing_file_and_nothing_found(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", 10, 10)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ReslabError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset(DataConfig(root=str(root)))
    monkeypatch.setattr(fm, "CACHE", tmp_path / "nocache")
    monkeypatch.setattr(fm, "SYSTEM", tmp_path / "nosystem")
    monkeypatch.delenv("RESLAB_DATA", raising=False)
    with pytest.raises(ReslabError, match="not found in .*downloads are off.*; fix: `apt-get install"):
        fm.load_arrays(None, download_ok=False)


def test_download_writes_verified_files_atomically(tmp_path, monkeypatch):
    source = make_dataset(tmp_path / "mirror", 20, 10)
    sums = {
        stem: hashlib.sha256(gzip.decompress((source / f"{stem}.gz").read_bytes())).hexdigest()
        for stem in fm.FILES.values()
    }
    monkeypatch.setattr(fm, "SHA256", sums)
    cache = tmp_path / "cache"
    paths = fm.download(cache, url=source.as_uri() + "/", quiet=True)
    assert all(p.is_file() for p in paths.values())
    assert not list(cache.glob(".*part"))
    # a corrupted mirror: nothing is kept
    bad = tmp_path / "bad"
    make_dataset(bad, 21, 10)
    # named by its URL: the temporary file it was read from is gone ("delete it to download it again" named it)
    with pytest.raises(IdxError) as error:
        fm.download(tmp_path / "cache2", url=bad.as_uri() + "/", quiet=True)
    said = str(error.value)
    assert said.startswith(f"{bad.as_uri()}/train-images-idx3-ubyte.gz: SHA-256 ")
    assert said.endswith(
        "does not match the official Fashion-MNIST file ("
        + sums["train-images-idx3-ubyte"][:12]
        + "...); nothing was kept"
    )
    assert not any((tmp_path / "cache2").iterdir())
    # a file that is not gzip data inside
    (broken := tmp_path / "broken").mkdir()
    for stem in fm.FILES.values():
        (broken / f"{stem}.gz").write_bytes(b"\x1f\x8b" + b"x" * 50)
    with pytest.raises(IdxError) as error:
        fm.download(tmp_path / "cache3", url=broken.as_uri() + "/", quiet=True)
    assert str(error.value).startswith(f"{broken.as_uri()}/train-images-idx3-ubyte.gz: corrupt gzip data (")
    assert str(error.value).endswith("); nothing was kept")
    assert not any((tmp_path / "cache3").iterdir())


def test_a_download_cut_short_says_so_and_keeps_nothing(tmp_path, monkeypatch):
    """A server that closes the connection before its Content-Length: http.client returns the short body as if it
    were whole; the loader said "corrupt gzip data" of a temporary file it had deleted. Now it names the bytes."""
    import http.server
    import threading

    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"x" * 500)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(fm, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(fm, "SYSTEM", tmp_path / "nosystem")
    monkeypatch.setattr(fm, "URL", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.delenv("RESLAB_DATA", raising=False)
    try:
        with pytest.raises(ReslabError) as error:
            fm.load_arrays(None)
    finally:
        server.shutdown()
    said = (
        "the download failed (train-images-idx3-ubyte.gz: the connection closed after 502 of 100,000 bytes)"
    )
    assert said in str(error.value)
    assert not any((tmp_path / "cache").iterdir())


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="Fashion-MNIST files not installed")
def test_real_fashion_mnist_files():
    arrays = fm.load_arrays(REAL_DATA)  # a user root: structure; verify() checks the checksums too
    for stem in fm.FILES.values():
        fm.verify(REAL_DATA / f"{stem}.gz", stem)
    assert arrays.train_images.shape == (60000, 28, 28) and arrays.test_images.shape == (10000, 28, 28)
    assert np.bincount(arrays.train_labels).tolist() == [6000] * 10
    x = arrays.train_images / 255.0
    assert abs(x.mean() - fm.MEAN) < 1e-4 and abs(x.std() - fm.STD) < 1e-4


# ------------------------------------------------------------------ loader and augmentations
def _loader(n=100, batch=32, train=True, seed=0, augment=None, world_size=1, rank=0):
    g = torch.Generator().manual_seed(123)
    images, labels = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 10
    return TensorLoader(
        images,
        labels,
        batch,
        train=train,
        seed=seed,
        augment=augment,
        rank=rank,
        world_size=world_size,
        mean=0.3,
        std=0.4,
    )


def test_drop_last_for_training_never_for_evaluation():
    assert len(_loader(100, 32, train=True)) == 3 and len(list(_loader(100, 32, train=True))) == 3
    test = _loader(100, 32, train=False)
    assert len(test) == 4 and sum(len(y) for _, y in test) == 100


def test_normalised_once():
    loader = _loader()
    x = loader.images
    assert x.dtype == torch.float32 and x.shape == (100, 1, 28, 28)
    assert loader.fill == pytest.approx((-0.3 / 0.4,))


def test_same_seed_same_batches_and_new_order_each_epoch():
    aug = Augment(crop_padding=2, flip=True, erasing=0.5)
    a, b = _loader(augment=aug), _loader(augment=Augment(crop_padding=2, flip=True, erasing=0.5))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    first = [y for _, y in a]
    a.set_epoch(1)
    assert not all(torch.equal(p, q) for p, q in zip(first, [y for _, y in a]))
    c = _loader(seed=1)
    assert not torch.equal(next(iter(c))[1], first[0])
    # resuming mid-epoch replays the same batches
    a.set_epoch(0)
    assert torch.equal(list(a.batches(2))[0][1], first[2])


def test_ranks_split_each_global_batch():
    whole = [y for _, y in _loader(world_size=1)]
    parts = [[y for _, y in _loader(world_size=2, rank=r)] for r in (0, 1)]
    for b, y in enumerate(whole):
        assert torch.equal(torch.cat([parts[0][b], parts[1][b]]), y)
    test = [torch.cat([y for _, y in _loader(train=False, world_size=2, rank=r)]) for r in (0, 1)]
    assert sorted(torch.cat(test).tolist()) == sorted((torch.arange(100) % 10).tolist())


def test_evaluation_deals_every_image_once_over_any_number_of_ranks():
    """Only training's global batch must divide by the ranks: evaluation deals each batch's images out one at a
    time, so 100 images in batches of 32 over 3 ranks (the last batch of 4) are each seen once."""
    images, labels = torch.zeros(100, 28, 28, dtype=torch.uint8), torch.arange(100)
    seen = [
        torch.cat([y for _, y in TensorLoader(images, labels, 32, train=False, rank=r, world_size=3)])
        for r in range(3)
    ]
    assert sorted(torch.cat(seen).tolist()) == list(range(100))
    with pytest.raises(ValueError, match="batch size 32 is not divisible by world size 3"):
        TensorLoader(images, labels, 32, train=True, world_size=3)


def test_flip_is_an_involution_and_flips_about_half():
    x = torch.randn(400, 1, 5, 5)
    once = flip(x, torch.Generator().manual_seed(3))
    assert torch.equal(flip(once, torch.Generator().manual_seed(3)), x)
    flipped = (once != x).flatten(1).any(1).float().mean()
    assert 0.4 < flipped < 0.6
    assert torch.equal(flip(x, torch.Generator(), p=1.0), x.flip(-1))


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    n, g = 120, torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=g)
    loader = TensorLoader(images, torch.arange(n), 24, train=True, augment=Augment(flip=True, alternate=True))

    def flipped(epoch: int, start: int = 0) -> dict[int, bool]:
        loader.set_epoch(epoch)
        seen = {}
        for x, y in loader.batches(start):
            for image, i in zip(x, y.tolist()):
                assert torch.equal(image, loader.images[i]) != torch.equal(image, loader.images[i].flip(-1))
                seen[i] = torch.equal(image, loader.images[i].flip(-1))
        return seen

    first, second = flipped(0), flipped(1)
    assert len(first) == n and 0.35 < sum(first.values()) / n < 0.65  # a seeded coin per image
    assert all(second[i] != first[i] for i in range(n))  # each image once each way over two epochs
    assert flipped(2) == first and flipped(3) == second
    resumed = flipped(1, start=3)  # a resume mid-epoch: the same flips for the batches left
    assert len(resumed) == n - 3 * 24 and all(resumed[i] == second[i] for i in resumed)


def test_pad_fills_each_channel_with_its_own_value():
    x = torch.randn(2, 3, 5, 6)
    out = pad(x, 2, (-1.0, -2.0, -3.0))
    assert out.shape == (2, 3, 9, 10) and torch.equal(out[..., 2:7, 2:8], x)
    border = torch.ones(9, 10, dtype=torch.bool)
    border[2:7, 2:8] = False
    for c, value in enumerate((-1.0, -2.0, -3.0)):
        assert (out[:, c, border] == value).all()
    assert torch.equal(pad(x, 2, (-1.0,) * 3), torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0))


def test_crops_and_shifts_of_a_black_colour_image_stay_black_in_every_channel():
    # per-channel normalisation puts black at a different value in each channel; crops once padded every channel
    # with the first's, so a black RGB image gained a coloured border
    mean, std = (0.5, 0.1, 0.2), (0.25, 0.1, 0.4)
    images = torch.zeros(8, 3, 10, 10, dtype=torch.uint8)
    loader = TensorLoader(
        images, torch.zeros(8), 8, train=True, mean=mean, std=std, augment=Augment(crop_padding=3)
    )
    assert loader.fill == pytest.approx((-2.0, -1.0, -0.5))
    ((x, _),) = list(loader)
    assert torch.equal(x, loader.images)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten())
    with torch.no_grad():
        shifted = predict_logits(model, loader.images, tta_shift=2, fill=loader.fill)
        assert torch.allclose(shifted, model(loader.images), atol=1e-6)


def test_crop_keeps_shape_and_content_is_a_shifted_window():
    x = torch.randn(50, 1, 8, 8)
    out = random_crop(x, torch.Generator().manual_seed(0), padding=2, fill=-9.0)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-9.0)
    for i in range(50):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(random_crop(x, torch.Generator(), padding=0), x)


def test_erasing_changes_only_one_rectangle():
    x = torch.randn(200, 1, 28, 28) + 5
    out = random_erasing(x, torch.Generator().manual_seed(0), p=1.0, value=0.0)
    changed = out != x
    assert changed.flatten(1).any(1).all()
    for i in range(200):
        rows = changed[i, 0].any(1).nonzero().flatten()
        cols = changed[i, 0].any(0).nonzero().flatten()
        box = changed[i, 0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()  # the changed pixels fill their bounding box: one rectangle
        area = box.numel() / (28 * 28)
        assert 0.01 < area < 0.5
    assert torch.equal(random_erasing(x, torch.Generator(), p=0.0), x)


def test_resize_matches_pil_bilinear():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    for size in (96, 224, 20):
        ours = resize(torch.from_numpy(img).float()[None, None] / 255, size)[0, 0].numpy()
        pil = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.float64) / 255
        assert ours.shape == pil.shape
        assert np.abs(ours - pil).mean() < 0.01, size
        assert np.abs(ours - pil).max() < 0.06, size


def test_data_val_holds_out_the_same_training_images_whatever_the_seed(tiny_data):
    """data.val draws its images from a generator of its own: every run of the same data, any seed, holds out the
    same ones; the two parts are the training set, each image once and in the files' order."""
    whole = load_dataset(DataConfig(root=str(tiny_data)))
    held = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        held.append(load_dataset(DataConfig(root=str(tiny_data), val=100)))
    a, b = held
    assert (len(a.train_images), len(a.val_images), len(a.test_images)) == (412, 100, 256)
    assert torch.equal(a.val_images, b.val_images) and torch.equal(a.train_labels, b.train_labels)
    assert torch.equal(a.test_images, whole.test_images)
    images = torch.arange(10).view(10, 1, 1, 1)
    train, train_y, val, val_y = hold_out(images, torch.arange(10), 3)
    assert torch.equal(train.flatten(), train_y) and torch.equal(val.flatten(), val_y)
    assert sorted(train.flatten().tolist() + val.flatten().tolist()) == list(range(10))
    assert train.flatten().tolist() == sorted(train.flatten().tolist()) and len(val) == 3
    parts = torch.cat([a.train_images, a.val_images]).flatten(1)
    assert sorted(map(bytes, parts.numpy())) == sorted(map(bytes, whole.train_images.flatten(1).numpy()))
    with pytest.raises(ReslabError, match="data.val: holding out 512 of 512 training images leaves none"):
        load_dataset(DataConfig(root=str(tiny_data), val=512))
