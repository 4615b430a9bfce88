import json
import signal
import statistics
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from reslab.studies import degradation, gradients, responses, units


def test_degradation_study_writes_results_and_skips_finished_runs(tiny_data, tmp_path, capsys):
    overrides = [
        f"data.root={tiny_data}",
        "train.epochs=1",
        "data.limit=128",
        "train.batch_size=64",
        "device=cpu",
    ]
    payload = degradation.run(
        tmp_path / "deg", quick=True, seeds=1, overrides=overrides, depths=(8, 14), draws=4
    )
    saved = json.loads((tmp_path / "deg" / "results.json").read_text())
    assert {(r["model"], r["residual"]) for r in saved["runs"]} == {
        ("plain8", False),
        ("plain14", False),
        ("resnet8", True),
        ("resnet14", True),
    }
    for r in saved["runs"]:
        assert 0 <= r["final_train_error"] <= 1 and len(r["curve"]) == 1
        assert r["curve"][-1]["test_error"] == r["final_test_error"]
    assert saved["machine"]["cores"] >= 1 and saved["config"]["optim"]["lr"] == 0.1
    assert (tmp_path / "deg" / "figure.png").stat().st_size > 1000
    assert "| 14 |" in (tmp_path / "deg" / "table.md").read_text()
    # the layer responses of the trained seed-0 nets: one per 3x3 layer (stem + 2 per unit), all positive
    nets = saved["responses"]["nets"]
    assert {k: len(v) for k, v in nets.items()} == {"plain8": 7, "plain14": 13, "resnet8": 7, "resnet14": 13}
    assert all(v > 0 for stds in nets.values() for v in stds) and saved["responses"]["images"] == 128
    per_channel = saved["responses"]["per_channel"]  # the same layers, each channel's std averaged
    assert {k: len(v) for k, v in per_channel.items()} == {k: len(v) for k, v in nets.items()}
    assert all(0 < c <= a * (1 + 1e-9) for k in nets for c, a in zip(per_channel[k], nets[k]))
    assert (tmp_path / "deg" / "responses.png").stat().st_size > 1000
    assert "| resnet14 | 13 |" in (tmp_path / "deg" / "table.md").read_text()
    assert "units' last layers, per channel |" in (tmp_path / "deg" / "table.md").read_text()
    # the backward signal at every 3x3 layer, fresh and trained, on the first test batches (all 128 images here)
    grads = saved["gradients"]
    assert grads["images"] == 128 and set(grads["init"]) == set(grads["trained"]) == set(nets)
    for when in ("init", "trained"):
        assert {k: len(v) for k, v in grads[when].items()} == {k: len(v) for k, v in nets.items()}
        assert all(g > 0 for rms in grads[when].values() for g in rms)
    assert {k: len(v) for k, v in grads["growth"].items()} == {k: len(v) for k, v in nets.items()}
    assert (tmp_path / "deg" / "gradients.png").stat().st_size > 1000
    table = (tmp_path / "deg" / "table.md").read_text()
    assert "| gradient RMS at initialisation: first 3x3 layer |" in table
    # lesions: each seed-0 net's test error intact, with each unit of unchanged shape deleted, and k at random
    les = saved["lesion"]
    assert les["images"] == 128 and set(les["nets"]) == set(nets)
    r14 = les["nets"]["resnet14"]
    assert r14["units"] == ["stage1.0", "stage1.1", "stage2.1", "stage3.1"] and len(r14["single"]) == 4
    assert [d["k"] for d in r14["random"]] == [2] and len(r14["random"][0]["errors"]) == 4  # draws=4
    assert les["nets"]["resnet8"]["random"] == []  # one deletable unit: no k below it
    assert all(0 <= e <= 1 for net in les["nets"].values() for e in [net["intact"], *net["single"]])
    assert (tmp_path / "deg" / "lesion.png").stat().st_size > 1000
    assert "| one deleted: median | worst | 2 deleted |" in table
    errors = r14["random"][0]["errors"]  # the mean of the draws with its standard error
    mean, sem = sum(errors) / 4, statistics.stdev(errors) / 2
    assert f"| {mean:.3f} ± {sem:.3f} |" in table and "the mean over 4 random draws" in table
    # each unit's change to the stream, and the largest named in the table
    change = r14["change"]
    assert len(change) == 4 and all(c > 0 for c in change)
    top = max(range(4), key=change.__getitem__)
    assert f"| {change[top]:.3f} ({r14['units'][top]}) |" in table
    # one row each in the responses', the gradients' and the lesions' tables
    assert len([line for line in table.splitlines() if line.startswith("| resnet14 | ")]) == 3
    # a second call trains nothing: every run has its summary.json
    before = {p: p.stat().st_mtime for p in (tmp_path / "deg" / "runs").glob("*/last.pt")}
    again = degradation.run(
        tmp_path / "deg", quick=True, seeds=1, overrides=overrides, depths=(8, 14), draws=4
    )
    assert again["runs"] == payload["runs"]
    assert again["train_seconds"] == payload["train_seconds"] > 0  # the runs' time is kept, not this call's
    assert before == {p: p.stat().st_mtime for p in (tmp_path / "deg" / "runs").glob("*/last.pt")}
    # nor does it read the lesions again: each run directory's lesion.json holds them
    assert again["lesion"] == payload["lesion"]
    assert "[lesions 4/4] resnet14: kept in" in capsys.readouterr().out
    # checkpoints deleted to save disk, or damaged, after the runs finished: the tables stand, those responses go
    (tmp_path / "deg" / "runs" / "resnet8-s0" / "last.pt").unlink()
    (tmp_path / "deg" / "runs" / "plain8-s0" / "last.pt").write_bytes(b"damaged")
    third = degradation.run(tmp_path / "deg", quick=True, seeds=1, overrides=overrides, depths=(8, 14))
    assert third["runs"] == payload["runs"] and set(third["responses"]["nets"]) == {"plain14", "resnet14"}
    assert set(third["gradients"]["init"]) == set(third["gradients"]["trained"]) == {"plain14", "resnet14"}
    out = capsys.readouterr().out
    assert "note: resnet8 is left out of the measures of trained nets: checkpoint" in out
    assert "note: plain8 is left out of the measures" in out
    assert set(third["lesion"]["nets"]) == {"plain14", "resnet14"}


