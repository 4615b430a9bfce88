import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from conftest import REAL_DATA, make_images, tiny_overrides
from PIL import Image

from reslab import config, files
from reslab.cli import main
from reslab.engine import checkpoint, fit
from reslab.engine.precision import bf16_native
from reslab.errors import ReslabError
from reslab.history import duration
from reslab.lock import lock_dir
from reslab.report import evaluate_checkpoint, export, load_model, predict, read_image
from reslab.runs import read_history


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained on the real test-style data when present, else on the toy data."""
    tmp = tmp_path_factory.mktemp("trained")
    if REAL_DATA.is_dir():
        overrides = [
            f"data.root={REAL_DATA}",
            "data.limit=3000",
            "model.name=resnet8",
            "train.epochs=2",
            "train.batch_size=64",
            "optim.name=adamw",
            "optim.lr=0.003",
            "precision=fp32",
            "device=cpu",
        ]
    else:
        from conftest import make_dataset

        data = make_dataset(tmp / "data", 1024, 256)
        overrides = tiny_overrides(data, **{"train.epochs": 4, "optim.name": "adamw", "optim.lr": 0.003})
    fit(config.load(None, overrides), tmp / "run", quiet=True)
    return tmp / "run"


def test_eval_report_is_consistent_with_the_run(trained, tmp_path):
    result = evaluate_checkpoint(trained, out=tmp_path / "eval", device="cpu")
    summary = json.loads((trained / "summary.json").read_text())
    assert result["device"] == "cpu"
    assert result["test_acc"] == pytest.approx(summary["best_test_acc"], abs=1e-9)
    assert result["top2_acc"] >= result["test_acc"]
    confusion = np.array(result["confusion"])
    assert confusion.sum() == result["test_images"] and confusion.trace() / confusion.sum() == pytest.approx(
        result["test_acc"]
    )
    assert set(result["per_class_acc"]) == set(result["classes"])
    for name in ("eval.json", "confusion.png", "errors.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 1000
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["test_acc"] == result["test_acc"]


def test_an_evaluation_batch_that_cannot_fit_in_memory_is_one_line_and_a_smaller_one_scores_the_same(
    trained, tmp_path, monkeypatch, capsys
):
    """A run trained on a large machine (or a GPU) may be evaluated on a small one: on the CPU, an evaluation batch
    whose activations cannot fit is refused before anything is written, and --batch-size makes it smaller."""
    from reslab import memory
    from reslab.models import activation_bytes

    model, _, state = load_model(trained)
    cfg = config.from_dict(state["config"])
    _, largest = activation_bytes(model.train(), (1, 28, 28))
    whole = evaluate_checkpoint(trained, device="cpu")
    batch = min(cfg.train.eval_batch_size, whole["test_images"])
    monkeypatch.setattr(memory, "available", lambda: batch * largest - 1)
    out = tmp_path / "eval"
    assert main(["eval", str(trained), "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not out.exists(), err
    assert (
        f"an evaluation batch of resnet8 needs at least {memory.amount(batch * largest)} ({batch:,} images"
        in err
    )
    assert err.endswith("free: lower --batch-size"), err
    small = evaluate_checkpoint(trained, device="cpu", batch_size=batch // 3)
    assert small["test_acc"] == whole["test_acc"] and small["test_loss"] == pytest.approx(whole["test_loss"])


def test_a_class_without_test_images_has_no_accuracy(trained, capsys):
    """Three test images leave at least seven classes without any: their accuracy is None (JSON null, "no test
    images" on the terminal), not 0, which would say the model got every one wrong."""
    result = evaluate_checkpoint(trained, limit=3, device="cpu")
    rows = np.array(result["confusion"]).sum(1)
    assert rows.sum() == 3 and (rows == 0).sum() >= 7
    for name, count in zip(result["classes"], rows):
        assert (result["per_class_acc"][name] is None) == (count == 0)
    assert main(["eval", str(trained), "--limit", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("no test images") == (rows == 0).sum()


def test_eval_names_the_checkpoint_it_read_and_how_far_it_had_trained(trained, tmp_path, capsys):
    # a run directory's best.pt, or its last.pt before there is one: a run still training said neither
    best = checkpoint.load(trained / "best.pt")
    assert main(["eval", str(trained), "--limit", "5"]) == 0
    epochs = best["epoch"]
    assert (
        capsys.readouterr().out.splitlines()[0]
        == f"{trained / 'best.pt'} (after {epochs} epochs): 5 test images"
    )
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save({**best, "epoch": 1, "batch": 40}, run / "last.pt")  # as a mid-epoch checkpoint says it
    assert main(["eval", str(run), "--limit", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["checkpoint"], result["epoch"], result["batch"]) == (str(run / "last.pt"), 1, 40)
    assert main(["eval", str(run), "--limit", "5"]) == 0
    assert capsys.readouterr().out.startswith(
        f"{run / 'last.pt'} (after 1 epoch and 40 batches): 5 test images\n"
    )


@pytest.mark.skipif(not bf16_native(torch.device("cpu")), reason="needs a CPU with native bf16")
def test_eval_of_a_bf16_run_finds_the_runs_own_figures(tiny_data, tmp_path):
    """A run that evaluated in bf16 (precision auto on such a CPU) is evaluated again in bf16, with its model
    rewrites: the same loss and accuracy, not fp32's slightly different ones."""
    overrides = tiny_overrides(tiny_data, **{"precision": "auto", "train.epochs": 1, "data.limit": 2048})
    summary = fit(config.load(None, overrides), tmp_path / "run", quiet=True)
    assert summary["precision"] == "bf16"
    result = evaluate_checkpoint(tmp_path / "run")
    assert result["precision"] == "bf16"
    assert result["test_acc"] == summary["test_acc"] and result["test_loss"] == pytest.approx(
        summary["test_loss"], rel=1e-5
    )


def test_load_model_holds_the_model_not_the_checkpoint(trained, monkeypatch):
    """load_model copies the weights into the model; the checkpoint's tensors (a last.pt's optimiser state too)
    are let go, not held as long as the evaluation or prediction that loaded them runs."""
    import gc
    import weakref

    real, tensors = checkpoint.load, []

    def load(path, **kw):
        state = real(path, **kw)
        tensors.extend(weakref.ref(t) for part in ("model", "optimizer") for t in _tensors(state[part]))
        return state

    monkeypatch.setattr(checkpoint, "load", load)
    model, meta, rest = load_model(trained / "last.pt")
    gc.collect()
    assert len(tensors) > 20 and all(ref() is None for ref in tensors)
    assert {"config", "epoch", "batch"} <= set(rest) and "optimizer" not in rest


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list | tuple) else []
    return [t for v in values for t in _tensors(v)]


def test_predict_on_png_files_matches_the_tensor_pipeline(trained, tmp_path, capsys):
    model, meta, state = load_model(trained)
    cfg = config.from_dict(state["config"])
    from reslab.data import load_dataset, make_loaders

    data = load_dataset(cfg.data)
    _, test = make_loaders(data, cfg.data, 1, 20, 0, torch.device("cpu"))
    x, y = next(iter(test))
    with torch.no_grad():
        expected = model(x).argmax(1)
    files = []
    for i in range(20):
        f = tmp_path / f"img{i}.png"
        Image.fromarray(data.test_images[i, 0].numpy()).save(f)
        files.append(str(f))
    results = predict(trained, files, top_k=3)
    got = [meta["classes"].index(r["top"][0]["class"]) for r in results]
    assert got == expected.tolist()
    assert (torch.tensor(got) == y).float().mean() >= 0.6  # a trained model names the true class
    assert all(
        len(r["top"]) == 3 and r["top"][0]["probability"] >= r["top"][1]["probability"] for r in results
    )
    assert main(["predict", str(trained), *files[:2], "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(files[0])


def test_predict_classifies_many_files_in_the_runs_evaluation_batches(trained, tmp_path, monkeypatch, capsys):
    """All the files went through the model as one batch: ten thousand photos at 96 pixels would not fit. The
    command printed nothing until the last was classified; it prints each batch's rows as it is done."""
    from reslab import report

    images = []
    for i in range(20):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (28, 28), np.uint8)).save(images[-1])
    whole = predict(trained, images, top_k=3)
    seen, read, logits = [], config.from_dict, report.predict_logits

    def small(d):
        cfg = read(d)
        cfg.train.eval_batch_size = 8
        return cfg

    monkeypatch.setattr(config, "from_dict", small)
    monkeypatch.setattr(
        report, "predict_logits", lambda model, x, *a: seen.append(len(x)) or logits(model, x, *a)
    )
    parts = predict(trained, images, top_k=3)
    assert seen == [8, 8, 4]
    for a, b in zip(whole, parts):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx(
            [t["probability"] for t in b["top"]], abs=1e-5
        )
    printed = []  # the table's rows out before each batch is classified
    monkeypatch.setattr(
        report,
        "predict_logits",
        lambda model, x, *a: (
            printed.append(len(capsys.readouterr().out.splitlines())) or logits(model, x, *a)
        ),
    )
    assert main(["predict", str(trained), *map(str, images), "--top-k", "3"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert printed == [0, 8, 8] and len(rows) == 4
    assert rows[-1].split()[:2] == [str(images[-1]), parts[-1]["top"][0]["class"].split()[0]]


def test_the_python_api_takes_one_image_file_and_refuses_what_the_cli_cannot_pass(trained, tmp_path):
    # a path for images was read as its characters ("/ is a directory"); an empty list failed inside numpy; a
    # negative limit scored all but the last images; an unknown format was reported as a suffix's contradiction
    f = tmp_path / "one.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(f)
    assert predict(trained, str(f)) == predict(trained, [f])
    with pytest.raises(ReslabError, match="^predict: no image files given$"):
        predict(trained, [])
    for limit in (-3, 0, "5"):
        with pytest.raises(ReslabError, match="^--limit must be a positive integer"):
            evaluate_checkpoint(trained, limit=limit)
        with pytest.raises(ReslabError, match="^--batch-size must be a positive integer"):
            evaluate_checkpoint(trained, batch_size=limit)
    with pytest.raises(ReslabError, match="^--format: expected one of onnx, pt2, torchscript, got 'xyz'$"):
        export(trained, "xyz", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == [f]


@pytest.mark.parametrize(
    "make,error",
    [
        (lambda p: p.write_bytes(b"this is not an image"), "not an image"),
        (lambda p: p.write_bytes(b""), "not an image"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "not an image|broken image"),
        (lambda p: p.mkdir(), "bad.png is a directory; name the image files"),
    ],
)
def test_bad_image_files_give_one_clear_error(trained, tmp_path, capsys, make, error):
    bad = tmp_path / "bad.png"
    make(bad)
    assert main(["predict", str(trained), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.png" in err
    import re

    assert re.search(error, err)


def test_a_plot_in_a_format_matplotlib_cannot_write_is_one_line(trained, tmp_path, capsys):
    """`runs --plot notes.txt` and `--plot runs.pgf` without LaTeX were matplotlib's tracebacks (found by an ad hoc
    fuzz of the command line); a suffix names the format, in any case."""
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    assert main(["runs", str(trained), "--plot", str(notes)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(
        "reslab: error: --plot notes.txt: matplotlib cannot write .txt pictures; "
    )
    assert ".pdf, " in err and len(err.splitlines()) == 1 and notes.read_text() == "keep me"
    assert main(["runs", str(trained), "--plot", str(tmp_path / "runs.PDF")]) == 0
    assert (tmp_path / "runs.PDF").read_bytes()[:5] == b"%PDF-"
    if not shutil.which(matplotlib.rcParams["pgf.texsystem"]):
        assert main(["runs", str(trained), "--plot", str(tmp_path / "runs.pgf")]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"reslab: error: cannot write {tmp_path / 'runs.pgf'}: ")
            and len(err.splitlines()) == 1
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "runs.PDF"]


def test_outputs_that_cannot_be_written_and_counts_out_of_range_are_one_line(trained, tmp_path, capsys):
    note, empty = tmp_path / "note.txt", tmp_path / "empty"
    note.write_text("keep me")
    empty.mkdir()
    cases = [
        (["eval", str(trained), "--limit", "8", "--out", str(note)], "note.txt is a file, not a directory"),
        (["export", str(trained), "--out", str(note / "m.onnx")], "note.txt is a file, not a directory"),
        (["export", str(trained), "--out", str(tmp_path)], "is a directory; name the file to write"),
        (
            ["export", str(trained), "--out", str(tmp_path / "m.onxx")],
            "cannot tell the format from the suffix",
        ),
        (["study", "units", "--out", str(note / "u")], "cannot create directory"),
        (["eval", str(trained), "--limit", "0"], "--limit must be a positive integer, got 0"),
        (["eval", str(trained), "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["eval", str(trained), "--split", "val"], "held out no training images (its data.val is 0)"),
        (
            ["export", str(trained), "--out", str(tmp_path / "m.onnx"), "--format", "pt2"],
            "--out m.onnx names onnx by its suffix, but --format asks for pt2",
        ),
        (
            ["eval", str(empty)],
            f"{empty} holds no best.pt or last.pt: not a run directory, or none saved yet",
        ),
        (["predict", str(empty), "x.png"], f"{empty} holds no best.pt or last.pt"),
        (["export", str(empty), "--out", str(tmp_path / "e.onnx")], f"{empty} holds no best.pt or last.pt"),
        (["predict", str(trained), "x.png", "--top-k", "0"], "--top-k must be a positive integer, got 0"),
        (["study", "units", "--seeds", "0"], "--seeds must be a positive integer, got 0"),
        (["study", "degradation", "--draws", "0"], "--draws must be a positive integer, got 0"),
        (["study", "units", "--recalibrate", "-1"], "--recalibrate must be a positive integer, got -1"),
        (["bench", "--seed-limit", "10"], "--seed-limit 10: the seed recipe needs at least one batch (256"),
        (["bench", "--seed-limit", "60001"], "--seed-limit 60001: Fashion-MNIST has 60,000 training images"),
        (["bench", "--quick", "--out", str(note / "b.json")], "note.txt is a file, not a directory"),
        (["bench", "--quick", "--out", str(tmp_path)], "is a directory; name the file to write"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert note.read_text() == "keep me" and not (tmp_path / "m.onxx").exists()
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_eval_on_cuda_without_a_gpu_is_one_line(trained, capsys):
    assert main(["eval", str(trained), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU is visible" in err, err


@pytest.mark.parametrize("side", [20000, 8000])
def test_huge_image_is_refused_and_nothing_else_said(tmp_path, side):
    """A PNG header: PIL sees the size before decoding anything. Of 8000 x 8000 (64 M pixels, under twice its
    limit) PIL only warns, and its DecompressionBombWarning printed two lines of its own before reslab's one."""
    path = tmp_path / "huge.png"
    Image.new("1", (side, side)).save(path)
    with warnings.catch_warnings(record=True) as said, pytest.raises(ReslabError, match="too large"):
        warnings.simplefilter("always")
        read_image(path, 1, 28)
    assert not said


@pytest.mark.parametrize("first", [True, False])
def test_a_huge_image_in_a_folder_is_one_line(tmp_path, capsys, first):
    """PIL refuses a header of more than twice its pixel limit when it opens the file, before reslab's own check:
    the folder's first image (its size sets the side) and the scan for colour images let that error through as a
    traceback (an ad hoc fuzz of folder datasets found it)."""
    from reslab.data.folder import describe

    images, _ = make_images(8, 0)
    for i, img in enumerate(images):
        (tmp_path / "pics" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "pics" / f"c{i % 2}" / f"{i}.png")
    huge = tmp_path / "pics" / "c0" / ("0.png" if first else "6.png")
    Image.new("1", (20000, 20000)).save(huge)
    out = tmp_path / "run"
    argv = [
        "train",
        "--quiet",
        "--out",
        str(out),
        "--set",
        "data.name=folder",
        f"data.root={tmp_path / 'pics'}",
    ]
    assert main([*argv, "data.split=0.25", "model.name=resnet8", "train.epochs=1", "precision=fp32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{huge}: too large" in err, err
    assert not out.exists()
    # `reslab summary --config` reads headers: the first image's, and the others' modes until one is colour
    if first:
        with pytest.raises(ReslabError, match="too large"):
            describe(str(tmp_path / "pics"), 0.25, None)
    else:
        assert describe(str(tmp_path / "pics"), 0.25, None) == (1, 28, 2)


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "I;16", "P", "RGB", "LA"])
def test_image_modes_are_converted(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).convert(mode)
    img.save(tmp_path / "x.tiff" if mode in ("CMYK", "I;16") else tmp_path / "x.png")
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    arr = read_image(path, 1, 28)
    assert arr.shape == (28, 28) and arr.dtype == np.uint8
    assert read_image(path, 3, 28).shape == (28, 28, 3)
    assert np.array_equal(read_image(path, 1, 28, invert=True), 255 - arr)


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("L", (28, 28), v) for v in (200, 10, 90)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert abs(int(read_image(tmp_path / "a.gif", 1, 28).mean()) - 200) <= 2


def exported_is_refused(path: Path, kind: str, capsys) -> None:
    """eval, predict and export of an exported model: one line, not torch.load's warning and "corrupt?" (found by an
    ad hoc fuzz of the command line)."""
    says = (
        f"{path}: a model exported as {kind} (reslab export), not a reslab checkpoint: give the run directory"
    )
    for argv in (
        ["eval", str(path), "--device", "cpu"],
        ["predict", str(path), "x.png"],
        ["export", str(path), "--out", str(path.parent / "o.onnx")],
    ):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"reslab: error: {says}, or its best.pt or last.pt\n"


def test_every_export_format_matches_pytorch_and_is_not_taken_for_a_checkpoint(trained, tmp_path, capsys):
    model, meta, _ = load_model(trained)
    # batch 5: not the traced 2
    x = torch.randn(5, meta["in_channels"], meta["image_size"], meta["image_size"])
    with torch.no_grad():
        reference = model(x).numpy()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scripted = export(trained, None, tmp_path / "m.pt")  # the suffix chooses TorchScript
            assert not [w for w in caught if "torch.jit" in str(w.message)]  # the CLI notes it once instead
            ts = torch.jit.load(str(scripted))
        assert np.abs(ts(x).numpy() - reference).max() < 1e-4
        program = torch.export.load(export(trained, None, tmp_path / "m.pt2"))  # and a torch.export program
        assert np.abs(program.module()(x).numpy() - reference).max() < 1e-4
    exported_is_refused(tmp_path / "m.pt", "TorchScript", capsys)
    exported_is_refused(tmp_path / "m.pt2", "torch.export (.pt2)", capsys)
    ort = pytest.importorskip("onnxruntime")
    path = export(trained, None, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.abs(logits - reference).max() < 1e-4
    exported_is_refused(path, "ONNX", capsys)
    assert not (tmp_path / "o.onnx").exists()


def test_failed_export_leaves_the_previous_file(trained, tmp_path, monkeypatch, capsys):
    """The exported bytes go to a temporary file renamed over --out: a write that fails half way (a full disk)
    is one line, and the file already there stays whole."""
    target = tmp_path / "m.pt"
    target.write_bytes(b"previous model")
    real = files.atomic_write

    def half_then_full(f, data=b"x" * 99):
        f.write(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "atomic_write", lambda path, write: real(path, half_then_full))
    assert main(["export", str(trained), "--out", str(target)]) == 2
    assert capsys.readouterr().err.strip() == f"reslab: error: cannot write {target}: No space left on device"
    assert target.read_bytes() == b"previous model" and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_cli_export_notes_that_torchscript_is_deprecated(trained, tmp_path, capsys):
    for name, noted in (("m.ts", True), ("m.pt2", False)):
        assert main(["export", str(trained), "--out", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"wrote {tmp_path / name}\n")
        assert ("note: PyTorch deprecates TorchScript; a .pt2 file" in out) == noted


def test_cli_onnx_export_says_one_line(trained, tmp_path, capfd):
    """torch's exporter prints its progress and warns of operators and calls of its own; none of it reaches
    the user, whose terminal shows the one line that names the file."""
    pytest.importorskip("onnx")
    assert main(["export", str(trained), "--out", str(tmp_path / "m.onnx")]) == 0
    out, err = capfd.readouterr()
    assert (out, err) == (f"wrote {tmp_path / 'm.onnx'}\n", "")


def test_folder_dataset_round_trip(tmp_path):
    images, labels = make_images(120, 0)
    names = ["alpha", "beta", "gamma"]
    for split, sl in (("train", slice(0, 90)), ("test", slice(90, 120))):
        for i, (img, lab) in enumerate(zip(images[sl], labels[sl] % 3)):
            d = tmp_path / "pics" / split / names[lab]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).convert("RGB").save(d / f"{i}.png")
    overrides = [
        "data.name=folder",
        f"data.root={tmp_path / 'pics'}",
        "model.name=resnet8",
        "train.epochs=1",
        "train.batch_size=30",
        "precision=fp32",
        "device=cpu",
    ]
    summary = fit(config.load(None, overrides), tmp_path / "run", quiet=True)
    assert summary["epochs"] == 1
    model, meta, _ = load_model(tmp_path / "run")
    assert meta["classes"] == names and meta["in_channels"] == 3
    # normalised by the run's own statistics, which a folder's training images give: a --limit on them changed
    # them, and so every figure, when it cut the training images too
    whole, limited = evaluate_checkpoint(tmp_path / "run"), evaluate_checkpoint(tmp_path / "run", limit=30)
    assert limited["test_images"] == 30 and limited["test_loss"] == whole["test_loss"]
    # a test-set report reads no training image (10 of the 14 s of 70,000 PNG files), and scores as the run did
    from reslab.data import load_dataset

    assert whole["test_acc"] == summary["test_acc"]
    data = config.load(None, overrides).data
    test_only, both = load_dataset(data, train_images=False), load_dataset(data)
    assert len(test_only.train_images) == 0 and torch.equal(test_only.test_images, both.test_images)
    trained_on = evaluate_checkpoint(tmp_path / "run", split="train", limit=20)
    assert trained_on["split"] == "train" and trained_on["train_images"] == 20
    assert "test_acc" not in trained_on
    # another folder of as many classes, but others: its labels would be scored against the wrong names
    for split in ("train", "test"):
        (tmp_path / "pics" / split / "gamma").rename(tmp_path / "pics" / split / "delta")
    with pytest.raises(
        ReslabError, match=r"predicts 3 classes \(alpha, beta, gamma\); .* \(alpha, beta, delta\)"
    ):
        evaluate_checkpoint(tmp_path / "run")
    # a flat folder with a held-out fraction
    flat = tmp_path / "flat"
    for i, (img, lab) in enumerate(zip(images[:40], labels[:40] % 2)):
        (flat / names[lab]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(flat / names[lab] / f"{i}.png")
    from reslab.config import DataConfig

    data = load_dataset(DataConfig(name="folder", root=str(flat), split=0.25))
    assert len(data.train_labels) + len(data.test_labels) == 40 and data.in_channels == 1
    assert 8 <= len(data.test_labels) <= 12


def test_a_folder_is_colour_when_any_image_is(tmp_path):
    """The first image alone decided the channels: a gray first image turned every colour image gray, a float
    TIFF (mode F, one gray band) counted as colour, and an unreadable first image ended in a traceback."""
    from reslab.data.folder import load_folder

    images, _ = make_images(8, 0)
    for i, img in enumerate(images):
        d = tmp_path / "pics" / ("train" if i < 6 else "test") / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        if i == 0:  # train/c0/0.tiff: the first image
            Image.fromarray(img.astype(np.float32), "F").save(d / "0.tiff")
        else:
            Image.fromarray(img).save(d / f"{i}.png")
    assert load_folder(str(tmp_path / "pics"), 0.0, None).train_images.ndim == 3  # gray: N, H, W
    rgb = np.stack([images[7]] * 3, -1)
    Image.fromarray(rgb).save(tmp_path / "pics" / "test" / "c1" / "9.png")  # one RGB image, the last one read
    colour = load_folder(str(tmp_path / "pics"), 0.0, None)
    assert colour.train_images.shape[1] == 3 and colour.test_images.shape[1] == 3
    assert (colour.test_images[-1] == rgb.transpose(2, 0, 1)).all()
    # each image is decoded once, as it is: a gray one in RGB data has its band three times, as PIL converts it
    assert (colour.test_images[0] == np.stack([images[6]] * 3)).all()
    # the colour image among the training images: a test-set report, which decodes none of them, is RGB too
    (tmp_path / "pics" / "test" / "c1" / "9.png").rename(tmp_path / "pics" / "train" / "c1" / "9.png")
    whole = load_folder(str(tmp_path / "pics"), 0.0, None)
    test_only = load_folder(str(tmp_path / "pics"), 0.0, None, train_images=False)
    assert whole.test_images.shape[1] == 3 and (test_only.test_images == whole.test_images).all()
    assert test_only.train_images.shape == (0, *whole.test_images.shape[1:])
    (tmp_path / "pics" / "train" / "c0" / "0.tiff").write_bytes(b"not a tiff")
    with pytest.raises(ReslabError, match=r"0.tiff: not an image PIL can read"):
        load_folder(str(tmp_path / "pics"), 0.0, None)


def test_a_folders_hidden_and_empty_class_folders(tmp_path):
    """Jupyter's .ipynb_checkpoints beside the class folders was a class, as was an empty folder: a run of 2
    classes of images predicted 4, two of them never seen. A zip made on a Mac adds __MACOSX/ and ._name.png
    files, which are not images."""
    from reslab.data.folder import load_folder

    images, _ = make_images(8, 0)
    for i, img in enumerate(images):
        (tmp_path / "pics" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "pics" / f"c{i % 2}" / f"{i}.png")
    (tmp_path / "pics" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "pics" / "__MACOSX" / "c0").mkdir(parents=True)  # a zip made on a Mac, unpacked
    (tmp_path / "pics" / "__MACOSX" / "c0" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (tmp_path / "pics" / "c0" / "._0.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    folder = load_folder(str(tmp_path / "pics"), 0.25, None)
    assert folder.classes == ("c0", "c1") and len(folder.train_labels) + len(folder.test_labels) == 8
    (tmp_path / "pics" / "c2").mkdir()
    with pytest.raises(ReslabError, match=r"pics: class folder c2 holds no training images \(.bmp, "):
        load_folder(str(tmp_path / "pics"), 0.25, None)


def test_a_folder_of_images_with_a_constant_channel_trains(tmp_path):
    """Red shapes on black as RGB: green and blue are 0 everywhere. Their std was 0, and normalising divided
    by it: every input NaN, and the divergence guard blamed the learning rate."""
    from reslab.data import load_dataset

    images, labels = make_images(96, 0)
    for split, sl in (("train", slice(0, 64)), ("test", slice(64, 96))):
        for i, (img, lab) in enumerate(zip(images[sl], labels[sl] % 2)):
            d = tmp_path / "pics" / split / f"c{lab}"
            d.mkdir(parents=True, exist_ok=True)
            rgb = np.zeros((*img.shape, 3), np.uint8)
            rgb[..., 0] = img
            Image.fromarray(rgb).save(d / f"{i}.png")
    overrides = ["data.name=folder", f"data.root={tmp_path / 'pics'}", "model.name=resnet8", "train.epochs=1"]
    cfg = config.load(None, [*overrides, "train.batch_size=32", "precision=fp32", "device=cpu"])
    data = load_dataset(cfg.data)
    assert data.std[1:] == (1.0, 1.0) and 0 < data.std[0] < 1
    summary = fit(cfg, tmp_path / "run", quiet=True)
    assert np.isfinite(summary["train_loss"]) and not summary["guard_events"]


def test_cli_eval_and_models_from_a_fresh_process(trained, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "reslab", "eval", str(trained), "--out", str(tmp_path / "e")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "test acc" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "reslab", "summary", "d2l-resnet18", "--input", "1,1,224,224"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "(1, 512, 7, 7)" in done.stdout and "11,178,378" in done.stdout


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`reslab models | head -1`: the pipe closes before reslab writes; it stops quietly with 141 (SIGPIPE)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "reslab", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child.stdout.close()  # before the child has imported torch, so its first write finds no reader
    err = child.stderr.read().decode()
    assert child.wait() == 141 and err == ""


def test_a_figure_that_fails_halfway_leaves_the_old_picture(tmp_path):
    """A full disk halfway through a picture (curves.png mid-run, eval's confusion.png, runs --plot) is one line,
    the old picture whole and the figure closed; before, `reslab eval --out` on a full tmpfs ended in a traceback."""
    import matplotlib.pyplot as plt

    from reslab import plots

    def half_then_full(f, **kwargs):
        f.write(b"half a png")
        raise OSError(28, "No space left on device")

    path = tmp_path / "curves.png"
    plots.curves([{"epoch": 1, "train_loss": 1.0, "test_loss": 0.9, "train_acc": 0.5, "test_acc": 0.6}], path)
    old = path.read_bytes()
    assert old.startswith(b"\x89PNG")
    fig = plt.figure()
    fig.savefig = half_then_full
    with pytest.raises(ReslabError, match=f"^cannot write {path}: No space left on device$"):
        plots.save(fig, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    assert not plt.fignum_exists(fig.number)


def test_runs_lists_each_run_directory_with_its_state(trained, tmp_path, capsys, monkeypatch):
    """`reslab runs` reads the text files of every run directory under a folder: one finished, one stopped
    before its planned epochs, one training now (its lock held), one whose config cannot be read."""
    import shutil

    summary = json.loads((trained / "summary.json").read_text())
    shutil.copytree(trained, tmp_path / "runs" / "done")
    stopped = shutil.copytree(trained, tmp_path / "runs" / "deeper" / "stopped")
    text = (stopped / "config.yaml").read_text()
    assert "init: null" in text
    (stopped / "config.yaml").write_text(
        text.replace("epochs: ", "epochs: 1").replace("init: null", "init: r0")
    )
    history = read_history(stopped)
    for h in history:  # its first epoch shared the CPU with another process; its threads alone waited 1%
        h["cpu_wait"] = 0.5 if h["epoch"] == 1 else 0.01
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "config.yaml").write_text("train: [unclosed")
    (tmp_path / "runs" / "listed").mkdir()
    (tmp_path / "runs" / "listed" / "config.yaml").write_text("- 1\n")
    # its config.yaml deleted by hand: --resume reads the config from last.pt, so the run is still listed
    orphan = tmp_path / "runs" / "orphan"
    orphan.mkdir()
    shutil.copy(trained / "last.pt", orphan / "last.pt")
    with lock_dir(tmp_path / "runs" / "done"):
        assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
        rows = {Path(r["run"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rows["done"]["state"] == f"training (pid {os.getpid()})"
    with lock_dir(stopped):  # a run training now with epochs to go says roughly how long they take
        assert main(["runs", str(stopped), "--json"]) == 0
        (row,) = json.loads(capsys.readouterr().out)
    seconds = statistics.median(h["epoch_seconds"] for h in history[-5:]) * (
        row["planned_epochs"] - len(history)
    )
    assert row["state"] == f"training (pid {os.getpid()}, {duration(seconds)} to go)"
    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    rows = {Path(r["run"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == ["broken", "done", "listed", "orphan", "stopped"]
    assert rows["orphan"]["state"] == "no config.yaml; --resume continues it from last.pt"
    assert rows["listed"]["state"] == "unreadable (config.yaml is not a mapping)"
    done = rows["done"]
    assert done["state"] == "finished" and done["epochs"] == done["planned_epochs"] == summary["epochs"]
    assert done["test_acc"] == summary["test_acc"] and done["best_test_acc"] == summary["best_test_acc"]
    assert rows["stopped"]["state"] == "stopped; --resume continues it"
    assert rows["stopped"]["planned_epochs"] > rows["stopped"]["epochs"]
    assert rows["stopped"]["init"] == "r0" and rows["done"]["init"] is None
    assert rows["stopped"]["crowded_epochs"] == 1
    assert rows["broken"]["state"].startswith("unreadable")
    # the listing reads text files only, so a fresh process lists every kind of run and draws them without
    # importing torch (--plot imported it for the atomic write, 1.2 s of its 2.4 s)
    listed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom reslab.cli import _main\nassert _main(['runs', sys.argv[1]]) == 0\n"
            "assert _main(['runs', sys.argv[1], '--seeds', '--plot', sys.argv[2]]) == 0\n"
            "print('torch' in sys.modules)",
            str(tmp_path / "runs"),
            str(tmp_path / "seeds.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0 and "| finished |" in listed.stdout
    assert listed.stdout.splitlines()[-1] == "False"
    assert main(["runs", str(trained)]) == 0  # a run directory itself: one row of a table
    lines = capsys.readouterr().out.splitlines()
    assert (
        len(lines) == 3 and lines[2].startswith(f"| {trained} |  | resnet8 |") and "| finished |" in lines[2]
    )
    assert main(["runs", str(stopped)]) == 0
    assert (
        f"| {stopped} |  | resnet8 from r0 |" in (out := capsys.readouterr().out)
        and "(CPU shared in 1 epoch) |" in out
    )
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"reslab: error: {tmp_path / 'nowhere'}: no such directory\n"
    assert main(["runs", str(tmp_path / "runs"), "--plot", str(tmp_path / "figs" / "cmp.png")]) == 0
    assert (tmp_path / "figs" / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["runs", str(tmp_path / "runs" / "broken"), "--plot", str(tmp_path / "none.png")]) == 2
    assert "no run has a finished epoch" in capsys.readouterr().err
    assert main(["runs", str(tmp_path / "runs"), "--plot", str(tmp_path)]) == 2
    assert f"--plot {tmp_path} is a directory; name the file to write, e.g." in capsys.readouterr().err
    (tmp_path / "new").mkdir()
    # before the first run there is no runs/: a plain answer, not an error
    monkeypatch.chdir(tmp_path / "new")
    assert main(["runs"]) == 0 and capsys.readouterr().out == "no run directories under runs (not made yet)\n"


def test_runs_by_seed_quote_a_recipe_over_its_seeds(tiny_data, tmp_path, capsys):
    """`reslab runs --seeds`: runs whose configs differ in their seed alone are one row, with the settings that set
    it apart and the median and range over the seeds of the last test accuracy; a seed run twice counts once, a
    run from before a key existed compares as its default, another learning rate is a row of its own, an
    unreadable run stays one."""
    import shutil

    runs, accs = tmp_path / "runs", {}
    for name, extra in (("s0", {}), ("s1", {"seed": 1}), ("s2", {"seed": 2}), ("lr", {"optim.lr": 0.1})):
        accs[name] = fit(config.load(None, tiny_overrides(tiny_data, **extra)), runs / name, quiet=True)[
            "test_acc"
        ]
    assert len({accs["s0"], accs["s1"], accs["s2"]}) == 3  # the seeds learned differently
    again = shutil.copytree(runs / "s0", runs / "s0-again")  # seed 0 again: the same bits on the CPU
    text = (again / "config.yaml").read_text()
    assert "  val: 0\n" in text
    (again / "config.yaml").write_text(text.replace("  val: 0\n", ""))  # as a run before data.val wrote it
    (runs / "broken").mkdir()
    (runs / "broken" / "config.yaml").write_text("train: [unclosed")
    capsys.readouterr()
    assert main(["runs", str(runs), "--seeds", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    names = [str(runs / "broken"), str(runs / "lr"), f"{runs}/s{{0,0-again,1,2}}"]
    assert [g["run"] for g in groups] == names
    assert groups[0]["state"].startswith("unreadable") and "seeds" not in groups[0]
    lr, seeds = groups[1], groups[2]
    assert lr["seeds"] == [0] and lr["test_acc"] == accs["lr"] and lr["test_acc_min"] == accs["lr"]
    # what sets them apart, as --set names it
    assert lr["settings"] == {"optim.lr": 0.1} and seeds["settings"] == {"optim.lr": 0.05}
    assert seeds["seeds"] == [0, 0, 1, 2] and seeds["finished"] == 4 and seeds["finished_seeds"] == 3
    three = [accs["s0"], accs["s1"], accs["s2"]]
    assert seeds["test_acc"] == statistics.median(three)
    assert (seeds["test_acc_min"], seeds["test_acc_max"]) == (min(three), max(three))
    assert seeds["state"] == "4 finished" and seeds["epochs"] == seeds["planned_epochs"] == 2
    assert main(["runs", str(runs), "--seeds"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| runs | settings | seeds | model | epochs | test acc (median) | range |")
    assert len(lines) == 5 and lines[3].startswith(f"| {runs / 'lr'} | optim.lr=0.1 | 0 | resnet8 | 2/2 |")
    median, spread = f"{statistics.median(three):.4f}", f"{min(three):.4f}-{max(three):.4f}"
    row = f"| {runs}/s{{0,0-again,1,2}} | optim.lr=0.05 | 0 (2 runs), 1, 2 | resnet8 | 2/2 | {median} | {spread} |"
    assert lines[4].startswith(row)
    assert lines[4].endswith("| 4 finished |")
    # a figure: each group's median per epoch, shaded from its lowest run to its highest
    assert main(["runs", str(runs), "--seeds", "--plot", str(tmp_path / "seeds.png")]) == 0
    assert (tmp_path / "seeds.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    # one row a run: what sets each apart, its seed too
    assert main(["runs", str(runs)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    settings = [row.split(" | ")[1] for row in rows if "resnet8" in row]
    assert settings == ["optim.lr=0.1 seed=0", *(f"optim.lr=0.05 seed={s}" for s in (0, 0, 1, 2))]
    # a run whose metrics cannot be read is a row that says so, and no line of the figure
    garbled = shutil.copytree(runs / "s1", tmp_path / "more" / "garbled")
    with open(garbled / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    shutil.copytree(runs / "s2", tmp_path / "more" / "s2")
    for seeds in ([], ["--seeds"]):
        assert main(["runs", str(tmp_path / "more"), *seeds, "--plot", str(tmp_path / "more.png")]) == 0
        assert f"| {garbled} |" in (out := capsys.readouterr().out) and "| unreadable (" in out


def test_runs_list_hand_edited_files_in_their_rows_without_a_traceback(trained, tmp_path, capsys):
    """A metrics.jsonl or config.yaml edited by hand (found by an ad hoc fuzz of `reslab runs`: a renamed key
    raised KeyError, a list as the seed TypeError; an epoch out of its place) is a row that says what is wrong, or
    is listed as it is."""
    import shutil

    runs = tmp_path / "runs"
    edits = {
        "metrics.jsonl": {
            "renamed": ('"epoch_seconds"', '"epoch_secs"', "line 1: lacks epoch_seconds"),
            "half-test": ('"test_loss"', '"tst_loss"', "line 1: lacks test_loss"),
            "text": ('"test_acc": ', '"test_acc": "x", "was": ', "line 1: test_acc not a finite number"),
            "nan": ('"test_acc": ', '"test_acc": NaN, "was": ', "line 1: test_acc not a finite number"),
            "list": ("{", "[1]\n{", "line 1: not an epoch's metrics (a JSON object)"),
            "renumbered": (
                '"epoch": 1,',
                '"epoch": 1000000000000000000000000000000,',
                "line 1: epoch 1000000000000000000000000000000, where epoch 1 comes",
            ),
        },
        "config.yaml": {
            "seed-list": ("seed: 0", "seed: [3]", None),
            "train-list": ("train:", "train: [1]\nx:", None),
        },
    }
    for name, (old, new, _) in {**edits["metrics.jsonl"], **edits["config.yaml"]}.items():
        shutil.copytree(trained, runs / name, ignore=shutil.ignore_patterns("*.pt", "*.png"))
        edited = runs / name / ("config.yaml" if name in edits["config.yaml"] else "metrics.jsonl")
        assert old in (text := edited.read_text())
        edited.write_text(text.replace(old, new, 1))
    shutil.copytree(trained, runs / "blank", ignore=shutil.ignore_patterns("*.pt", "*.png"))
    with open(runs / "blank" / "metrics.jsonl", "a") as f:
        f.write("\n\n")  # an editor's blank lines hold no epoch
    shutil.copytree(trained, runs / "binary", ignore=shutil.ignore_patterns("*.pt", "*.png"))
    with open(runs / "binary" / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\n")  # not UTF-8: the decoding error named no file
    assert read_history(runs / "blank") == read_history(trained)
    for extra in ([], ["--seeds"]):
        assert main(["runs", str(runs), "--json", *extra]) == 0
        shown = {Path(r["run"]).name: r for r in json.loads(capsys.readouterr().out) if "runs" not in r}
        for name, (_, _, said) in edits["metrics.jsonl"].items():
            assert shown[name]["state"] == f"unreadable ({runs / name / 'metrics.jsonl'}: {said})"
            with pytest.raises(ReslabError, match=re.escape(said)):
                read_history(runs / name)
        assert shown["binary"]["state"].startswith(
            f"unreadable ({runs / 'binary' / 'metrics.jsonl'}: not text ("
        )
    assert main(["runs", str(runs), "--json"]) == 0
    rows = {Path(r["run"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rows["train-list"]["planned_epochs"] is None and rows["train-list"]["model"] == "resnet8"
    assert rows["seed-list"]["settings"]["seed"] == [3] and rows["blank"]["state"] == "finished"
    assert main(["runs", str(runs), "--seeds"]) == 0
    (group,) = [line for line in capsys.readouterr().out.splitlines() if "blank" in line]
    assert group.startswith(f"| {runs}/{{blank,seed-list}} |") and "| 0, [3] | resnet8 |" in group


def test_what_sets_configs_apart_counts_a_key_one_of_them_lacks():
    from reslab.runs import apart

    assert apart([{"a": 1, "b": 2}, {"a": 1, "b": 3}]) == [{"b": 2}, {"b": 3}]
    # a config without key `c` (another model's options): `c` sets the other apart, whatever its value
    assert apart([{"a": 1, "c": "?"}, {"a": 1}]) == [{"c": "?"}, {}]


def test_a_band_is_the_median_and_range_of_the_runs_at_each_epoch():
    """What `reslab runs --seeds --plot` draws for a group: at each epoch, over the runs with a value there (an
    untested epoch has none; a run still training has fewer epochs)."""
    from reslab.plots import band

    runs = [
        [{"epoch": 1, "v": 1.0}, {"epoch": 2, "v": 4.0}],
        [{"epoch": 1, "v": 3.0}, {"epoch": 2}],
        [{"epoch": 1, "v": 2.0}],
    ]
    assert band(runs, lambda h: h.get("v")) == ([1, 2], [2.0, 4.0], [1.0, 4.0], [3.0, 4.0])


def test_slim_checkpoint_evaluates_as_the_run_did(tiny_data, tmp_path):
    """benchmarks/slim_checkpoint.py (how gpu_check.sh carries a big run home) keeps the weights the run evaluated,
    the EMA's, and drops what only a resume needs."""
    fit(config.load(None, tiny_overrides(tiny_data, **{"train.ema": 0.9})), tmp_path / "run", quiet=True)
    last, slim = tmp_path / "run" / "last.pt", tmp_path / "slim.pt"
    script = Path(__file__).parents[1] / "benchmarks" / "slim_checkpoint.py"
    done = subprocess.run([sys.executable, str(script), str(last), str(slim)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert slim.stat().st_size < last.stat().st_size / 2
    full, kept = evaluate_checkpoint(last), evaluate_checkpoint(slim)
    assert (kept["test_acc"], kept["test_loss"]) == (full["test_acc"], full["test_loss"])
    ema, weights = checkpoint.load(last)["ema"], checkpoint.load(slim)["model"]
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
