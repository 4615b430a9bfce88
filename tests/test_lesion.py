"""Lesions (studies/lesion.py): a deleted unit is the identity, and only units that keep their input's shape go."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_script, make_dataset, tiny_overrides
from torch import nn

from reslab import config
from reslab.data import load_dataset
from reslab.models import ResidualUnit, build_model
from reslab.studies import lesion, lesion_report


def test_the_units_of_unchanged_shape_are_deletable_in_every_family():
    counts = {
        name: len(lesion.deletable(build_model(name, 1, 10))) for name in ("resnet56", "plain56", "resnet50")
    }
    # 9 units a stage, the 2nd and 3rd stages' first ones downsample; ResNet-50's 4 stages each widen first
    assert counts == {"resnet56": 25, "plain56": 25, "resnet50": 12}
    assert lesion.deletable(build_model("wrn-16-4", 1, 10)) == ["stage1.1", "stage2.1", "stage3.1"]


def test_a_deleted_unit_passes_its_input_on_and_the_model_is_left_as_it_was():
    """The lesioned copy computes what the model computes when that unit's output is replaced by its input."""
    torch.manual_seed(0)
    for name in ("resnet20", "plain20"):
        model = build_model(name, 1, 10).eval()
        x = torch.randn(3, 1, 28, 28)
        intact = model(x)
        lesioned = lesion.without(model, ["stage1.1", "stage3.2"])
        deleted = lesioned.get_submodule("stage1.1")
        assert isinstance(deleted.residual if name == "resnet20" else deleted, (lesion.NoBranch, nn.Identity))
        assert isinstance(model.get_submodule("stage1.1"), ResidualUnit)  # the model keeps its units
        handles = [
            model.get_submodule(u).register_forward_hook(lambda m, inputs, out: inputs[0])
            for u in ("stage1.1", "stage3.2")
        ]
        expected = model(x)
        for h in handles:
            h.remove()
        assert torch.equal(lesioned(x), expected) and not torch.equal(expected, intact)
        assert torch.equal(model(x), intact)


@pytest.mark.parametrize(
    "options, after",
    [
        ({"order": "full-preact"}, lambda unit, x: x),
        ({"order": "relu-before-add"}, lambda unit, x: x),
        ({"order": "bn-after-add"}, lambda unit, x: unit.post(x)),  # f stays: relu(BN(x))
        ({"shortcut_scale": 0.5}, lambda unit, x: torch.relu(0.5 * x)),
        ({"shortcut": "projection", "always_project": True}, lambda unit, x: torch.relu(unit.shortcut(x))),
    ],
    ids=["full-preact", "relu-before-add", "bn-after-add", "scaled", "1x1-conv"],
)
def test_a_deleted_unit_keeps_its_shortcut_and_what_follows_the_addition(options, after):
    """x' = f(s h(x)) with F(x) = 0, in every unit variant of the units study."""
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, **options).eval()
    lesioned = lesion.without(model, ["stage2.1"])
    seen = {}
    unit = lesioned.get_submodule("stage2.1")
    unit.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0], out=out))
    with torch.no_grad():
        lesioned(torch.randn(3, 1, 28, 28))
        assert torch.allclose(seen["out"], after(unit, seen["x"]))
    assert seen["out"].abs().sum() > 0


