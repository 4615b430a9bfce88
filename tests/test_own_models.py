"""Models of your own: reslab.models.register from Python, and --import MODULE on the command line."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import crash_then_resume, tiny_overrides
from torch import nn

from reslab import config
from reslab.cli import main
from reslab.engine import checkpoint, fit
from reslab.errors import ReslabError
from reslab.models import (
    ResidualUnit,
    build_model,
    list_models,
    model_options,
    nets,
    register,
    registered_by,
    registry,
)
from reslab.runs import read_history, without_timings

MODULE = """
from torch import nn
from reslab.models import ResidualUnit, register


@register("{name}")
def tiny(in_channels: int = 1, num_classes: int = 10, width: int = 8, units: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        *[ResidualUnit(width, width) for _ in range(units)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )
"""


@pytest.fixture
def own(monkeypatch):
    """The registry, sys.path and the imported modules as they were, after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in ("mynets", "broken", "se_resnet"):
        sys.modules.pop(name, None)


def tiny(in_channels: int, num_classes: int, width: int = 8, units: int = 1) -> nn.Module:
    layers = [
        nn.Conv2d(in_channels, width, 3, padding=1),
        *[ResidualUnit(width, width) for _ in range(units)],
    ]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class Wide(nn.Module):  # a class as its own builder: its __init__'s annotations check the options
    def __init__(self, in_channels: int, num_classes: int, width: int = 4, bias: bool = True):
        super().__init__()
        self.body = tiny(in_channels, num_classes, width)
        self.bias = bias

    def forward(self, x):
        return self.body(x)


def test_register_adds_a_model_that_builds_with_checked_options(own):
    assert register("tiny", tiny) is tiny
    register("tiny-wide", tiny, width=32)  # defaults of its own
    register("wide")(Wide)  # as a decorator
    assert {"tiny", "tiny-wide", "wide"} <= set(list_models())
    assert registered_by(__name__) == ["tiny", "tiny-wide", "wide"] and "resnet20" in registered_by(
        nets.__name__
    )
    assert model_options("tiny") == {"width": 8, "units": 1}
    assert model_options("tiny-wide") == {"width": 32, "units": 1}
    assert model_options("wide") == {"width": 4, "bias": True}
    net = build_model("tiny-wide", 3, 5, units=2)
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 5) and net[-1].in_features == 32
    assert build_model("wide", 1, 10).body[-1].in_features == 4
    with pytest.raises(ReslabError, match="width: must be an integer from 1 to 2147483647, got 0"):
        build_model("tiny", width=0)
    with pytest.raises(ReslabError, match="bias: must be true or false, got 'yes'"):
        build_model("wide", bias="yes")
    with pytest.raises(ReslabError, match="colour: tiny has no such option; its options: width, units"):
        build_model("tiny", colour="red")
    register("tiny", tiny, units=3)  # again (a notebook cell run twice): the new one counts
    assert model_options("tiny")["units"] == 3


def test_register_refuses_what_would_fail_later(own):
    with pytest.raises(ReslabError, match="'resnet20' is built in"):
        register("resnet20", tiny)
    with pytest.raises(ReslabError, match="must take in_channels and num_classes"):
        register("mine", lambda channels, classes: nn.Identity())
    with pytest.raises(ReslabError, match="option 'width' needs a default"):
        register("mine", lambda in_channels, num_classes, width: nn.Identity())
    with pytest.raises(ReslabError, match="no option 'depth' to give a default"):
        register("mine", tiny, depth=3)
    with pytest.raises(ReslabError, match="non-empty string"):
        register("", tiny)
    with pytest.raises(ReslabError, match="must be a function or class"):
        register("mine", 42)
    assert "mine" not in list_models()
    register("mine", lambda in_channels, num_classes: "not a net")
    with pytest.raises(ReslabError, match="returned str, not a torch nn.Module"):
        build_model("mine")


