"""After training: an evaluation report, predictions on image files, and export (ONNX, torch.export, TorchScript)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import config as config_mod
from . import files
from .data import black, load_dataset, make_test_loader, resize, tta_shift_fault
from .engine import checkpoint
from .engine.host import check_memory, set_up
from .engine.precision import autocast, memory_format, resolve_device, resolve_precision
from .engine.run import model_side, speed_up
from .engine.steps import predict_logits
from .errors import ReslabError, first_line, is_count
from .models import build_model


def load_model(path: str | Path) -> tuple[nn.Module, dict, dict]:
    """(model in eval mode, meta, the checkpoint's other entries: config, epoch, batch, history) from a run
    directory (its best.pt) or a checkpoint file. The EMA weights are used when the run kept them: they are what
    the run evaluated."""
    path = checkpoint.find(path)
    state = checkpoint.load(path)
    meta = state.get("meta")
    if not isinstance(meta, dict) or "model_name" not in meta or "config" not in state:
        raise checkpoint.CheckpointError(f"{path}: no model description inside (not written by reslab train)")
    if why := checkpoint.description_fault(state):
        raise checkpoint.CheckpointError(f"{path}: damaged, or not written by reslab: {why}")
    model = build_model(
        meta["model_name"], meta["in_channels"], len(meta["classes"]), **meta["model_options"]
    )
    weights = checkpoint.evaluated_weights(state)
    if why := checkpoint.misfit(model.state_dict(), weights):
        raise checkpoint.CheckpointError(f"{path}: weights do not fit {meta['model_name']}: {why}")
    # NaN weights score every image as one class, with a loss of NaN: say so instead
    if bad := [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise checkpoint.CheckpointError(
            f"{path}: {bad[0]} holds NaN or infinite values (diverged, or damaged)"
        )
    model.load_state_dict(weights)
    # not the tensors the model copied, nor a last.pt's optimiser state: held as long as the caller evaluates or
    # predicts, they would double a large model's memory (932 MB beside resnet152's weights with AdamW and EMA)
    rest = {k: v for k, v in state.items() if k not in ("model", "ema", "optimizer", "epoch_start")}
    return model.eval(), meta, rest


# ------------------------------------------------------------------------------------------- eval
SPLITS = ("test", "val", "train")  # what `reslab eval --split` scores


@torch.no_grad()
def evaluate_checkpoint(
    path: str | Path,
    out: str | Path | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    tta_shift: int | None = None,
    device: str = "auto",
    split: str = "test",
    batch_size: int | None = None,
) -> dict:
    """The report of a checkpoint on its run's test set (`split` "val": the training images its data.val held
    out; "train": the images it trained on, unaugmented), evaluated as its run evaluated (EMA weights, test-time
    flip and shift, precision: `auto` is bf16 where the device computes it natively), except for `tta_shift`
    when given; `limit`: the split's first images only; `batch_size`: images per batch (default: the run's
    train.eval_batch_size). Its figures are named by the split: test_acc, val_acc, train_acc. `device`: auto (a
    CUDA GPU when one is visible, else the CPU), cpu or cuda. On the CPU, a batch that cannot fit in free memory
    is refused in one line (engine.host.check_memory)."""
    if split not in SPLITS:
        raise ReslabError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    for flag, count in (("--limit", limit), ("--batch-size", batch_size)):
        if count is not None and not is_count(count):  # a --limit of -3 took all but the last 3 images
            raise ReslabError(f"{flag} must be a positive integer, got {count!r}")
    # a run directory's best.pt, or its last.pt before one exists: the file the report names
    found = checkpoint.find(path)
    model, meta, state = load_model(found)
    cfg = config_mod.from_dict(state["config"])
    if data_dir:
        cfg.data.root = data_dir
    if split == "val" and not cfg.data.val:
        raise ReslabError(f"--split val: {path} held out no training images (its data.val is 0)")
    if split == "test":
        # the held-out draw changes nothing here, and another --data-dir may have fewer images
        cfg.data.val = 0
    if batch_size:
        cfg.train.eval_batch_size = batch_size
    if tta_shift is not None:
        if tta_shift < 0:
            raise ReslabError(f"--tta-shift: must be >= 0, got {tta_shift}")
        cfg.train.tta_shift = tta_shift
    data = load_dataset(cfg.data, train_images=split != "test")
    # another --data-dir of other classes: its labels would be scored against the model's names
    if tuple(data.classes) != tuple(meta["classes"]):
        raise ReslabError(
            f"the model predicts {_names(meta['classes'])}; {data.source} holds {_names(data.classes)}"
        )
    # the model's own normalisation (another --data-dir's images have other statistics), and the split in the test
    # set's place, as make_test_loader reads it
    data = replace(data, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    if split == "val":
        data = data.validation()
    elif split == "train":
        data = data.training()
    if limit:
        data = replace(data, test_images=data.test_images[:limit], test_labels=data.test_labels[:limit])
    device = resolve_device(device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu":  # Linux's OOM killer would end the process without a word
        side = cfg.data.resize or int(data.test_images.shape[-1])
        shape = (int(data.test_images.shape[1]), side, len(data.classes))
        batch = min(cfg.train.eval_batch_size, len(data.test_labels))
        check_memory(model, cfg.model, shape, (0, batch), precision, "lower --batch-size")
    set_up(device)  # as training does: else each batch faults its activations in afresh
    test = make_test_loader(data, cfg.data, cfg.train.eval_batch_size, device, tta_shift=cfg.train.tta_shift)
    if out is not None:  # before the evaluation, so a wrong --out fails at once
        out = files.make_dir(Path(out))
    # as the run evaluated: its memory format, its precision as this device resolves it, its model rewrites
    mem = memory_format(cfg.train.channels_last)
    model = model.to(device, memory_format=mem)
    speed_up(model, device, precision)
    views = cfg.train.tta_flip, cfg.train.tta_shift, test.fill
    with autocast(device, precision):
        logits = torch.cat([predict_logits(model, x.contiguous(memory_format=mem), *views) for x, _ in test])
    logits = logits.float().cpu()
    labels = data.test_labels
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    k = len(meta["classes"])
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    # a class without images (a --limit, a small folder) has no accuracy, not one of 0
    per_class = {
        name: float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None
        for i, name in enumerate(meta["classes"])
    }
    result = {
        "checkpoint": str(found),
        # epochs it had trained, and the batch of the next epoch a mid-epoch last.pt stopped at
        "epoch": state.get("epoch"),
        "batch": state.get("batch", 0),
        "device": device.type,
        "split": split,
        f"{split}_images": len(labels),
        "tta": {"flip": cfg.train.tta_flip, "shift": cfg.train.tta_shift},
        "precision": precision,
        f"{split}_loss": float(nn.functional.cross_entropy(logits, labels)),
        f"{split}_acc": int((pred == labels).sum()) / len(labels),
        "top2_acc": int((probs.topk(min(2, k), 1).indices == labels[:, None]).any(1).sum()) / len(labels),
        "per_class_acc": per_class,
        "confusion": confusion.tolist(),
        "classes": meta["classes"],
    }
    if out is not None:
        from .plots import confusion_matrix, error_grid

        confusion_matrix(confusion.numpy(), meta["classes"], out / "confusion.png")
        wrong = (pred != labels).nonzero().flatten()
        worst = wrong[probs[wrong, pred[wrong]].argsort(descending=True)][:24]
        error_grid(
            data.test_images[worst, 0].numpy()
            if data.in_channels == 1
            else data.test_images[worst].permute(0, 2, 3, 1).numpy(),
            [meta["classes"][i] for i in labels[worst]],
            [meta["classes"][i] for i in pred[worst]],
            probs[worst, pred[worst]].tolist(),
            out / "errors.png",
        )
        result["outputs"] = [str(out / n) for n in ("eval.json", "confusion.png", "errors.png")]
        files.write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
    return result


def _names(classes) -> str:
    shown = ", ".join(classes[:6]) + (f" and {len(classes) - 6} more" if len(classes) > 6 else "")
    return f"{len(classes)} classes ({shown})"


# ------------------------------------------------------------------------------------------- predict
MAX_PIXELS = 50_000_000  # refuse decompression bombs: 20000 x 20000 is 400 M pixels


def is_gray(mode: str) -> bool:
    """A PIL mode of one gray band, of any depth, alpha or not (L, LA, 1, I, I;16, F); palette is colour."""
    from PIL import Image

    return Image.getmodebase(mode) == "L"


def open_image(path: str | Path):
    """PIL's Image.open (the header only) without its warning of an image over MAX_PIXELS, which read_image then
    refuses in one line of its own."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def read_image(path: str | Path, channels: int | None, size: int, invert: bool = False) -> np.ndarray:
    """A user's image file as the training data looked: grayscale (or RGB) uint8, `size` x `size`; with `channels`
    None, as the file is (is_gray of its mode): (size, size) or (size, size, 3).

    Conversions: RGBA and LA are laid on black (Fashion-MNIST items are light on black), CMYK and palette
    images become RGB then grayscale, 16-bit and 32-bit images are scaled to 8 bits, an animated GIF gives its
    first frame. `invert` turns a dark object on a light background (most photos) into light on dark."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with open_image(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ReslabError(
                    f"{path}: {img.width}x{img.height} is too large (limit {MAX_PIXELS:,} pixels)"
                )
            # by the header's mode, as folder data decides
            channels = channels or (1 if is_gray(img.mode) else 3)
            img.seek(0)  # animated: the first frame
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                span = arr.max() - arr.min()
                img = Image.fromarray(((arr - arr.min()) / (span if span > 0 else 1) * 255).astype(np.uint8))
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, rgba)
            img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
    except FileNotFoundError:
        raise ReslabError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReslabError(f"{path} is a directory; name the image files (e.g. {path}/*.png)") from None
    except PermissionError:
        raise ReslabError(f"{path}: permission denied") from None
    except UnidentifiedImageError:
        raise ReslabError(f"{path}: not an image PIL can read (PNG, JPEG, BMP, GIF, ...)") from None
    except Image.DecompressionBombError as e:
        raise ReslabError(f"{path}: too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ReslabError(f"{path}: broken image file ({e})") from None
    arr = np.asarray(img, dtype=np.uint8)
    return 255 - arr if invert else arr


def predict(path: str | Path, images: list[str] | str, top_k: int = 1, invert: bool = False) -> list[dict]:
    """The `top_k` classes of each image file, with their probabilities, from a run directory or checkpoint."""
    return list(predictions(path, images, top_k, invert))


@torch.no_grad()
def predictions(
    path: str | Path, images: list[str] | str, top_k: int = 1, invert: bool = False
) -> Iterator[dict]:
    """predict's results one file at a time, as each of the run's evaluation batches is classified (thousands of
    files in one batch would not fit in memory). Every file is read, and a bad one refused, before the first."""
    images = [images] if isinstance(images, (str, Path)) else list(images)  # one file, not its characters
    if not images:
        raise ReslabError("predict: no image files given")
    model, meta, state = load_model(path)
    channels, size = meta["in_channels"], meta["image_size"]
    train = config_mod.from_dict(state["config"]).train
    # the loader checks a run's own shift; this one comes from a checkpoint, edited or from elsewhere
    if why := tta_shift_fault(train.tta_shift, meta["resize"] or size):
        raise ReslabError(f"{checkpoint.find(path)}: {why}")
    arrays = [read_image(p, channels, size, invert) for p in images]
    pixels = torch.from_numpy(np.stack(arrays))
    pixels = pixels.unsqueeze(1) if channels == 1 else pixels.permute(0, 3, 1, 2)
    mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
    fill = black(meta["mean"], meta["std"])  # as the loader pads
    step = train.eval_batch_size
    for i in range(0, len(pixels), step):
        x = resize((pixels[i : i + step].float() / 255 - mean) / std, meta["resize"])
        probs = predict_logits(model, x, train.tta_flip, train.tta_shift, fill).softmax(1)
        top = probs.topk(min(top_k, probs.shape[1]), 1)
        for f, ps, idx in zip(images[i : i + step], top.values, top.indices):
            yield {
                "file": str(f),
                "top": [
                    {"class": meta["classes"][c], "probability": float(p)}
                    for p, c in zip(ps.tolist(), idx.tolist())
                ],
            }


# ------------------------------------------------------------------------------------------- export
FORMATS = ("onnx", "pt2", "torchscript")
SUFFIX_FORMATS = {
    ".onnx": "onnx",
    ".pt2": "pt2",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".ts": "torchscript",
}


def export_format(out: Path, fmt: str | None) -> str | None:
    """The format `out` is written in: `fmt` if given, else the one its suffix names (None: no suffix names one). A
    suffix that names another format than `fmt` is refused: the file would not be what its name says."""
    named = SUFFIX_FORMATS.get(out.suffix.lower())
    formats = sorted(set(SUFFIX_FORMATS.values()))
    if fmt and fmt not in formats:  # from Python: the CLI offers only these
        raise ReslabError(f"--format: expected one of {', '.join(formats)}, got {fmt!r}")
    if fmt and named and fmt != named:
        raise ReslabError(
            f"--out {out.name} names {named} by its suffix, but --format asks for {fmt}: "
            f"drop --format, or name the file with another suffix"
        )
    return fmt or named


# what tracing raises for a Python branch on a tensor's value, which a traced file cannot hold
DATA_DEPENDENT = ("TracerWarning", "GuardOnDataDependentSymNode")


@contextlib.contextmanager
def _one_line_if_untraceable(name: str, fmt: str):
    """A model that cannot be exported is one line, and no file. torch.export prints the graph it reached and logs a
    warning before it raises: shown only when the export succeeds. A TorchScript trace that would record one path
    of a Python branch on tensor values (its TracerWarning) fails too, instead of writing a file that answers
    otherwise than the model (a model of your own may branch so; the library's never do)."""
    shapes = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level, printed = shapes.level, io.StringIO()
    shapes.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(printed):
            warnings.filterwarnings("error", category=torch.jit.TracerWarning)
            yield
    except Exception as e:
        while (e.__cause__ or e.__context__) is not None:  # the exporters wrap the cause, some more than once
            e = e.__cause__ or e.__context__
        why = type(e).__name__
        hint = " (its forward branches on a tensor's value)" if why in DATA_DEPENDENT else ""
        raise ReslabError(
            f"cannot export model {name!r} as {fmt}: {why}: {first_line(str(e))}{hint}"
        ) from None
    finally:
        shapes.setLevel(level)
    sys.stderr.write(printed.getvalue())


def export(path: str | Path, fmt: str | None, out: str | Path) -> Path:
    """Write the model as ONNX (opset 18), a torch.export program (.pt2: `torch.export.load(f).module()`) or
    TorchScript, each with a dynamic batch; the input is normalised images of the model's input size, (N, C, H, W).
    Without `fmt` the suffix chooses: .onnx ONNX, .pt2 a torch.export program, .pt, .pth or .ts TorchScript; any
    other suffix is refused (a typo must not write a file in a format its name does not say).
    The file is written whole beside `out` and then renamed over it: a failed export leaves `out` as it was."""
    out = Path(out)
    fmt = export_format(out, fmt)
    # (a directory gets make_file_dir's error instead, which suggests a file name)
    if fmt is None and not out.is_dir():
        raise ReslabError(
            f"--out {out}: cannot tell the format from "
            f"{f'the suffix {out.suffix!r}' if out.suffix else 'a name without a suffix'}; "
            "name the file .onnx, .pt2 or .pt, or choose one with --format onnx|pt2|torchscript"
        )
    if fmt is not None and fmt not in FORMATS:
        raise ReslabError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    files.make_file_dir(out, f"model.{fmt or 'onnx'}")
    model, meta, _ = load_model(path)
    side = model_side(meta)
    example = torch.randn(2, meta["in_channels"], side, side)
    batch = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise ReslabError("ONNX export needs the export extra: pip install 'reslab[export]'") from None
    buffer = io.BytesIO()
    with _one_line_if_untraceable(meta["model_name"], fmt):
        if fmt == "torchscript":
            # torch 2.13 deprecates TorchScript in five warnings; the CLI says it in one line
            warnings.filterwarnings("ignore", r"`torch\.jit\.", DeprecationWarning)
            torch.jit.save(torch.jit.trace(model, example), buffer)
        elif fmt == "pt2":
            torch.export.save(torch.export.export(model, (example,), dynamic_shapes=batch), buffer)
        else:
            # torch 2.13's exporter prints its progress, warns of torchvision's operators (not installed here: it
            # has none of them) and of a deprecated pytree call of its own; the CLI says "wrote FILE" and nothing else
            registration = logging.getLogger("torch.onnx._internal.exporter._registration")
            level = registration.level
            registration.setLevel(logging.ERROR)
            try:
                warnings.filterwarnings("ignore", "`isinstance\\(treespec, LeafSpec\\)`", FutureWarning)
                program = torch.onnx.export(
                    model,
                    (example,),
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_shapes=batch,
                    dynamo=True,
                    verbose=False,
                )
            finally:
                registration.setLevel(level)
            buffer.write(program.model_proto.SerializeToString())
    files.write_bytes(out, buffer.getvalue())
    return out