@pytest.mark.parametrize(
    "name, options, deleted",
    [
        ("resnet14", {"order": "full-preact"}, None),  # F(x) itself
        ("resnet14", {}, lambda x: x),
        ("resnet14", {"shortcut_scale": 0.5}, lambda x: torch.relu(0.5 * x)),
        ("plain14", {}, lambda x: x),
    ],
    ids=["full-preact", "original", "scaled", "plain"],
)
def test_a_units_change_to_the_stream_is_measured_against_the_unit_deleted(name, options, deleted):
    """|F(x)| / |x| in full pre-activation, |u(x) - d(x)| / |d(x)| with d the unit deleted in the others (x in
    the original order and in a plain net): over all the batches' values, with the model left as it was."""
    torch.manual_seed(0)
    model = build_model(name, 1, 10, **options).eval()
    batches = [(torch.randn(3, 1, 28, 28), None), (torch.randn(2, 1, 28, 28), None)]
    intact = model(batches[0][0])
    units = lesion.deletable(model)
    seen = {u: [] for u in units}
    handles = [
        model.get_submodule(u).register_forward_hook(lambda m, i, o, u=u: seen[u].append((i[0], o)))
        for u in units
    ]
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()

    def expected(u: str) -> float:
        unit = model.get_submodule(u)
        if deleted is None:
            change, kept = [unit.residual(unit.pre(x)) for x, _ in seen[u]], [x for x, _ in seen[u]]
        else:
            change, kept = [o - deleted(x) for x, o in seen[u]], [deleted(x) for x, _ in seen[u]]
        return (sum(c.square().sum() for c in change) / sum(k.square().sum() for k in kept)).sqrt().item()

    measured = lesion.stream_measures(model, batches, "fp32")
    changes = measured["change"]
    assert changes == pytest.approx([expected(u) for u in units], rel=1e-5)
    kept = [torch.cat([(x if deleted is None else deleted(x)).flatten() for x, _ in seen[u]]) for u in units]
    assert measured["stream"] == pytest.approx([k.square().mean().sqrt().item() for k in kept], rel=1e-5)
    assert min(changes) > 0 and torch.equal(model(batches[0][0]), intact)
    assert not any(m._forward_hooks for m in model.modules())


def test_the_error_counts_the_wrong_answers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[2.0, 1, 0, 0], [0, 3, 0, 0], [5, 0, 0, 0], [1, 4, 0, 0]]).view(4, 1, 2, 2)
    y = torch.tensor([0, 0, 0, 1])  # the second is wrong
    assert lesion.error_on(model, [(x[:2], y[:2]), (x[2:], y[2:])], "fp32") == 0.25


def test_nets_are_lesioned_on_the_first_images_asked_for_and_a_net_without_units_is_left_out(tiny_data):
    cfg = config.load(None, tiny_overrides(tiny_data))
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    nets = {"resnet14": (build_model("resnet14", 1, 10), {}), "linear": (nn.Sequential(nn.Flatten()), {})}
    found = lesion.of_nets(nets, data, cfg.data, images=100, ks=(2, 4), samples=2)
    assert found["images"] == 100 and list(found["nets"]) == ["resnet14"]
    net = found["nets"]["resnet14"]
    assert len(net["single"]) == len(net["units"]) == 4 and [len(r["errors"]) for r in net["random"]] == [2]
    assert lesion.of_nets(nets, data, cfg.data, images=100, ks=(2, 4), samples=2) == found  # the same draws


def test_a_nets_lesions_are_kept_in_its_run_directory_until_their_key_changes(
    tiny_data, tmp_path, monkeypatch, capsys
):
    """A study run again reads each net's lesions back from lesion.json; other settings, other weights or a broken
    file make it read them from the net again."""
    cfg = config.load(None, tiny_overrides(tiny_data))
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    nets = {"resnet14": (build_model("resnet14", 1, 10), {})}
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"weights")  # only hashed: the model comes from `nets`

    def read(images=100):
        return lesion.of_nets(
            nets, data, cfg.data, images=images, ks=(2,), samples=2, run_dirs={"resnet14": run}
        )

    first = read()
    # what it reads without a run directory
    assert first == lesion.of_nets(nets, data, cfg.data, images=100, ks=(2,), samples=2)
    saved = json.loads((run / "lesion.json").read_text())
    assert saved["lesions"] == first["nets"]["resnet14"] and saved["key"]["images"] == 100
    calls = []
    real = lesion.lesions
    monkeypatch.setattr(lesion, "lesions", lambda *a: calls.append(a) or real(*a))
    assert read() == first and calls == []
    assert "[lesions 1/1] resnet14: kept in" in capsys.readouterr().out
    read(images=50)  # other settings
    assert len(calls) == 1 and json.loads((run / "lesion.json").read_text())["key"]["images"] == 50
    read(images=50)
    assert len(calls) == 1
    (run / "last.pt").write_bytes(b"retrained")  # other weights
    read(images=50)
    assert len(calls) == 2
    (run / "lesion.json").write_text("{")  # broken: read again and written whole
    assert read(images=50)["nets"]["resnet14"] == json.loads((run / "lesion.json").read_text())["lesions"]
    assert len(calls) == 3
    # a file from before the changes were measured: its errors are kept, the changes added
    saved = json.loads((run / "lesion.json").read_text())
    full = saved["lesions"]
    saved["lesions"] = {k: v for k, v in full.items() if k not in ("change", "stream")}
    (run / "lesion.json").write_text(json.dumps(saved))
    assert read(images=50)["nets"]["resnet14"] == full and len(calls) == 3
    assert json.loads((run / "lesion.json").read_text())["lesions"] == full