def test_a_registered_model_trains_from_python(own, tiny_data, tmp_path):
    register("tiny", tiny)
    cfg = config.load("fast", tiny_overrides(tiny_data, **{"model.name": "tiny", "model.options.width": 16}))
    summary = fit(cfg, tmp_path / "run", quiet=True)
    assert summary["model"] == "tiny" and summary["params"] == sum(
        p.numel() for p in tiny(1, 10, 16).parameters()
    )


def test_import_on_the_command_line_trains_evaluates_and_resumes(
    own, tiny_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynets.py").write_text(textwrap.dedent(MODULE.format(name="mine")))
    sets = tiny_overrides(tiny_data, **{"model.name": "mine", "model.options.units": 2})
    assert main(["train", "--import", "mynets", "--quiet", "--out", "run", "--set", *sets]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    capsys.readouterr()
    # a .py file names it as well; eval finds the run's own accuracy
    assert main(["eval", "run", "--import", "mynets.py", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)
    assert main(["train", "--import", "mynets", "--out", "run", "--resume", "--set", "train.epochs=3"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 3
    capsys.readouterr()
    # without the module, one line that says how to bring it
    registry._REGISTRY.pop("mine")
    assert main(["eval", "run"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'mine'" in err and "--import" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "source, flag, message",
    [
        (None, "nothere", "--import nothere: no module 'nothere' here or installed (a file: nothere.py)"),
        (None, "nothere.py", "--import nothere.py: no such file"),
        ("import not_a_package_anywhere\n", "broken", "it imports 'not_a_package_anywhere', which is not"),
        ("x = (\n", "broken", "--import broken: SyntaxError: '(' was never closed ("),
        ("raise ValueError('bad width')\n", "broken.py", "--import broken.py: ValueError: bad width ("),
        ("WIDTH = 3\n", "broken", "--import broken: it registered no model ("),
        (None, "json", "--import json: it registered no model ("),  # an installed module of that name
        (None, "nothere.sub", "--import nothere.sub: no module 'nothere.sub' here or installed"),
        (
            "import json\n",
            "json.py",
            "--import json.py: a module named 'json' is loaded already; rename the file",
        ),
    ],
    ids=[
        "no-module",
        "no-file",
        "missing-dependency",
        "syntax",
        "raises",
        "registers-nothing",
        "shadowed",
        "dotted",
        "file-shadows",
    ],
)
def test_a_module_that_cannot_be_imported_is_one_line(
    own, tmp_path, monkeypatch, capsys, source, flag, message
):
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / (flag if flag.endswith(".py") else "broken.py")).write_text(source)
    assert main(["models", "--names", "--import", flag]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_model_that_cannot_train_on_the_data_is_one_line_before_any_write(own, tiny_data, tmp_path, capsys):
    def flat(in_channels: int, num_classes: int, hidden: int = 8) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * 28 * 28, hidden), nn.Linear(hidden, num_classes)
        )

    register("too-few", flat, hidden=8)
    register("eight-logits", lambda in_channels, num_classes: flat(in_channels, 8))
    register(
        "wrong-size", lambda in_channels, num_classes: nn.Sequential(nn.Flatten(), nn.Linear(10, num_classes))
    )
    cases = [
        (
            "eight-logits",
            {},
            "model 'eight-logits' gave (2, 8) for a batch of shape (2, 1, 28, 28); training needs (2, 10)",
        ),
        (
            "wrong-size",
            {},
            "model 'wrong-size' failed on a batch of shape (2, 1, 28, 28): RuntimeError: mat1 and mat2",
        ),
        (
            "too-few",
            {"data.resize": 32},
            "model 'too-few' failed on a batch of shape (2, 1, 32, 32): RuntimeError",
        ),
    ]
    for name, extra, message in cases:
        out = tmp_path / name
        assert (
            main(
                [
                    "train",
                    "--quiet",
                    "--out",
                    str(out),
                    "--set",
                    *tiny_overrides(tiny_data, **{"model.name": name}, **extra),
                ]
            )
            == 2
        )
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    # the check leaves the model as it found it: in train mode, BatchNorm's statistics untouched
    net = build_model("resnet8")
    registry.check_forward(net, "mine", 1, 10, 28)
    registry.check_forward(net, "resnet8", 1, 3, 28)  # a built-in model is tested to fit, and not run here
    assert net.training and all(
        float(m.num_batches_tracked) == 0 for m in net.modules() if isinstance(m, nn.BatchNorm2d)
    )


def test_unused_parameters_are_found_on_a_copy_with_the_random_state_kept(own):
    class Spare(nn.Module):
        def __init__(self, in_channels: int, num_classes: int):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(in_channels * 4, num_classes))
            self.spare = nn.Linear(4, 4)

        def forward(self, x):
            return self.body(x)

    register("spare", Spare)
    net = build_model("spare", 1, 3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    assert registry.unused_parameters(net, "spare", (2, 1, 2, 2)) == ["spare.weight", "spare.bias"]
    assert torch.get_rng_state().equal(rng) and all(p.grad is None for p in net.parameters())
    assert all(v.equal(state[k]) for k, v in net.state_dict().items())
    assert registry.unused_parameters(build_model("resnet8"), "resnet8", (2, 1, 28, 28)) == []


class Branchy(
    nn.Module
):  # a forward with a Python branch on a tensor's value: no traced file can hold both paths
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, num_classes))

    def forward(self, x):
        out = self.body(x)
        return out if out.sum() > 0 else -out


@pytest.mark.parametrize("suffix", [".pt2", ".onnx", ".pt"])
def test_a_model_that_cannot_be_traced_is_one_line_on_export_and_no_file(
    own, tiny_data, tmp_path, capsys, suffix
):
    register("branchy", Branchy)
    fit(
        config.load("fast", tiny_overrides(tiny_data, **{"model.name": "branchy", "train.epochs": 1})),
        tmp_path / "run",
        quiet=True,
    )
    capsys.readouterr()
    target = tmp_path / f"model{suffix}"
    target.write_bytes(b"an older export")
    assert main(["export", str(tmp_path / "run"), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert (
        "reslab: error: cannot export model 'branchy' as " in err
        and "(its forward branches on a tensor's value)" in err
    )
    assert len(err.strip().splitlines()) == 1, err
    assert target.read_bytes() == b"an older export"


def dropped(in_channels: int, num_classes: int, p: float = 0.3) -> nn.Module:
    """A model of your own that draws random numbers in every training step (dropout)."""
    return nn.Sequential(tiny(in_channels, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, num_classes))


def test_a_model_of_your_own_resumes_bit_identical_after_a_crash(own, tiny_data, tmp_path):
    register("dropped", dropped)
    sets = tiny_overrides(tiny_data, **{"model.name": "dropped", "train.epochs": 3, "data.flip": True})
    fit(config.load("fast", sets), tmp_path / "a", quiet=True)
    crash_then_resume(config.load("fast", sets), tmp_path / "b")
    a, b = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert without_timings(read_history(tmp_path / "a")) == without_timings(read_history(tmp_path / "b"))


def test_the_example_model_of_your_own_registers_builds_and_trains(own, tiny_data, tmp_path, capsys):
    example = Path(__file__).parents[1] / "examples" / "se_resnet.py"
    assert main(["summary", "se-resnet8", "--import", str(example)]) == 0
    assert "303,698" in capsys.readouterr().out  # fast.yaml's 292,666 and three squeeze-and-excitation gates
    sets = tiny_overrides(tiny_data, **{"model.name": "se-resnet8", "train.epochs": 1})
    summary = fit(config.load("fast", sets), tmp_path / "run", quiet=True)
    assert summary["model"] == "se-resnet8" and 0 < summary["test_acc"] <= 1
