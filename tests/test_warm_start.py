"""model.init: a run that starts from another run's weights (engine/warm_start.py)."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from reslab import config
from reslab.cli import main
from reslab.engine import checkpoint, fit, prepare
from reslab.engine.warm_start import adapt_channels, warm_start
from reslab.errors import ReslabError
from reslab.models import build_model


def source_checkpoint(path, name="resnet8", channels=1, classes=10, ema=False, **options):
    """A checkpoint of a model whose every tensor (running statistics too) is random, so that nothing
    matches a fresh model by chance."""
    torch.manual_seed(1)
    model = build_model(name, channels, classes, **options)
    weights = {k: torch.randn(v.shape).to(v.dtype) for k, v in model.state_dict().items()}
    state = {"model": weights, "meta": {"model_name": name, "classes": [str(i) for i in range(classes)]}}
    if ema:
        state["ema"] = {k: v + 1 for k, v in weights.items()}
    checkpoint.save(state, path)
    return state


def test_every_tensor_comes_from_the_source_and_a_classifier_for_other_classes_starts_fresh(tmp_path):
    src = source_checkpoint(tmp_path / "a.pt")["model"]
    model = build_model("resnet8", 1, 4)
    fresh_fc = model.fc.weight.detach().clone()
    line = warm_start(model, tmp_path / "a.pt")
    own = model.state_dict()
    assert [k for k in own if not torch.equal(own[k], src[k])] == ["fc.weight", "fc.bias"]
    assert torch.equal(model.fc.weight, fresh_fc)
    assert "new classifier fc.weight, fc.bias (10 -> 4 classes)" in line and "42 of 44 tensors" in line


def test_a_grayscale_stem_adapts_to_rgb_and_back_and_sees_a_gray_image_alike(tmp_path):
    src = source_checkpoint(tmp_path / "gray.pt")["model"]
    rgb = build_model("resnet8", 3, 10)
    line = warm_start(rgb, tmp_path / "gray.pt")
    assert "adapted stem.0.weight (1 -> 3 input channels)" in line
    gray = torch.randn(2, 1, 28, 28)
    a = F.conv2d(gray, src["stem.0.weight"], padding=1)
    b = F.conv2d(gray.expand(-1, 3, -1, -1), rgb.stem[0].weight, padding=1)
    torch.testing.assert_close(a, b)
    back = adapt_channels(rgb.stem[0].weight, 1)
    torch.testing.assert_close(back, src["stem.0.weight"])
    with pytest.raises(ReslabError, match="from 3 to 4 input channels"):
        adapt_channels(rgb.stem[0].weight, 4)


def test_the_ema_weights_are_the_ones_taken(tmp_path):
    state = source_checkpoint(tmp_path / "a.pt", ema=True)
    model = build_model("resnet8", 1, 10)
    warm_start(model, tmp_path / "a.pt")
    assert all(torch.equal(v, state["ema"][k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("resnet14", {}, r"\(resnet14\) is another architecture: \d+ tensors are not in this model"),
        ("resnet8", {"width": 32}, r"stem.0.weight is \(32, 1, 3, 3\) there, \(16, 1, 3, 3\) here"),
        (
            "d2l-resnet18",
            {},
            r"\(d2l-resnet18\) is another architecture: \d+ tensors are not in the checkpoint \(first: stem.0.weight\)",
        ),
    ],
)
def test_another_architecture_is_refused(tmp_path, name, options, message):
    source_checkpoint(tmp_path / "a.pt", name, **options)
    with pytest.raises(ReslabError, match=message):
        warm_start(build_model("resnet8", 1, 10), tmp_path / "a.pt")


def test_weights_that_are_not_tensors_are_refused(tmp_path):
    checkpoint.save({"model": {"stem.0.weight": 3}}, tmp_path / "odd.pt")
    with pytest.raises(
        ReslabError, match="damaged, or not written by reslab: model: not a mapping of names to tensors"
    ):
        warm_start(build_model("resnet8", 1, 10), tmp_path / "odd.pt")


def test_a_run_starts_from_init_and_a_resume_does_not_read_it_again(tiny_data, tmp_path, capsys):
    first = tmp_path / "first"
    fit(config.load(None, tiny_overrides(tiny_data, **{"train.epochs": 1})), first, quiet=True)
    cfg = config.load(None, tiny_overrides(tiny_data, **{"train.epochs": 1, "model.init": str(first)}))
    run = prepare(cfg, tmp_path / "unused")
    best = checkpoint.load(first / "best.pt")["model"]
    assert all(torch.equal(v, best[k]) for k, v in run.model.state_dict().items())
    assert run.init.startswith(f"weights from {first / 'best.pt'} (resnet8): 44 of 44 tensors")

    second = tmp_path / "second"
    fit(cfg, second, quiet=True)
    assert "weights from" in capsys.readouterr().out
    shutil.rmtree(first)  # a resume goes on from its own checkpoint, whatever became of the source
    cfg.train.epochs = 2
    summary = fit(cfg, second, resume=True, quiet=True)
    assert summary["epochs"] == 2 and "weights from" not in capsys.readouterr().out
    cfg.train.epochs, cfg.model.init = 3, str(tmp_path / "elsewhere")
    fit(cfg, second, resume=True, quiet=True)
    assert "model.init starts a new run only" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "model.init: checkpoint {path} not found"),
        (b"not a checkpoint", "model.init: {path}: not a readable checkpoint (truncated or corrupt?)"),
        ("dir", "model.init: {path} holds no best.pt or last.pt: not a run directory, or none saved yet"),
    ],
    ids=["missing", "garbage", "empty-directory"],
)
def test_a_bad_source_is_one_line_and_nothing_written(tiny_data, tmp_path, capsys, content, message):
    path, out = tmp_path / "source.pt", tmp_path / "run"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert (
        main(["train", "--out", str(out), "--set", *tiny_overrides(tiny_data, **{"model.init": path})]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("reslab: error: " + message.format(path=path)) and len(err.splitlines()) == 1
    assert not out.exists()