def test_recalibrated_statistics_are_those_of_the_batches_and_nothing_else_changes():
    """On one batch, the re-estimated net in eval mode computes what its BatchNorms in training mode compute on
    that batch (every statistic the batch's, each on what the layers before it now give); over several, each
    statistic is their average. The weights and the layers' momenta stay, and dropout stays off."""
    torch.manual_seed(0)
    model = build_model("resnet14", 1, 10, dropout=0.3)
    weights = {
        k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k
    }
    x = torch.randn(512, 1, 28, 28)
    lesion.recalibrate_norms(model, [(x, None)], "fp32")
    assert not model.training and all(
        m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    with torch.no_grad():
        evaluated = model(x)
        for m in model.modules():
            m.train(isinstance(m, nn.BatchNorm2d))
        # training mode divides by the batch's biased variance, the running one is unbiased (512/511 here)
        assert torch.allclose(evaluated, model(x), atol=1e-2, rtol=1e-3)
    norm = nn.BatchNorm2d(2)
    a, b = torch.randn(4, 2, 3, 3) + 5, torch.randn(4, 2, 3, 3) - 1
    lesion.recalibrate_norms(norm, [(a, None), (b, None)], "fp32")
    both = torch.cat([a, b]).transpose(0, 1).reshape(2, -1)
    assert torch.allclose(norm.running_mean, both.mean(1), atol=1e-6)  # an average, not a moving one
    assert norm.num_batches_tracked == 2


def test_recalibrated_lesions_are_kept_apart_from_the_lesions_as_trained(tiny_data, tmp_path):
    cfg = config.load(None, tiny_overrides(tiny_data))
    data = load_dataset(cfg.data)
    torch.manual_seed(0)
    model = build_model("resnet14", 1, 10)  # untrained: its statistics (0 and 1) are not the data's
    nets = {"resnet14": (model, {})}
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"weights")

    def read(recalibrate):
        return lesion.of_nets(
            nets, data, cfg.data, 100, ks=(2,), samples=1, run_dirs={"resnet14": run}, recalibrate=recalibrate
        )

    trained, recalibrated = read(0), read(250)
    assert trained["recalibrate"] == 0 and recalibrated["recalibrate"] == 250
    as_trained, again = trained["nets"]["resnet14"], recalibrated["nets"]["resnet14"]
    kept = json.loads((run / "lesion-recalibrated.json").read_text())
    precision = kept["key"]["precision"]  # what training resolves to on this machine
    calibration = lesion.first_images(data, cfg.data, 250, train=True)  # the first training images, as tested
    fresh = lesion.recalibrate_norms(
        copy.deepcopy(model).to(memory_format=torch.channels_last), calibration, precision
    )
    assert again["intact"] == lesion.error_on(fresh, lesion.first_images(data, cfg.data, 100), precision)
    assert again["intact"] != as_trained["intact"] and again["change"] == as_trained["change"]
    assert json.loads((run / "lesion.json").read_text())["lesions"] == as_trained
    assert kept["key"]["recalibrate"] == 250 and kept["lesions"] == again
    assert "recalibrate" not in json.loads((run / "lesion.json").read_text())["key"]
    assert "re-estimated on 250 training images" in "\n".join(lesion_report.table_lines(recalibrated))