def test_degradation_study_of_the_residual_nets_only(tiny_data, tmp_path):
    overrides = [f"data.root={tiny_data}", "train.epochs=1", "data.limit=64", "train.batch_size=64"]
    payload = degradation.run(tmp_path / "d", seeds=1, overrides=overrides, depths=(8,), nets=("resnet",))
    assert [(r["model"], r["residual"]) for r in payload["runs"]] == [("resnet8", True)]
    assert "| 8 | - | - |" in (tmp_path / "d" / "table.md").read_text()
    assert (tmp_path / "d" / "figure.png").stat().st_size > 1000


def test_a_study_run_again_with_other_settings_refuses_its_finished_runs(tiny_data, tmp_path, capsys):
    """A finished run was skipped whatever the new --set said: a study asked for 2 epochs reported the 1-epoch
    nets under a config of 2. Now it refuses before training anything; where files are may change."""
    from reslab.cli import main

    out = tmp_path / "d"
    argv = ["study", "degradation", "--depths", "8", "--nets", "resnet", "--out", str(out), "--set"]
    argv += [f"data.root={tiny_data}", "data.limit=64", "train.batch_size=64"]
    assert main([*argv, "train.epochs=1"]) == 0
    kept = {p.name: p.read_bytes() for p in [*out.glob("*.*"), *(out / "runs" / "resnet8-s0").glob("*")]}
    capsys.readouterr()
    assert main([*argv, "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"reslab: error: {out / 'runs' / 'resnet8-s0'} was trained with other settings (train.epochs 1, now 2); "
        "run the study with that run's settings, or choose another --out"
    )
    assert kept == {
        p.name: p.read_bytes() for p in [*out.glob("*.*"), *(out / "runs" / "resnet8-s0").glob("*")]
    }
    assert main([*argv, "train.epochs=1", "train.save_every=2"]) == 0  # how a run is kept: no new run
    assert "[1/1]" not in capsys.readouterr().out
    for f in ("summary.json", "last.pt"):  # as if stopped before its first checkpoint: nothing to reuse
        (out / "runs" / "resnet8-s0" / f).unlink()
    assert main([*argv, "train.epochs=2"]) == 0
    assert "[1/1]" in capsys.readouterr().out
    assert "epochs: 2" in (out / "runs" / "resnet8-s0" / "config.yaml").read_text()


def test_units_study_covers_every_variant(tiny_data, tmp_path):
    overrides = [
        f"data.root={tiny_data}",
        "train.epochs=1",
        "data.limit=64",
        "train.batch_size=64",
        "device=cpu",
    ]
    payload = units.run(tmp_path / "u", quick=True, seeds=1, overrides=overrides, depth=8)
    assert [a["variant"] for a in payload["aggregate"]] == list(units.VARIANTS)
    table = (tmp_path / "u" / "table.md").read_text()
    assert "full-preact" in table and "6.37%" in table
    # lesions of each variant's seed-0 net: ResNet-8's one unit of unchanged shape, its first
    les = payload["lesion"]
    assert list(les["nets"]) == list(units.VARIANTS) and les["images"] == 64
    assert all(n["units"] == ["stage1.0"] and len(n["single"]) == 1 for n in les["nets"].values())
    assert "one deleted: median" in table and (tmp_path / "u" / "lesion.png").stat().st_size > 1000
    cfg = json.loads((tmp_path / "u" / "runs" / "resnet8-1x1-conv-shortcut-s0" / "summary.json").read_text())
    assert cfg["model"] == "resnet8"


def test_units_study_lesions_every_seeds_net(tiny_data, tmp_path, capsys):
    """Through the command line: --units picks the variants, --draws the lesions' draws per k."""
    from reslab.cli import main

    overrides = [f"data.root={tiny_data}", "train.epochs=1", "data.limit=64", "train.batch_size=64"]
    argv = ["study", "units", "--quick", "--seeds", "2", "--depth", "14", "--units", "original,full-preact"]
    assert main([*argv, "--draws", "2", "--out", str(tmp_path / "u"), "--set", *overrides]) == 0
    payload = json.loads((tmp_path / "u" / "results.json").read_text())
    assert [r["variant"] for r in payload["runs"]] == ["original", "original", "full-preact", "full-preact"]
    nets = payload["lesion"]["nets"]
    assert all([len(r["errors"]) for r in net["random"]] == [2] for net in nets.values())  # k = 2 of 4 units
    assert list(nets) == ["original", "original-s1", "full-preact", "full-preact-s1"]
    # the long part after training says where it is
    assert "[lesions 4/4] full-preact-s1" in capsys.readouterr().out
    # seed 1's net is its own: trained from another initialisation, so its lesions are read from its weights
    assert nets["original"]["intact"] == payload["runs"][0]["final_test_error"]
    assert nets["original-s1"]["intact"] == payload["runs"][1]["final_test_error"]
    table = (tmp_path / "u" / "table.md").read_text()
    assert "| original-s1 | 4 |" in table and "-sN is seed 0's" in table
    # --recalibrate, run again: the nets stay trained, the lesions are read with their statistics re-estimated
    assert (
        main(
            [*argv, "--draws", "2", "--recalibrate", "32", "--out", str(tmp_path / "u"), "--set", *overrides]
        )
        == 0
    )
    again = json.loads((tmp_path / "u" / "results.json").read_text())
    assert again["runs"] == payload["runs"] and again["lesion"]["recalibrate"] == 32
    assert "statistics re-estimated on 32 training images" in (tmp_path / "u" / "table.md").read_text()


def test_units_study_keeps_the_users_model_options_under_each_variant():
    runs = dict(units.plan(True, 1, ["model.options.width=32"], depth=20))
    assert runs["resnet20-full-preact-s0"].model.options == {"width": 32, "order": "full-preact"}
    assert runs["resnet20-original-s0"].model.options == {"width": 32, "order": "original"}


def test_study_cli_rejects_bad_depths_before_training(tmp_path, capsys):
    from reslab.cli import main

    for flags, message in [
        (["--depths", "20,57"], "depth 57"),
        (["--depths", "20,x"], "20,56"),
        (["--depths", "34"], "depth 34"),
        (["--nets", "resnet,highway"], "'highway'"),
        (["--depths", "20,56,20"], "twice"),
        (["--nets", "plain,plain"], "twice"),
    ]:
        out = tmp_path / "study"
        assert main(["study", "degradation", *flags, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not out.exists()
    # units: a CIFAR-style ResNet; resnet18 (ImageNet-style) lacks the 1x1-conv variant's option
    assert units.depths()[:3] == [8, 14, 20] and 18 not in units.depths()
    for depth in ("18", "57"):
        out = tmp_path / "study"
        assert main(["study", "units", "--depth", depth, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--depth {depth}: no CIFAR-style ResNet" in err and len(err.splitlines()) == 1
        assert not out.exists()
    for units_flag, message in [
        ("original,highway", "unknown unit 'highway'; choose from original,"),
        ("original,original", "twice"),
    ]:
        assert main(["study", "units", "--units", units_flag, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not out.exists()
    # the other study's flags were ignored, the run trained with what the user thought changed
    for study, flags, message in [
        (
            "degradation",
            ["--depth", "20"],
            "--depth: the units study's; the degradation study does not take it",
        ),
        (
            "degradation",
            ["--units", "original", "--depth", "8"],
            "--depth and --units: the units study's; the degradation study does not take them",
        ),
        ("units", ["--depths", "20"], "--depths: the degradation study's; the units study does not take it"),
        ("units", ["--nets", "plain"], "--nets: the degradation study's"),
    ]:
        assert main(["study", study, *flags, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not out.exists()


@pytest.mark.parametrize(
    ("study", "key"),
    [
        ("degradation", "model.name=resnet56"),
        ("degradation", "model.options.width=32"),
        ("degradation", "seed=3"),
        ("units", "model.options.order=full-preact"),
        ("units", "model.options.shortcut_scale=0.3"),
        ("units", "model.name=resnet20"),
        ("degradation", "train.eval_every=5"),
        ("units", "train.eval_every=5"),
    ],
)
def test_a_study_refuses_to_be_told_what_it_sets_itself(tmp_path, capsys, study, key):
    """The study picks the model, seed and (units) each variant's options: a --set of one was replaced without
    a word, so a user asking for resnet56 got the study's own nets. It tests every epoch, for its curves."""
    from reslab.cli import main

    out = tmp_path / "study"
    assert main(["study", study, "--out", str(out), "--set", key]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"reslab: error: --set {key.split('=')[0]}: the study chooses")
        and len(err.splitlines()) == 1
    )
    assert not out.exists()


def test_a_study_stopped_by_sigterm_says_to_run_it_again_and_then_finishes(tiny_data, tmp_path):
    """A study's run stopped by a signal keeps its checkpoint; the message names the study command, which
    resumes that run and completes the study."""
    argv = [sys.executable, "-m", "reslab", "study", "degradation", "--depths", "8", "--nets", "resnet"]
    argv += ["--out", str(tmp_path / "st"), "--set", f"data.root={tiny_data}", "train.epochs=4"]
    argv += ["train.batch_size=16", "device=cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    while line and not line.startswith("epoch"):
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the study finished before the signal arrived")
    assert proc.returncode == 143, err
    assert err.strip().endswith("continue with: the same reslab study command (it resumes)")
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed at epoch" in again.stdout and "| 8 | - | - |" in again.stdout


def test_responses_figure_leaves_nets_that_did_not_train_to_a_log_panel(tmp_path):
    found = {"images": 8, "nets": {"plain8": [1.0, 900.0, 1500.0], "resnet8": [1.0, 0.9, 0.8]}}
    responses.figure(found, tmp_path / "linear.png")
    responses.figure(found, tmp_path / "with-log.png", failed=("plain8",))
    from matplotlib.image import imread

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a panel with nothing in its legend
        responses.figure(found, tmp_path / "log-only.png", failed=("plain8", "resnet8"))
    heights = [imread(tmp_path / name).shape[0] for name in ("linear.png", "with-log.png", "log-only.png")]
    assert heights[1] == pytest.approx(heights[0] * 3 / 2, rel=0.02)  # a third panel
    assert heights[2] == pytest.approx(heights[0] / 2, rel=0.05)  # no net trained: the log panel alone


def test_a_net_closer_to_chance_than_to_zero_error_did_not_train():
    rows = [
        {"model": "plain56", "seed": 0, "final_test_error": 0.30},
        {"model": "plain110", "seed": 0, "final_test_error": 0.90},
        {"model": "resnet20", "seed": 0, "final_test_error": 0.08},
        {"model": "plain56", "seed": 1, "final_test_error": 0.90},  # only seed 0's responses are drawn
    ]
    assert degradation.untrained(rows, 10) == ("plain110",)  # chance 0.9: above 0.45
    assert degradation.untrained(rows, 2) == ("plain56", "plain110")  # chance 0.5: above 0.25


def test_layer_gradients_are_the_gradients_at_each_convolutions_output():
    """A conv-BN-ReLU(in place)-conv-BN-pool-linear net: the RMS of d(summed loss)/d(each conv's output), over two
    batches, against autograd's gradients of the same outputs computed without hooks."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(inplace=True),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    ).double()
    batches = [(torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randint(0, 5, (6,))) for _ in range(2)]
    squares, counts = [0.0, 0.0], [0, 0]
    for x, y in batches:
        c1 = net[0](x)
        c2 = net[3](net[2](net[1](c1)))
        logits = net[7](net[6](net[5](net[4](c2))))
        grads = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum"), (c1, c2))
        for i, g in enumerate(grads):
            squares[i] += float(g.square().sum())
            counts[i] += g.numel()
    want = [(s / n) ** 0.5 for s, n in zip(squares, counts)]
    state = {k: v.clone() for k, v in net.state_dict().items()}  # weights and BN running statistics
    assert gradients.layer_gradients(net, batches) == pytest.approx(want, rel=1e-10)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in net.parameters())


def test_weight_growth_is_each_3x3_convolutions_norm_over_its_fresh_one():
    from reslab.models import build_model

    torch.manual_seed(0)
    fresh = build_model("resnet8", 1, 10)
    trained = build_model("resnet8", 1, 10)
    trained.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        trained.stage2[0].residual[0].weight.mul_(3)  # the 4th 3x3 layer: stem, 2 of stage 1, then this one
    growth = gradients.weight_growth(trained, fresh)
    assert len(growth) == 7 and growth[3] == pytest.approx(3, rel=1e-6)
    assert all(g == pytest.approx(1, rel=1e-6) for i, g in enumerate(growth) if i != 3)


def test_layer_responses_are_read_before_an_in_place_relu():
    """Two BNs, each followed by an in-place ReLU: the first scales channel 0 by 3 and shifts channel 1 by 5, the
    second halves both. The responses are the stds of y = (3x0, x1 + 5) and of relu(y) / 2, over two batches, in
    the order the forward pass reaches them: over all values (the shift counts), and per channel, averaged."""

    def bn(scale: list[float], shift: list[float]) -> nn.BatchNorm2d:
        layer = nn.BatchNorm2d(2, eps=0.0)
        layer.weight.data = torch.tensor(scale, dtype=torch.float32)
        layer.bias.data = torch.tensor(shift, dtype=torch.float32)
        return layer

    net = nn.Sequential(
        bn([3, 1], [0, 5]), nn.ReLU(inplace=True), bn([0.5, 0.5], [0, 0]), nn.ReLU(inplace=True)
    )
    net = net.double()
    x = torch.randn(2, 4, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.stack([3 * x[:, :, 0], x[:, :, 1] + 5], dim=2)  # (batches, B, C, H, W)
    got = responses.layer_responses(net, list(x))
    outputs = [y, 0.5 * y.relu()]
    want_all = [float(o.std(unbiased=False)) for o in outputs]
    want_channel = [float(o.transpose(0, 2).flatten(1).std(1, unbiased=False).mean()) for o in outputs]
    assert got["all"] == pytest.approx(want_all, rel=1e-12)
    assert got["per_channel"] == pytest.approx(want_channel, rel=1e-12)
    assert got["per_channel"][0] < got["all"][0]  # the shift of 5 between the channels is left out