def test_a_units_mean_lesion_gives_every_image_its_branchs_average():
    """benchmarks/lesion_mean.py: on a batch of one image repeated, a branch's average is its output for that
    image, so the mean lesion changes nothing; on other images it does, and the average is smaller than F."""
    script = load_script("lesion_mean")
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10).eval()
    for order in ("same", "different"):
        x = torch.randn(1, 1, 28, 28).expand(4, -1, -1, -1) if order == "same" else torch.randn(4, 1, 28, 28)
        mean, rms, mean_rms = script.branch_moments(model, ["stage2.1"], [(x, None)], "fp32")["stage2.1"]
        lesioned = lesion.without(model, [])
        lesioned.get_submodule("stage2.1").residual = script.MeanBranch(mean)
        with torch.no_grad():
            close = torch.allclose(lesioned(x), model(x), atol=1e-5)
        assert mean.shape == (32, 14, 14) and close == (order == "same")
        assert (mean_rms == pytest.approx(rms, rel=1e-5)) if order == "same" else mean_rms < 0.99 * rms


@pytest.mark.parametrize(
    "options, same", [({}, True), ({"shortcut_scale": 0.5}, False), ({"order": "bn-after-add"}, False)]
)
def test_a_whole_deletion_leaves_the_identity_which_the_original_order_already_was(options, same):
    """lesion.without(whole=True): x' = x. In the original order that is the branch deletion, relu(x) = x (x comes
    out of a ReLU); where the deletion leaves relu(x/2) or relu(BN(x)) it is not."""
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10, **options).eval()
    whole = lesion.without(model, ["stage1.1", "stage2.2"], whole=True)
    assert isinstance(whole.get_submodule("stage1.1"), nn.Identity)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(whole(x), lesion.without(model, ["stage1.1", "stage2.2"])(x)) == same


@pytest.fixture(scope="module")
def units_study(tmp_path_factory) -> tuple[dict, Path]:
    """A tiny units study of the scaled shortcut, lesioned with the statistics re-estimated, 2 draws a k: its
    results' lesions and its run directory (which the tests below copy before changing)."""
    from reslab.cli import main

    root = tmp_path_factory.mktemp("units")
    data = make_dataset(root / "data")
    overrides = [f"data.root={data}", "train.epochs=1", "data.limit=256", "train.batch_size=64"]
    argv = ["study", "units", "--quick", "--depth", "14", "--units", "constant-scaling-0.5", "--draws", "2"]
    assert main([*argv, "--recalibrate", "64", "--out", str(root / "u"), "--set", *overrides]) == 0
    study = json.loads((root / "u" / "results.json").read_text())["lesion"]["nets"]["constant-scaling-0.5"]
    return study, root / "u" / "runs" / "resnet14-constant-scaling-0.5-s0"


def test_whole_deletions_are_read_beside_the_studys_own_in_its_draws(units_study, tmp_path, capsys):
    """benchmarks/lesion_whole.py after a units study: the branch deletions are the study's kept ones (read back,
    or measured again to the same numbers), the random sets the study's draws."""
    script = load_script("lesion_whole")
    study, run = units_study
    found = script.measure(run, [2], 2, 10000, 64)
    assert "branch deletions kept in" in capsys.readouterr().out
    assert found["branch"] == {"single": study["single"], "random": study["random"]}
    assert found["intact"] == study["intact"] and len(found["whole"]["random"][0]["errors"]) == 2
    assert found["whole"]["single"] != found["branch"]["single"]  # relu(x/2) against x
    run = shutil.copytree(run, tmp_path / run.name)
    (run / lesion.KEPT_RECALIBRATED).unlink()
    assert script.measure(run, [2], 2, 10000, 64) == found | {"run": str(run)}
    assert "kept in" not in capsys.readouterr().out


def test_the_kept_draws_split_by_whether_they_delete_a_unit(units_study, tmp_path):
    """benchmarks/lesion_split.py: each k's kept errors, split by one unit, add up to the study's; over every unit
    each draw is counted k times, once for each unit it deletes. Kept lesions of another net are refused."""
    from reslab.errors import ReslabError

    script = load_script("lesion_split")
    study, run = units_study
    splits = [script.split(run, unit) for unit in study["units"]]
    for i, kept in enumerate(study["random"]):
        k, errors = kept["k"], kept["errors"]
        for found in splits:
            parts = found["ks"][i]
            assert parts["k"] == k and parts["all"]["n"] == len(errors)
            assert parts["with"]["n"] + parts["without"]["n"] == len(errors)
            assert sorted(parts["with"]["errors"] + parts["without"]["errors"]) == sorted(errors)
        assert sum(f["ks"][i]["with"]["n"] for f in splits) == k * len(errors)
        assert sum(sum(f["ks"][i]["with"]["errors"]) for f in splits) == pytest.approx(k * sum(errors))
    assert [f["unit_alone"] for f in splits] == study["single"]
    with pytest.raises(ReslabError, match="not a deletable unit"):
        script.split(run, "stage9.9")
    with pytest.raises(ReslabError, match="no kept lesions"):
        script.split(run, study["units"][0], lesion.KEPT)  # not lesioned as trained
    other = shutil.copytree(run, tmp_path / run.name)
    torch.save({"model": {}}, other / "last.pt")
    with pytest.raises(ReslabError, match="kept for another last.pt"):
        script.split(other, study["units"][0])


def test_each_draw_is_paired_with_the_same_others_and_the_unit_deleted_or_not(units_study, tmp_path, capsys):
    """benchmarks/lesion_paired.py: a draw's kept error is one side of its pair; the other side deletes the same
    other units and the unit too, or not. Among one other unit (k = 2) the unit's absence is that unit's single
    deletion. Without kept lesions each draw is measured, to the same numbers."""
    script = load_script("lesion_paired")
    study, run = units_study
    units, (kept,) = study["units"], [r for r in study["random"] if r["k"] == 2]
    sides = set()
    for unit in units:
        (found,) = script.measure(run, unit, [2], 2, 10000, 64)["ks"]
        assert found["all"]["n"] == len(kept["errors"]) == 2
        assert found["among_k_minus_1"]["n"] + found["among_k"]["n"] == 2
        for pair, error in zip(found["pairs"], kept["errors"]):
            (other,) = pair["others"] if len(pair["others"]) == 1 else [None]
            sides.add(other is not None)
            if other is not None:  # the draw deleted the unit and one other
                assert pair["with"] == error and pair["without"] == study["single"][units.index(other)]
            else:  # the draw left the unit: with it, three are deleted
                assert len(pair["others"]) == 2 and pair["without"] == error
    assert sides == {True, False}
    found = script.measure(run, units[0], [2], 2, 10000, 64)
    assert "no kept lesions" not in capsys.readouterr().out
    run = shutil.copytree(run, tmp_path / run.name)
    (run / lesion.KEPT_RECALIBRATED).unlink()
    assert script.measure(run, units[0], [2], 2, 10000, 64) == found | {"run": str(run)}
    assert "no kept lesions" in capsys.readouterr().out


def test_a_partner_takes_each_draws_other_units_with_neither_either_or_both(units_study, capsys):
    """benchmarks/lesion_paired.py --partner: each draw's units other than the two, four times over. A side that
    deletes what the draw deleted is its kept error, one that deletes a single unit is that unit's single deletion;
    a draw without the partner gives the plain pairing's two sides; swapping the two swaps the sides."""
    from reslab.errors import ReslabError

    script = load_script("lesion_paired")
    study, run = units_study
    units, (kept,) = study["units"], [r for r in study["random"] if r["k"] == 2]
    unit, partner = units[0], units[1]
    (found,) = script.measure(run, unit, [2], 2, 10000, 64, partner)["ks"]
    (plain,) = script.measure(run, unit, [2], 2, 10000, 64)["ks"]
    (swapped,) = script.measure(run, partner, [2], 2, 10000, 64, unit)["ks"]
    deletes = {"none": [], "unit": [unit], "partner": [partner], "both": [unit, partner]}
    draws = lesion.draws_of(run, units, [2], 2)[2]
    for pair, drawn, error, other in zip(found["pairs"], draws, kept["errors"], plain["pairs"]):
        assert not {unit, partner} & set(pair["others"]) and set(pair["others"]) <= set(drawn)
        for side, extra in deletes.items():
            deleted = set(pair["others"] + extra)
            if deleted == set(drawn):
                assert pair[side] == error
            elif len(deleted) == 1:
                assert pair[side] == study["single"][units.index(deleted.pop())]
        if partner not in drawn:  # the plain pairing's others are this pair's
            assert (pair["unit"], pair["none"]) == (other["with"], other["without"])
    assert [{**p, "unit": p["partner"], "partner": p["unit"]} for p in swapped["pairs"]] == found["pairs"]
    both = [p["both"] - p["unit"] - p["partner"] + p["none"] for p in found["pairs"]]
    assert found["interaction"]["mean"] == pytest.approx(sum(both) / len(both))
    assert found["unit_partner_kept"] == swapped["partner_unit_kept"]
    assert f"{unit} with {partner} kept" in capsys.readouterr().out
    with pytest.raises(ReslabError, match="--partner stage9.9: not a deletable unit"):
        script.measure(run, unit, [2], 2, 10000, 64, "stage9.9")
    with pytest.raises(ReslabError, match="the same unit as --unit"):
        script.measure(run, unit, [2], 2, 10000, 64, unit)


@pytest.mark.parametrize("name", ["lesion_whole", "lesion_paired"])
def test_a_k_the_study_does_not_draw_is_refused_in_one_line(name, units_study, monkeypatch, capsys):
    """The tiny study's net has 4 deletable units, so the study draws k = 2 and not 4: asking for 4 ends in one
    usage line naming it, before anything is measured."""
    _, run = units_study
    monkeypatch.setattr("sys.argv", [name, str(run), "--ks", "2,4", "--samples", "2", "--recalibrate", "64"])
    with pytest.raises(SystemExit) as stop:
        load_script(name).main()
    assert stop.value.code == 2
    assert f"--ks 4: {run} has 4 deletable units; the study draws fewer at a time" in capsys.readouterr().err


def test_a_run_directory_without_weights_is_refused_in_one_line(tmp_path):
    from reslab.errors import ReslabError

    with pytest.raises(ReslabError, match=f"{tmp_path}: no readable last.pt"):
        lesion.of_run(tmp_path, 100, 100)


@pytest.mark.parametrize("name", ["lesion_mean", "lesion_whole", "lesion_split", "lesion_paired"])
def test_a_lesion_scripts_out_is_checked_before_it_measures(name, tmp_path, monkeypatch, capsys):
    """An --out naming a directory ends in one usage line before any run is read; a new folder is created."""
    script = load_script(name)
    monkeypatch.setattr("sys.argv", [name, str(tmp_path / "no-run"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        script.main()
    assert stop.value.code == 2 and f"--out {tmp_path} is a directory" in capsys.readouterr().err
    monkeypatch.setattr(
        "sys.argv", [name, str(tmp_path / "no-run"), "--out", str(tmp_path / "new" / "r.json")]
    )
    with pytest.raises(SystemExit):
        script.main()  # the run is missing: refused after the folder is made
    assert (tmp_path / "new").is_dir() and "no-run" in capsys.readouterr().err
