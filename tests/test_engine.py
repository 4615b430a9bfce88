import contextlib
import copy
import importlib
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from conftest import NEEDS_CUDA, Crash, crash_then_resume, tiny_overrides

from reslab import config, runs
from reslab.cli import main
from reslab.data import load_dataset, make_loaders
from reslab.engine import checkpoint, fit
from reslab.engine.guard import DivergenceError
from reslab.engine.optim import EMA
from reslab.engine.run import epoch_sums
from reslab.engine.schedule import lr_at
from reslab.engine.steps import predict_logits
from reslab.errors import ReslabError
from reslab.models import build_model
from reslab.report import evaluate_checkpoint
from reslab.runs import describe, read_history, without_timings


def tiny_cfg(data_dir, **extra):
    return config.load(None, tiny_overrides(data_dir, **extra))


CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_and_builds_its_model(path):
    cfg = config.load(path)
    model = build_model(cfg.model.name, 1, 10, **cfg.model.options)
    assert cfg.name == path.stem and sum(p.numel() for p in model.parameters()) > 0


def test_recipes_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    """`reslab train` (default: fast) and `--config best` work outside the checkout; a file of that name in the
    working directory comes first; an unknown name lists the recipes."""
    monkeypatch.chdir(tmp_path)
    for name in ("fast", "best.yaml", "configs/seed.yaml"):
        assert config.find(name).parent == CONFIGS[0].parent.resolve()
    assert config.load("fast").name == "fast" and config.load("configs/wrn.yaml").name == "wrn"
    (tmp_path / "fast").write_text("model: {name: resnet8}\n")
    assert config.load("fast").model.name == "resnet8"
    with pytest.raises(
        ReslabError, match="config file nope not found; the recipes of configs/ are: best, fast,"
    ):
        config.find("nope")
    with pytest.raises(ReslabError, match="not found"):
        config.find("elsewhere/fast.yaml")  # a path into another directory is that path, never a recipe


def test_an_override_of_one_model_option_keeps_the_files_others():
    """`--set model.options.first_stride=1` on sprint.yaml changes that option only (it used to replace the
    file's options, silently dropping its width)."""
    cfg = config.load(CONFIGS[0].parent / "sprint.yaml", ["model.options.first_stride=1"])
    assert cfg.model.options == {"width": 64, "first_stride": 1}
    assert config.from_dict(cfg.to_dict()).model.options == cfg.model.options  # as a checkpoint rebuilds it


def test_turning_the_files_compile_off_drops_its_compile_mode():
    """wrn.yaml compiles as CUDA graphs; `--set train.compile=false` trains it eagerly (it used to fail: a compile
    mode without compile=true), while a mode named without compile=true still fails."""
    wrn = CONFIGS[0].parent / "wrn.yaml"
    assert (config.load(wrn).train.compile, config.load(wrn).train.compile_mode) == (True, "reduce-overhead")
    eager = config.load(wrn, ["train.compile=false"]).train
    assert (eager.compile, eager.compile_mode) == (False, "default")
    with pytest.raises(ReslabError, match="train.compile_mode reduce-overhead needs train.compile=true"):
        config.load(None, ["train.compile_mode=reduce-overhead"])
    with pytest.raises(ReslabError, match="needs train.compile=true"):
        config.load(wrn, ["train.compile=false", "train.compile_mode=max-autotune"])


def test_naming_another_model_drops_the_files_options_for_its_own():
    """fast.yaml's width 32, first stride 2 and stem width 16 are ResNet-8's; `--set model.name=resnet56` means the
    paper's ResNet-56 (it used to build a width-32 one silently, and `model.name=resnet18` failed on the width)."""
    fast = CONFIGS[0].parent / "fast.yaml"
    assert config.load(fast).model.options == {"width": 32, "first_stride": 2, "stem_width": 16}
    assert config.load(fast, ["model.name=resnet56"]).model.options == {}
    assert config.load(fast, ["model.name=resnet18"]).model.name == "resnet18"
    cfg = config.load(fast, ["model.name=resnet56", "model.options.order=full-preact"])
    assert cfg.model.options == {"order": "full-preact"}
    same = config.load(fast, ["model.name=resnet8", "model.options.width=16"])
    # the file's own model keeps its options
    assert same.model.options == {"width": 16, "first_stride": 2, "stem_width": 16}


def test_run_directory_contract(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = fit(tiny_cfg(tiny_data, **{"train.epochs": 3}), out, quiet=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "curves.png"):
        assert (out / name).is_file(), name
    rows = read_history(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    keys = {
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "images_per_sec",
        "epoch_seconds",
        "world_size",
        "grad_norm",
        "grad_norm_max",
    }
    assert all(keys <= set(r) for r in rows)
    saved = json.loads((out / "summary.json").read_text())
    for key in (
        "test_acc",
        "test_loss",
        "best_test_acc",
        "epochs",
        "wall_seconds",
        "model",
        "params",
        "device",
        "precision",
    ):
        assert key in saved
    assert saved["test_acc"] == rows[-1]["test_acc"] and saved["best_test_acc"] == max(
        r["test_acc"] for r in rows
    )
    assert summary["epochs"] == 3 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_acc"] > 0.3  # three times chance: the toy data is learnable
    assert config.load(out / "config.yaml").model.name == "resnet8"
    assert all(math.isfinite(v) for r in rows for v in r.values())


def test_model_is_in_train_mode_every_epoch(tiny_data, tmp_path):
    """Regression test for the notebook's bug: eval() for measuring and never train() again froze BN."""
    seen = []

    def spy(run):
        bn = next(m for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        seen.append((run.epoch, run.model.training, bn.running_mean.clone()))

    fit(tiny_cfg(tiny_data, **{"train.epochs": 3}), tmp_path / "run", quiet=True, on_step=spy)
    assert all(training for _, training, _ in seen)
    second = [stats for epoch, _, stats in seen if epoch == 1]
    assert len(second) >= 2 and not torch.equal(second[0], second[-1])  # BN statistics move in epoch 2


def test_metric_definitions(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 1})
    fit(cfg, out, quiet=True)
    row = read_history(out)[0]
    # test loss and accuracy over the full test set, recomputed from the saved weights
    state = checkpoint.load(out / "last.pt")
    data = load_dataset(cfg.data)
    model = build_model("resnet8", 1, 10)
    model.load_state_dict(state["model"])
    _, test = make_loaders(data, cfg.data, 64, 100, 0, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in test])
    labels = data.test_labels
    assert abs(torch.nn.functional.cross_entropy(logits, labels).item() - row["test_loss"]) < 1e-4
    assert abs((logits.argmax(1) == labels).float().mean().item() - row["test_acc"]) < 1e-9
    # training metrics over the epoch's examples: 512 images, batches of 64, none dropped
    assert row["train_acc"] * 512 == pytest.approx(round(row["train_acc"] * 512))


def test_schedules_are_pure_functions_of_the_step():
    o = config.OptimConfig(lr=1.0, schedule="cosine", warmup_epochs=1)
    lrs = [lr_at(s, 100, 10, o) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01
    step = config.OptimConfig(lr=1.0, schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_at(s, 100, 10, step) for s in (0, 49, 50, 75, 99)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    one = config.OptimConfig(lr=2.0, schedule="onecycle", warmup_epochs=3)
    assert max(lr_at(s, 100, 10, one) for s in range(100)) == pytest.approx(2.0)
    assert lr_at(99, 100, 10, one) < 0.05
    assert lr_at(50, 100, 10, config.OptimConfig(lr=0.3)) == 0.3


def test_guard_rolls_back_and_halves_the_lr_on_injected_nan(tiny_data, tmp_path):
    out = tmp_path / "run"
    injected = []

    def poison(run):
        if run.epoch == 1 and run.batch == 3 and not injected:
            injected.append(1)
            with torch.no_grad():
                next(run.model.parameters()).fill_(float("nan"))

    summary = fit(tiny_cfg(tiny_data, **{"train.epochs": 3}), out, quiet=True, on_step=poison)
    assert injected and len(summary["guard_events"]) == 1
    assert summary["guard_events"][0]["lr_scale"] == 0.5
    rows = read_history(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert rows[1]["lr"] == pytest.approx(0.025)  # halved from epoch 2 on
    assert all(
        torch.isfinite(p).all()
        for p in checkpoint.load(out / "last.pt")["model"].values()
        if p.is_floating_point()
    )


def test_each_epochs_rollback_copy_replaces_the_last_one_not_beside_it(tiny_data, tmp_path, monkeypatch):
    """The guard's rollback point is a copy of the weights, the optimiser's slots and the EMA: taken while the
    last epoch's was still held, two of them at once raised a run's peak memory by one (resnet152 with AdamW
    and EMA, 3 epochs on 2 CPU cores: 3.5 GB of RSS, 2.7 GB with the last one let go first)."""
    import gc
    import weakref

    fit_module = importlib.import_module("reslab.engine.fit")
    taken, held = [], []

    def snapshot(run):
        gc.collect()
        held.append(any(ref() is not None for ref in taken))
        snap = real(run)
        taken.append(weakref.ref(next(iter(snap["model"].values()))))
        return snap

    real = fit_module.snapshot
    monkeypatch.setattr(fit_module, "snapshot", snapshot)
    fit(tiny_cfg(tiny_data, **{"train.epochs": 3, "train.ema": 0.9}), tmp_path / "run", quiet=True)
    assert held == [False, False, False]


def test_every_rollback_of_an_epoch_restores_the_optimiser_of_its_start(tiny_data, tmp_path, monkeypatch):
    """An optimiser takes the tensors it loads as its own (no copy): the retry's steps change the rollback copy it
    was restored from in place. The loop takes a new copy before the retry, so a second rollback in the same
    epoch restores the slots the epoch started with, not the retry's."""
    fit_module = importlib.import_module("reslab.engine.fit")
    real, restored = fit_module.restore_training_state, []

    def restore(run, state):
        real(run, state)
        restored.append([t.clone() for s in run.optimizer.state_dict()["state"].values() for t in s.values()])

    def poison(run):
        if run.epoch == 1 and run.batch == 3 + 2 * len(restored) and len(restored) < 2:
            with torch.no_grad():
                next(run.model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(fit_module, "restore_training_state", restore)
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 2, "optim.name": "adamw"})
    summary = fit(cfg, tmp_path / "run", quiet=True, on_step=poison)
    assert len(summary["guard_events"]) == len(restored) == 2
    assert all(torch.equal(a, b) for a, b in zip(*restored, strict=True))


def test_batched_guard_checks_train_the_same_and_still_roll_back(tiny_data, tmp_path):
    """train.guard_every > 1 (the GPU default, forced here on the CPU) reads the steps' numbers in batches: the
    same updates and metrics bit for bit, and an injected NaN is caught at the next read, named by its step,
    and rolled back."""
    extra = {"train.epochs": 2, "data.flip": True}
    fit(tiny_cfg(tiny_data, **extra), tmp_path / "a", quiet=True)
    fit(tiny_cfg(tiny_data, **extra, **{"train.guard_every": 5}), tmp_path / "b", quiet=True)
    a, b = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    assert without_timings(read_history(tmp_path / "a")) == without_timings(read_history(tmp_path / "b"))

    def poison(run):
        if run.epoch == 1 and run.batch == 3 and not run.guard.events:
            with torch.no_grad():
                next(run.model.parameters()).fill_(float("nan"))

    out = tmp_path / "c"
    summary = fit(tiny_cfg(tiny_data, **{"train.guard_every": 5}), out, quiet=True, on_step=poison)
    steps_per_epoch = 512 // 64
    assert [e["epoch"] for e in summary["guard_events"]] == [2]
    assert f"at step {steps_per_epoch + 3}" in summary["guard_events"][0]["what"]  # the first bad step
    assert all(math.isfinite(v) for r in read_history(out) for v in r.values())
    assert all(torch.isfinite(p).all() for p in checkpoint.load(out / "last.pt")["model"].values())


def test_hopeless_run_stops_cleanly(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--out",
        str(out),
        "--quiet",
        "--set",
        *tiny_overrides(tiny_data, **{"optim.lr": 1e9, "train.epochs": 1}),
    ]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "diverged" in err and "after 3 retries" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()  # no NaN metric was ever written
    # `reslab runs` said "no checkpoint" (or, diverged later, "stopped; --resume continues it")
    assert json.loads((out / "diverged.json").read_text())["epoch"] == 1
    said = "diverged in epoch 1; --resume tries again (lower optim.lr with --set)"
    assert describe(out)["state"] == said
    # at a learning rate that trains, the resumed run finishes, and the record goes
    assert main(["train", "--out", str(out), "--quiet", "--resume", "--set", "optim.lr=0.05"]) == 0
    assert not (out / "diverged.json").exists() and describe(out)["state"] == "finished"


def test_a_run_resumed_mid_epoch_rolls_back_to_the_epochs_start_as_the_uninterrupted_one(tiny_data, tmp_path):
    """A mid-epoch last.pt holds the state the epoch started from: a divergence later in that epoch of the resumed
    run goes back there, as the run never interrupted does, not to the resume point (whose weights the steps
    before it may have spoilt), and both end the same bits."""
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 3, "train.checkpoint_every": 3})

    def poison_at(epoch: int, batch: int):
        injected = []

        def poison(run):
            if run.epoch == epoch and run.batch == batch and not injected:
                injected.append(1)
                with torch.no_grad():
                    next(run.model.parameters()).fill_(float("nan"))

        return poison

    def crash(run):
        if run.epoch == 1 and run.batch == 4:  # in epoch 2, after its batch-3 checkpoint
            raise Crash

    whole = fit(cfg, tmp_path / "whole", quiet=True, on_step=poison_at(1, 5))
    with pytest.raises(Crash):
        fit(cfg, tmp_path / "run", quiet=True, on_step=crash)
    assert checkpoint.load(tmp_path / "run" / "last.pt")["batch"] == 3
    resumed = fit(cfg, tmp_path / "run", resume=True, quiet=True, on_step=poison_at(1, 5))
    assert len(whole["guard_events"]) == 1 and resumed["guard_events"] == whole["guard_events"]
    rows = [without_timings(read_history(tmp_path / d)) for d in ("whole", "run")]
    assert rows[0] == rows[1]
    a, b = (checkpoint.load(tmp_path / d / "last.pt")["model"] for d in ("whole", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_mid_epoch_checkpoint_without_cuda_generators_resumes(tiny_data, tmp_path):
    """The checkpoint check takes a missing cuda_rng for a CPU run's none ([]), in a mid-epoch checkpoint's
    epoch_start too; the resumed run's next mid-epoch checkpoint then asked for the key and failed with a
    KeyError (a fuzz of checkpoint edits found it)."""
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 1, "train.checkpoint_every": 1})
    out = tmp_path / "run"

    def crash(run):
        if run.batch == 3:
            raise Crash

    with pytest.raises(Crash):
        fit(cfg, out, quiet=True, on_step=crash)
    state = checkpoint.load(out / "last.pt", resume=True)
    assert state["batch"] > 0 and state["epoch_start"]["cuda_rng"] == []
    del state["epoch_start"]["cuda_rng"], state["cuda_rng"]
    checkpoint.save(state, out / "last.pt")
    fit(cfg, out, resume=True, quiet=True)
    fit(cfg, tmp_path / "whole", quiet=True)
    rows = [without_timings(read_history(tmp_path / d)) for d in ("whole", "run")]
    assert rows[0] == rows[1]


def test_seed_recipe_with_absurd_lr_never_writes_nan(tiny_data, tmp_path):
    overrides = tiny_overrides(
        tiny_data, **{"model.name": "d2l-resnet18", "optim.lr": 50.0, "train.epochs": 2, "data.resize": 32}
    )
    cfg = config.load("configs/seed.yaml", overrides)
    try:
        fit(cfg, tmp_path / "run", quiet=True)
    except DivergenceError:
        pass
    path = tmp_path / "run" / "metrics.jsonl"
    if path.exists():
        assert all(math.isfinite(v) for r in read_history(tmp_path / "run") for v in r.values())


def test_ema_decay_warms_up_then_holds():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, 0.999)
    model.weight.data.fill_(1.0)
    ema.update(model, step=0)  # decay min(0.999, 1/10): the first weights after init count 90%
    assert ema.model.weight.item() == pytest.approx(0.9)
    ema.model.weight.data.zero_()
    ema.update(model, step=100_000)  # warmed up: the configured decay
    assert ema.model.weight.item() == pytest.approx(0.001)


def test_resume_after_a_crash_is_bit_identical(tiny_data, tmp_path):
    extra = {
        "train.epochs": 3,
        "data.crop_padding": 2,
        "data.flip": True,
        "train.ema": 0.9,
        "optim.schedule": "cosine",
    }
    fit(tiny_cfg(tiny_data, **extra), tmp_path / "a", quiet=True)
    crash_then_resume(tiny_cfg(tiny_data, **extra), tmp_path / "b")
    a, b = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key

    assert without_timings(read_history(tmp_path / "a")) == without_timings(read_history(tmp_path / "b"))


def test_a_resumed_run_lets_its_checkpoint_go_once_restored(tiny_data, tmp_path, monkeypatch):
    """The run copies what it needs out of last.pt (the weights and EMA into its own); the loaded checkpoint was
    held all the resumed run long all the same (466 MB for resnet152 with AdamW and EMA)."""
    import gc
    import weakref

    fit(tiny_cfg(tiny_data, **{"train.epochs": 1, "train.ema": 0.9}), tmp_path / "run", quiet=True)
    real, loaded, alive = checkpoint.load, [], []

    def load(path, **kw):
        state = real(path, **kw)
        loaded.extend(weakref.ref(t) for part in ("model", "ema") for t in state[part].values())
        return state

    def step(run):
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))

    monkeypatch.setattr(checkpoint, "load", load)
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 2, "train.ema": 0.9})
    fit(cfg, tmp_path / "run", resume=True, quiet=True, on_step=step)
    assert loaded and alive and set(alive) == {0}


def test_evaluating_every_few_epochs_trains_the_same_and_tests_the_last(tiny_data, tmp_path, capsys):
    extra = {"train.epochs": 5, "data.flip": True, "train.ema": 0.9, "train.tta_flip": True}
    fit(tiny_cfg(tiny_data, **extra), tmp_path / "every", quiet=True)
    # stopped in epoch 4, after an untested epoch 3; resumed from its config.yaml
    crash_then_resume(tiny_cfg(tiny_data, **extra, **{"train.eval_every": 2}), tmp_path / "some", epoch=3)
    a, b = (checkpoint.load(tmp_path / d / "last.pt") for d in ("every", "some"))
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    every, some = read_history(tmp_path / "every"), read_history(tmp_path / "some")
    assert [("test_acc" in r) for r in some] == [False, True, False, True, True]  # every 2nd, and the last
    for r, s in zip(every, some):
        for key in ("train_loss", "train_acc", "lr", *(("test_loss", "test_acc") if "test_acc" in s else ())):
            assert r[key] == s[key], (r["epoch"], key)
    summary = json.loads((tmp_path / "some" / "summary.json").read_text())
    assert summary["test_acc"] == some[-1]["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in some if "test_acc" in r)
    assert (tmp_path / "some" / "curves.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["runs", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "some" in line)
    assert f"| 5/5 | {some[-1]['test_acc']:.4f} |" in row


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
@pytest.mark.parametrize("guard_every", [0, 5])
def test_mid_epoch_checkpoint_resume_is_bit_identical(tiny_data, tmp_path, guard_every, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # CUDA: the same kernels every run
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    extra = {
        "train.epochs": 2,
        "train.checkpoint_every": 3,
        "data.flip": True,
        "model.options.dropout": 0.2,  # draws from torch's own generator, which the checkpoint must carry
        "train.guard_every": guard_every,
        "device": device,
    }
    fit(tiny_cfg(tiny_data, **extra), tmp_path / "a", quiet=True)

    def crash(run):
        if run.epoch == 1 and run.batch == 7:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        fit(tiny_cfg(tiny_data, **extra), tmp_path / "b", quiet=True, on_step=crash)
    assert checkpoint.load(tmp_path / "b" / "last.pt")["batch"] == 6
    fit(tiny_cfg(tiny_data, **extra), tmp_path / "b", resume=True, quiet=True)
    a, b = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]


def test_save_every_writes_last_pt_every_n_epochs_and_a_resume_replays_the_rest(tiny_data, tmp_path):
    """train.save_every=2 writes last.pt after epochs 2 and 4 and after the last; a crash in epoch 4 resumes from
    epoch 2's checkpoint, replays epoch 3, and ends bit for bit where a run saving every epoch ends."""
    extra = {"train.epochs": 5, "data.flip": True}
    fit(tiny_cfg(tiny_data, **extra), tmp_path / "a", quiet=True)
    found = []  # the epoch last.pt holds as each epoch starts

    def look(run):
        if run.batch == 1:
            last = tmp_path / "b" / "last.pt"
            found.append(checkpoint.load(last)["epoch"] if last.exists() else None)
            if run.epoch == 3:
                raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        fit(tiny_cfg(tiny_data, **extra, **{"train.save_every": 2}), tmp_path / "b", quiet=True, on_step=look)
    assert found == [None, None, 2, 2]
    fit(tiny_cfg(tiny_data, **extra, **{"train.save_every": 2}), tmp_path / "b", resume=True, quiet=True)
    a, b = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    assert b["epoch"] == 5 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert read_history(tmp_path / "b")[-1]["test_acc"] == a["history"][-1]["test_acc"]


def test_a_resume_names_its_changes_and_refuses_new_batches_mid_epoch(tiny_data, tmp_path, capsys):
    """A resume with other settings says which; one stopped mid-epoch cannot change what decides that epoch's
    batches (the seed, data.limit, data.val, the batch size): the batches it skips would not be the ones it trained
    on."""
    extra = {"train.epochs": 2, "train.checkpoint_every": 3}

    def crash(run):
        if run.epoch == 1 and run.batch == 7:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        fit(tiny_cfg(tiny_data, **extra), tmp_path / "b", quiet=True, on_step=crash)
    capsys.readouterr()
    for change in ({"train.batch_size": 32}, {"seed": 1}, {"data.val": 64}):
        with pytest.raises(ReslabError, match="stopped at batch 6 of epoch 2, whose batches follow"):
            fit(tiny_cfg(tiny_data, **extra, **change), tmp_path / "b", resume=True, quiet=True)
    assert checkpoint.load(tmp_path / "b" / "last.pt")["batch"] == 6  # nothing written
    fit(tiny_cfg(tiny_data, **{**extra, "optim.lr": 0.02, "train.epochs": 3}), tmp_path / "b", resume=True)
    lines = capsys.readouterr().out.splitlines()
    assert "resuming with changes: optim.lr 0.05 -> 0.02, train.epochs 2 -> 3" in lines


def test_a_resume_trains_with_changed_optimiser_settings_and_refuses_another_optimiser_or_model(
    tiny_data, tmp_path
):
    """The saved optimiser groups hold the run's old weight decay and momentum: a resume that says it changes
    them must train with the new ones, not load the old ones back. Another optimiser or architecture cannot take
    the checkpoint's state, and fewer epochs than it has trained would leave config.yaml saying fewer than the
    run holds: one line naming the change, and nothing written."""
    fit(tiny_cfg(tiny_data, **{"train.epochs": 1}), tmp_path / "a", quiet=True)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    fit(tiny_cfg(tiny_data, **{"train.epochs": 2}), tmp_path / "a", resume=True, quiet=True)
    changed = {"train.epochs": 2, "optim.weight_decay": 0.05, "optim.momentum": 0.5}
    fit(tiny_cfg(tiny_data, **changed), tmp_path / "b", resume=True, quiet=True)
    a, b = (checkpoint.load(tmp_path / d / "last.pt") for d in "ab")
    groups = b["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["momentum"]) for g in groups] == [(0.05, 0.5), (0.0, 0.5)]
    assert not torch.equal(a["model"]["stem.0.weight"], b["model"]["stem.0.weight"])
    before = (tmp_path / "b" / "last.pt").read_bytes()
    refused = [
        (
            {"optim.name": "adamw"},
            "last.pt holds the state of optim.name 'sgd', not 'adamw': resume with the run's",
        ),
        (
            {"model.name": "resnet14"},
            r"does not fit the model of these settings \(model.name 'resnet8', now 'resnet14'.*: 36 tensors are not "
            r"in the checkpoint \(first: stage1.1.residual.0.weight\); resume with the run's own, or start a new run "
            r"from its weights with --set model.init=",
        ),
    ]
    for change, message in refused:
        with pytest.raises(ReslabError, match=message):
            fit(tiny_cfg(tiny_data, **{"train.epochs": 3, **change}), tmp_path / "b", resume=True, quiet=True)
    assert (tmp_path / "b" / "last.pt").read_bytes() == before
    # stopped after its last last.pt, before its summary: fewer epochs than it holds is refused too (a finished
    # run resumed with fewer only says it is finished)
    (tmp_path / "b" / "summary.json").unlink()
    with pytest.raises(
        ReslabError, match="last.pt has trained 2 epochs already: train.epochs 1 would end the"
    ):
        fit(tiny_cfg(tiny_data, **{"train.epochs": 1}), tmp_path / "b", resume=True, quiet=True)
    assert not (tmp_path / "b" / "summary.json").exists()


def test_config_changes_name_dotted_keys_and_ignore_keys_of_other_versions():
    old = config.load("fast").to_dict()
    new = config.load("fast", ["optim.lr=0.3", "model.options.width=16", "train.ema=0.9"]).to_dict()
    assert config.changes(old, new) == {
        "model.options": (
            {"width": 32, "first_stride": 2, "stem_width": 16},
            {"width": 16, "first_stride": 2, "stem_width": 16},
        ),
        "optim.lr": (old["optim"]["lr"], 0.3),
        "train.ema": (old["train"]["ema"], 0.9),
    }
    del old["train"]["guard_every"]  # a checkpoint written before that setting existed
    assert config.changes(old, config.load("fast").to_dict()) == {}


def test_tta_flip_averages_an_image_and_its_mirror():
    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        tta = predict_logits(model, x, tta_flip=True)
        assert torch.allclose(tta, (model(x) + model(x.flip(-1))) / 2, atol=1e-6)
        assert torch.allclose(tta, predict_logits(model, x.flip(-1), tta_flip=True), atol=1e-5)
        assert torch.equal(predict_logits(model, x), model(x))


def test_tta_shift_weighs_the_image_half_and_each_shifted_copy_a_quarter():
    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10).eval()
    x = torch.randn(3, 1, 28, 28)
    fill = -0.8
    # by hand: the image moved 2 px up-left (its last 2 rows and columns are fill) and 2 px down-right
    up_left = torch.full_like(x, fill)
    up_left[..., :-2, :-2] = x[..., 2:, 2:]
    down_right = torch.full_like(x, fill)
    down_right[..., 2:, 2:] = x[..., :-2, :-2]
    with torch.no_grad():
        for flip in (False, True):
            want = (
                predict_logits(model, x, flip) / 2
                + (predict_logits(model, up_left, flip) + predict_logits(model, down_right, flip)) / 4
            )
            got = predict_logits(model, x, flip, tta_shift=2, fill=fill)
            assert torch.allclose(got, want, atol=1e-5)
        assert torch.equal(predict_logits(model, x, tta_shift=0, fill=fill), model(x))


def test_ema_and_tta_runs_report_what_eval_of_the_checkpoint_finds(tiny_data, tmp_path):
    """The run measures the EMA weights with test-time flip and shift; the checkpoint holds those weights and
    settings, so `reslab eval` finds the same figures, and other figures when told another shift."""
    overrides = {
        "train.tta_flip": True,
        "train.tta_shift": 1,
        "train.ema": 0.8,
        "optim.name": "adamw",
        "optim.lr": 0.003,
    }
    summary = fit(tiny_cfg(tiny_data, **overrides), tmp_path / "r", quiet=True)
    result = evaluate_checkpoint(tmp_path / "r" / "last.pt")
    assert result["tta"] == {"flip": True, "shift": 1}
    assert result["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9)
    assert result["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-4)
    unshifted = evaluate_checkpoint(tmp_path / "r" / "last.pt", tta_shift=0)
    assert unshifted["tta"] == {"flip": True, "shift": 0}
    assert unshifted["test_loss"] != pytest.approx(summary["test_loss"], rel=1e-4)
    state = checkpoint.load(tmp_path / "r" / "last.pt")
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    # a shift as large as the input only averages blank views: refused before the evaluation or any write
    assert (
        main(["eval", str(tmp_path / "r" / "last.pt"), "--tta-shift", "28", "--out", str(tmp_path / "e")])
        == 2
    )
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"train.tta_shift": 28}, "train.tta_shift: must be smaller than the 28-pixel inputs, got 28"),
        ({"train.tta_shift": 40, "data.resize": 32}, "smaller than the 32-pixel inputs, got 40"),
        ({"data.crop_padding": 28}, "data.crop_padding: must be smaller than the 28-pixel images, got 28"),
        # named as itself, not as the memory such a batch would need
        ({"train.batch_size": 10**12}, "train.batch_size 1000000000000 exceeds the "),
    ],
)
def test_sizes_known_once_the_data_is_read_are_checked_before_any_write(
    tiny_data, tmp_path, capsys, extra, message
):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *tiny_overrides(tiny_data, **extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
        (["optim.lr=fast"], "optim.lr: expected float"),
        (["optim.lr=-1"], "optim.lr: must be > 0"),
        (["train.epochs=2.5"], "train.epochs: expected int"),
        (["precision=fp8"], "precision: 'fp8' is not one of"),
        (["precision=fp16", "device=cpu"], "fp16 needs a CUDA device"),
        (["model.name=resnet19"], "unknown model 'resnet19'"),
        (["model.options.colour=red"], "model.options.colour"),
        (["model.options.width=0"], "model.options.width: must be an integer from 1 to 2147483647, got 0"),
        (["model.options.width=1.5"], "model.options.width: must be an integer from 1"),
        # sizes torch's kernels cannot hold: a traceback each, before the bounds
        (["model.options.first_stride=2147483648"], "model.options.first_stride: must be an integer from 1"),
        (["model.options.width=1000000000000000000000000000000"], "model.options.width: must be an integer"),
        (["data.resize=2147483648"], "data.resize: at most 4096 pixels, got 2147483648"),
        (["seed=1000000000000000000000000000000"], "seed: must be an integer from -2**63 to 2**63 - 1"),
        (["model.options.zero_init_residual=3"], "model.options.zero_init_residual: must be true or false"),
        (["model.options.shortcut_scale=.nan"], "model.options.shortcut_scale: must be a finite number"),
        (["model.options.order=7"], "model.options.order: must be a string"),
        (["optim.lr=.nan"], "optim.lr: must be a finite number > 0, got nan"),
        (["optim.lr=.inf"], "optim.lr: must be a finite number > 0, got inf"),
        (["optim.momentum=1"], "optim.momentum: must be in [0, 1)"),
        (["optim.betas=[0.9]"], "optim.betas: two numbers"),
        (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov needs optim.momentum > 0"),
        (["data.split=0.2"], "data.split holds out test images from folder data; fashion-mnist has its own"),
        (["data.classes=[a,b]"], "data.classes names the classes of idx or folder data"),
        (["data.erasing=1.5"], "data.erasing: must be in"),
        (["train.tta_shift=-1"], "train.tta_shift: must be >= 0"),
        (["optim.schedule=linear"], "optim.schedule"),
        (["nonsense"], "expected key=value"),
        (["train.eval_every=0"], "train.eval_every: must be > 0, got 0"),
        (["train.save_every=0"], "train.save_every: must be > 0, got 0"),
        (["data.flip=false", "data.alternate_flip=true"], "data.alternate_flip changes how data.flip"),
        # without --out, runs/NAME: these would have written into runs/ itself and into ../etc
        (["name="], "name: one folder's name, as the run directory is runs/NAME by default; got ''"),
        (["name=../../etc"], "name: one folder's name"),
        (["name=a/b"], "name: one folder's name"),
    ],
)
def test_config_errors_exit_2_and_write_nothing(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("reslab: error:")
    assert not out.exists()


def test_print_config_shows_the_resolved_config_and_trains_nothing(tiny_data, tmp_path, capsys):
    """--print-config prints what config.yaml would hold, the file's keys with the defaults and overrides, and
    exits without training or writing; with --resume, the run's own config with the changes asked for."""
    out = tmp_path / "run"
    assert (
        main(["train", "--config", "best", "--out", str(out), "--set", "optim.lr=0.3", "--print-config"]) == 0
    )
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == config.load("best", ["optim.lr=0.3"]).to_dict()
    assert shown["optim"]["lr"] == 0.3 and shown["model"]["name"] == "resnet20" and not out.exists()
    assert main(["train", "--print-config", "--set", "optim.lr=-1"]) == 2  # checked as training checks it
    assert "optim.lr: must be > 0" in capsys.readouterr().err
    fit(tiny_cfg(tiny_data, **{"train.epochs": 1}), out, quiet=True)
    capsys.readouterr()
    files = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    assert main(["train", "--out", str(out), "--resume", "--set", "train.epochs=3", "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["epochs"] == 3 and shown["data"]["root"] == str(tiny_data)
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == files  # the run is untouched
    # a resume reads the run's own config: another named beside it would be ignored
    assert main(["train", "--out", str(out), "--resume", "--config", "best", "--print-config"]) == 2
    assert capsys.readouterr().err == (
        f"reslab: error: --resume continues {out} with its own config, run; --config best names another (best): "
        "leave --config out (make train: CONFIG=the run's recipe)\n"
    )


def test_fit_refuses_a_dict_and_resume_with_overwrite_and_load_takes_one_override(tiny_data, tmp_path):
    # a dict failed deep inside with an AttributeError; resume with overwrite started a new run silently; one
    # override as a string was read as its characters ("--set 't'")
    with pytest.raises(TypeError, match="^fit: cfg must be a reslab Config"):
        fit(tiny_cfg(tiny_data).to_dict(), tmp_path / "a")
    with pytest.raises(
        ReslabError, match="^resume and overwrite: continue the run, or replace it, not both$"
    ):
        fit(tiny_cfg(tiny_data), tmp_path / "a", resume=True, overwrite=True)
    assert not (tmp_path / "a").exists()
    assert config.load("fast", "optim.lr=0.3") == config.load("fast", ["optim.lr=0.3"])


def test_missing_config_file_and_bad_yaml(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["train", "--config", str(tmp_path / "list.yaml")]) == 2
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert main(["train", "--config", str(tmp_path / "picture.png")]) == 2
    assert main(["train", "--resume"]) == 2
    err = capsys.readouterr().err
    assert (
        "not found" in err
        and "not valid YAML" in err
        and "must be a mapping" in err
        and "picture.png is not a text file" in err
        and "--resume needs --out" in err
    )


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, capsys):
    """PyYAML keeps a repeated key's last value: a second `train:` section silently dropped every setting of the
    first (epochs 3 and batch 64 became the defaults, 10 and 256). YAML's merge key still works."""
    (tmp_path / "two.yaml").write_text(
        "train:\n  epochs: 3\n  batch_size: 64\nmodel:\n  name: resnet8\ntrain:\n  ema: 0.9\n"
    )
    (tmp_path / "inner.yaml").write_text("train: {epochs: 2, epochs: 3}\n")
    for name, said in (
        ("two", "key 'train' appears twice (line 6)"),
        ("inner", "key 'epochs' appears twice (line 1)"),
    ):
        assert main(["train", "--config", str(tmp_path / f"{name}.yaml"), "--print-config"]) == 2
        err = capsys.readouterr().err
        assert err == f"reslab: error: config file {tmp_path / name}.yaml is not valid YAML: {said}\n"
    (tmp_path / "merged.yaml").write_text("train:\n  <<: {epochs: 3, batch_size: 64}\n  epochs: 4\n")
    assert main(["train", "--config", str(tmp_path / "merged.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "  epochs: 4\n" in out and "  batch_size: 64\n" in out


def test_a_config_read_without_its_model_checked_is_still_validated(tmp_path):
    """`reslab runs` reads configs with model=False (no torch): a model this version lacks (a newer reslab's, one
    of your own) still resolves, and everything else is checked as before."""
    (tmp_path / "future.yaml").write_text("model:\n  name: resnet-next\n  options: {depth: 9}\n")
    with pytest.raises(ReslabError, match="unknown model 'resnet-next'"):
        config.load(tmp_path / "future.yaml")
    cfg = config.load(tmp_path / "future.yaml", model=False)
    assert cfg.model.name == "resnet-next" and cfg.model.options == {"depth": 9} and cfg.train.epochs == 10
    (tmp_path / "bad.yaml").write_text("model:\n  name: resnet-next\noptim:\n  name: adagrad\n")
    with pytest.raises(ReslabError, match="optim.name: 'adagrad' is not one of"):
        config.load(tmp_path / "bad.yaml", model=False)


def test_a_config_file_lays_its_keys_over_the_base_it_names(tmp_path, capsys):
    """`base: fast` (a recipe) or a path from the file's folder: the file's keys over the base's, as `--set` lays
    its keys over a file's (model options add; another model drops the base's options). Bases chain; a chain
    that leads back to a file, a base that is not there or not a name is one line."""
    fast = config.load("fast")
    (tmp_path / "longer.yaml").write_text(
        "base: fast\ntrain:\n  epochs: 12\nmodel:\n  options: {width: 64}\n"
    )
    longer = config.load(tmp_path / "longer.yaml")
    assert longer.name == "longer" and longer.train.epochs == 12
    assert longer.model.options == {**fast.model.options, "width": 64}
    assert asdict(longer.optim) == asdict(fast.optim) and asdict(longer.data) == asdict(fast.data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deeper.yaml").write_text("base: ../longer.yaml\nmodel:\n  name: resnet20\n")
    deeper = config.load(tmp_path / "sub" / "deeper.yaml", "optim.lr=0.3")
    assert deeper.name == "deeper" and deeper.model.name == "resnet20" and deeper.model.options == {}
    assert deeper.train.epochs == 12 and deeper.optim.lr == 0.3 and deeper.data.flip == fast.data.flip
    # the run's config.yaml is the resolved config: no base to find again on --resume
    assert "base" not in config.dump(deeper)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "gone.yaml").write_text("base: nowhere\n")
    (tmp_path / "number.yaml").write_text("base: 3\n")
    for name, said in (
        ("a", f"config file {tmp_path / 'b.yaml'}: base a.yaml leads back to {tmp_path / 'a.yaml'}"),
        (
            "gone",
            f"config file {tmp_path / 'gone.yaml'}: base nowhere is neither a file beside it nor a recipe "
            "(best, fast, seed, sprint, wrn)",
        ),
        ("number", f"config file {tmp_path / 'number.yaml'}: base must name a recipe or a file, got 3"),
    ):
        assert main(["train", "--config", str(tmp_path / f"{name}.yaml"), "--print-config"]) == 2
        assert capsys.readouterr().err == f"reslab: error: {said}\n"


def test_what_the_system_refuses_unchecked_is_one_line(tiny_data, tmp_path, capsys):
    """An OSError no check of ours names (a file name longer than the filesystem takes) ended in a traceback:
    `reslab train --out` with a 300-character name failed in fit's first look at the directory."""
    from reslab.cli import main

    long = tmp_path / ("x" * 300)
    for argv in (
        ["train", "--out", str(long), "--quiet", "--set", *tiny_overrides(tiny_data)],
        ["eval", str(long)],
        ["runs", str(long)],
    ):
        assert main(argv) == 1
        assert capsys.readouterr().err == f"reslab: error: {long}: File name too long\n"


class FillsUp:
    """A file on a disk that is full after `room` bytes: its write raises ENOSPC, as a real one does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(28, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("how", ["raised", "filled"])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, how):
    """ "filled": the real torch.save on a disk that fills up midway. Its zip writer, closing the file while the
    OSError is handled, raises a RuntimeError ("unexpected pos") instead: measured on a 1 MB tmpfs, where
    `reslab train` ended in that traceback."""
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def broken(obj, f, *a, **k):
        if how == "filled":
            return real_save(obj, FillsUp(f, 700), *a, **k)
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(
        checkpoint.CheckpointError, match="No space left on device; the previous one is intact"
    ):
        checkpoint.save({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_d2l_train_3ch_prints_the_notebook_lines(tiny_data, capsys):
    from torch import nn

    from reslab.d2l import load_fashion_mnist_dataset, train_3ch

    train_iter, test_iter = load_fashion_mnist_dataset(64, resize=32, root=str(tiny_data))
    assert len(train_iter.dataset) == 512 and len(test_iter.dataset) == 256 and len(train_iter) == 8
    X, y = next(iter(train_iter))
    assert X.shape == (64, 1, 32, 32) and 0 <= X.min() and X.max() <= 1
    net = build_model("resnet8", 1, 10)
    start = copy.deepcopy(net.state_dict())
    train_iter, test_iter = load_fashion_mnist_dataset(64, resize=32, root=str(tiny_data))  # at epoch 0 again
    history = train_3ch(
        net,
        nn.CrossEntropyLoss(),
        2,
        train_iter,
        torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        test_iter,
        "cpu",
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("epoch 0, training loss ") and "testing accuracy" in lines[1]
    assert len(history) == 2 and all(math.isfinite(h["train_loss"]) for h in history)
    # the d2l book's loss keeps one value an example: the steps take their mean, as the default loss does
    again = build_model("resnet8", 1, 10)
    again.load_state_dict(start)
    train_iter, test_iter = load_fashion_mnist_dataset(64, resize=32, root=str(tiny_data))
    per_image = train_3ch(
        again,
        nn.CrossEntropyLoss(reduction="none"),
        2,
        train_iter,
        torch.optim.SGD(again.parameters(), lr=0.05, momentum=0.9),
        test_iter,
        "cpu",
    )
    for a, b in zip(history, per_image):
        assert all(b[k] == pytest.approx(a[k], rel=1e-4) for k in a)


def test_grad_scaler_path_skips_overflow_but_stops_on_nan_loss():
    """The fp16 path (CUDA in practice) with a gradient scaler, exercised on the CPU: an overflowing
    gradient is the scaler's business (step skipped, scale lowered), a non-finite loss is divergence."""
    from reslab.engine.guard import Divergence
    from reslab.engine.steps import train_step

    torch.manual_seed(0)
    net = build_model("resnet8", 1, 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    cpu = torch.device("cpu")
    before = [p.detach().clone() for p in net.parameters()]
    hook = next(net.parameters()).register_hook(lambda g: g * float("inf"))
    train_step(net, x, y, opt, torch.nn.CrossEntropyLoss(), 0, cpu, scaler=scaler)
    hook.remove()
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # the step was skipped
    assert scaler.get_scale() < 2.0**16
    loss = train_step(net, x, y, opt, torch.nn.CrossEntropyLoss(), 1, cpu, scaler=scaler)[0].item()
    assert math.isfinite(loss) and not all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    with pytest.raises(Divergence, match="loss"):
        train_step(net, x * float("nan"), y, opt, torch.nn.CrossEntropyLoss(), 2, cpu, scaler=scaler)


def test_optimizer_state_from_a_gpu_keeps_this_optimizers_implementation():
    from reslab.engine.optim import load_optimizer_state, make_optimizer

    net = build_model("resnet8", 1, 10)
    opt = make_optimizer(net, config.load(overrides=["optim.momentum=0.9"]).optim)
    net(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    state = opt.state_dict()
    state["param_groups"] = [dict(g, fused=True) for g in state["param_groups"]]  # as a CUDA run saves it
    load_optimizer_state(opt, state)
    assert all(g["fused"] is None for g in opt.param_groups)  # the CPU keeps its default loop
    assert len(opt.state) == len(list(net.parameters()))  # and the momentum buffers came along


@pytest.mark.parametrize("decay_norm", [False, True])
def test_weight_decay_reaches_bn_scales_only_with_decay_norm(decay_norm):
    """With zero gradients one SGD step only decays: a conv weight always shrinks by lr x decay, BN's scale and
    shift and the head's bias only with optim.decay_norm (the paper's time decayed every parameter)."""
    from reslab.engine.optim import make_optimizer

    net = build_model("resnet8", 1, 10)
    overrides = [
        "optim.lr=0.1",
        "optim.momentum=0",
        "optim.weight_decay=0.5",
        f"optim.decay_norm={decay_norm}",
    ]
    opt = make_optimizer(net, config.load(overrides=overrides).optim)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in net.named_parameters():
        factor = 0.95 if p.ndim > 1 or decay_norm else 1.0
        assert torch.allclose(p.detach(), before[name] * factor, rtol=1e-6, atol=0), name


def _two_groups(net, decay):
    params = list(net.parameters())
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def _sgd_steps(net, opt, seed, steps=4):
    """`steps` updates at changing learning rates, on batches drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.1 / (i + 1)
        x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    ("momentum", "nesterov", "decay"), [(0.9, False, 5e-4), (0.9, True, 5e-4), (0.0, False, 0.0)]
)
def test_reslab_sgd_is_torch_sgd_bit_for_bit_and_shares_its_state_dict(momentum, nesterov, decay):
    """engine.optim.SGD (no torch._dynamo import) against torch.optim.SGD's CPU loop: the same weights and
    momentum buffers after every step, and either one's state_dict continues in the other."""
    from reslab.engine.optim import SGD

    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(build_model("resnet8", 1, 10))
    ours = SGD(_two_groups(nets[0], decay), lr=0.1, momentum=momentum, nesterov=nesterov)
    theirs = torch.optim.SGD(_two_groups(nets[1], decay), lr=0.1, momentum=momentum, nesterov=nesterov)
    for seed in (1, 2):
        _sgd_steps(nets[0], ours, seed)
        _sgd_steps(nets[1], theirs, seed)
        assert all(
            torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values())
        )
        mine, torch_state = ours.state_dict(), theirs.state_dict()
        assert mine["param_groups"] == torch_state["param_groups"]
        assert mine["state"].keys() == torch_state["state"].keys() and len(mine["state"]) == (
            len(list(nets[0].parameters())) if momentum else 0
        )
        for i, s in mine["state"].items():
            assert torch.equal(s["momentum_buffer"], torch_state["state"][i]["momentum_buffer"])
        ours.load_state_dict(torch_state)  # swap the states: the next round must still agree
        theirs.load_state_dict(mine)


def test_reslab_sgd_zeroes_or_drops_gradients_and_refuses_a_state_of_another_shape():
    from reslab.engine.optim import SGD

    net = build_model("resnet8", 1, 10)
    opt = SGD(_two_groups(net, 0.0), lr=0.1, momentum=0.9)
    net(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    state = opt.state_dict()
    state["param_groups"][0]["params"].pop()
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(state)


@pytest.mark.parametrize(
    ("lr", "momentum", "nesterov"), [(-0.1, 0.9, False), (0.1, -0.5, False), (0.1, 0.0, True)]
)
def test_reslab_sgd_refuses_what_torch_sgd_refuses_with_its_message(lr, momentum, nesterov):
    """Direct API callers get torch's errors, not a silent change: nesterov without momentum was dropped."""
    from reslab.engine.optim import SGD

    net = build_model("resnet8", 1, 10)
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD(_two_groups(net, 0.0), lr=lr, momentum=momentum, nesterov=nesterov)
    with pytest.raises(ValueError) as ours:
        SGD(_two_groups(net, 0.0), lr=lr, momentum=momentum, nesterov=nesterov)
    assert str(ours.value) == str(theirs.value)


def test_cpu_training_never_imports_torch_dynamo(tiny_data, tmp_path):
    """torch.optim imports torch._dynamo at its first call (1.5-2.3 s of a process): CPU training with SGD,
    reslab's default, does without it. AdamW still uses torch.optim. So does the memory check before a run
    (host.check_memory) at a side above 64 pixels, far from the limit: the meta device would import it."""
    import subprocess
    import sys

    overrides = tiny_overrides(tiny_data, **{"train.epochs": 1, "data.resize": 72})
    script = (
        "import sys; from reslab import config; from reslab.engine import fit; "
        f"fit(config.load(None, {overrides!r}), {str(tmp_path / 'run')!r}, quiet=True); "
        "print('torch._dynamo' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("given", [None, "5000"])
def test_the_command_line_shortens_openmps_busy_wait_before_torch_loads_it(given):
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it (OMP_DISPLAY_ENV makes it print what it read): the
    command line sets reslab's value before any torch import, and keeps one the user set."""
    import os
    import subprocess
    import sys

    from reslab.cli import OPENMP_SPINS

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | {"OMP_DISPLAY_ENV": "VERBOSE"}
    if given:
        env["GOMP_SPINCOUNT"] = given
    done = subprocess.run(
        [sys.executable, "-m", "reslab", "summary", "resnet8"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"GOMP_SPINCOUNT = '{given or OPENMP_SPINS}'" in done.stderr


@pytest.mark.parametrize("clip", [math.inf, 0.01])
def test_train_step_reports_the_gradient_norm_and_clips_only_to_a_finite_limit(clip):
    from reslab.engine.steps import train_step

    torch.manual_seed(0)
    net = build_model("resnet8", 1, 10)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the gradients stay to be looked at
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    stats = train_step(net, x, y, opt, torch.nn.CrossEntropyLoss(), 0, torch.device("cpu"), clip=clip)
    norm = stats[1].item()
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()])).item()
    assert norm > 0.1  # the norm before clipping
    assert after == pytest.approx(norm if math.isinf(clip) else clip, rel=1e-4)


def test_micro_batches_accumulate_the_whole_batchs_step(tiny_data, tmp_path, capsys):
    """train.accum_steps: the batch in N micro-batches, a backward each, then one update. With BatchNorm on its
    running statistics (the one part of a step that sees the micro-batches apart) it is the whole batch's step:
    the same loss, gradient norm, correct count and weights, equal or unequal parts (5 of 24: 5, 5, 5, 5, 4).
    In training mode the running statistics move once a step, with the first micro-batch."""
    from reslab.engine.steps import train_step

    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10).eval()
    x, y = torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,))
    smoothed, cpu = torch.nn.CrossEntropyLoss(label_smoothing=0.1), torch.device("cpu")
    outcomes = []
    for accum in (1, 3, 5):
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        stats = train_step(net, x, y, opt, smoothed, 0, cpu, accum=accum)
        outcomes.append((stats, torch.cat([p.detach().flatten() for p in net.parameters()])))
    stats, weights = outcomes[0]
    start = torch.cat([p.flatten() for p in model.parameters()])
    assert (weights - start).abs().max() > 1e-3  # a step was made
    for other, other_weights in outcomes[1:]:
        assert other[2] == stats[2] and torch.allclose(other[:2], stats[:2], rtol=1e-5)
        assert torch.allclose(other_weights, weights, atol=1e-6)

    # under DDP each micro-batch but the last holds its all-reduce back (no_sync)
    class Held(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.held, self.forwards = net, False, []

        @contextlib.contextmanager
        def no_sync(self):
            self.held = True
            yield
            self.held = False

        def forward(self, x):
            self.forwards.append(self.held)
            return self.net(x)

    held = Held(copy.deepcopy(model))
    opt = torch.optim.SGD(held.parameters(), lr=0.5, momentum=0.9)
    train_step(held, x, y, opt, smoothed, 0, cpu, accum=3)
    assert held.forwards == [True, True, False]
    # in training mode BatchNorm's running statistics take the first micro-batch's update alone, once a step
    stepped, first = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    train_step(stepped, x, y, torch.optim.SGD(stepped.parameters(), lr=0.5), smoothed, 0, cpu, accum=3)
    first(x[:8])
    buffers = list(zip(stepped.buffers(), first.buffers(), strict=True))
    assert buffers and all(torch.equal(a, b) for a, b in buffers)
    assert not torch.equal(buffers[0][0], next(model.buffers()))  # they moved
    # in training, a run with micro-batches learns; more micro-batches than a step's images is one line
    out = tmp_path / "run"
    summary = fit(tiny_cfg(tiny_data, **{"train.accum_steps": 4}), out, quiet=True)
    rows = read_history(out)
    assert summary["test_acc"] > 0.3 and rows[-1]["train_loss"] < rows[0]["train_loss"]  # chance is 0.1
    too_many = [*tiny_overrides(tiny_data), "train.accum_steps=65"]
    assert main(["train", "--out", str(tmp_path / "no"), "--set", *too_many]) == 2
    assert "train.accum_steps 65 exceeds the 64 images of a step's batch" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_each_epoch_line_says_how_long_the_run_has_to_go(tiny_data, tmp_path, capsys):
    """From the median of the last epochs: wrn.yaml's first epoch on an H200 compiled for 33 s, its next took 1.4 s
    (1.85 s when tested), and 199 epochs to go are minutes, not hours."""
    from reslab.history import epoch_line

    seconds = [33.0, 1.4, 1.85, 1.4, 1.4, 1.85]
    rows = [{"epoch": i + 1, "epoch_seconds": s} for i, s in enumerate(seconds)]
    row = {"train_loss": 1.0, "train_acc": 0.5, "lr": 0.1, "images_per_sec": 1e4, **rows[0]}
    assert epoch_line(row, 200, rows[:1]).endswith("33.0 s  1 h 49 min to go")
    assert epoch_line({**row, **rows[-1]}, 200, rows).endswith("1.9 s  5 min to go")  # 194 x 1.4 s
    assert epoch_line({**row, "epoch": 200}, 200, rows * 40).endswith("33.0 s")  # the last: nothing to go
    fit(tiny_cfg(tiny_data, **{"train.epochs": 2}), tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and lines[0].endswith(" s to go") and lines[1].endswith(" s")


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_each_epoch_reports_its_steps_gradient_norms(tiny_data, tmp_path, monkeypatch, clip):
    fit_mod = importlib.import_module("reslab.engine.fit")  # the module, not the function reslab.engine.fit
    step, norms = fit_mod.train_step, []

    def spy(*args, **kwargs):
        stats = step(*args, **kwargs)
        norms.append(stats[1].item())
        return stats

    monkeypatch.setattr(fit_mod, "train_step", spy)
    fit(tiny_cfg(tiny_data, **{"train.epochs": 2, "optim.grad_clip": clip}), tmp_path / "run", quiet=True)
    rows, steps = read_history(tmp_path / "run"), len(norms) // 2  # 8 steps an epoch
    for row, epoch in zip(rows, (norms[:steps], norms[steps:])):
        assert row["grad_norm"] == pytest.approx(sum(epoch) / steps) and row["grad_norm_max"] == max(epoch)
        if clip:  # the share of steps whose norm the clip cut
            assert row["clipped"] == sum(n > clip for n in epoch) / steps
        else:
            assert "clipped" not in row
    assert epoch_sums([1.0, 2.0, 3.0, 4.0]) == [1.0, 2.0, 3.0, 4.0, *[0.0] * 5]  # an old checkpoint


@pytest.mark.slow
@pytest.mark.parametrize(
    "device,mode", [("cpu", "default"), pytest.param("cuda", "reduce-overhead", marks=NEEDS_CUDA)]
)
def test_compiled_model_trains_and_checkpoints_plain_weights(tiny_data, tmp_path, device, mode):
    """Training runs compiled (on CUDA as replayed CUDA graphs), evaluation eager, with a test-time flip that
    calls the model twice a batch; the checkpoint holds plain weights that `reslab eval` scores the same."""
    extra = {"train.compile": True, "train.compile_mode": mode, "train.tta_flip": True, "device": device}
    summary = fit(tiny_cfg(tiny_data, **extra), tmp_path / "run", quiet=True)
    assert summary["epochs"] == 2 and math.isfinite(summary["test_loss"])
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    assert not any(k.startswith("_orig_mod") for k in state["model"])  # loads into an uncompiled model
    build_model("resnet8", 1, 10).load_state_dict(state["model"])
    result = evaluate_checkpoint(tmp_path / "run" / "last.pt")  # on the CPU
    assert result["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-9 if device == "cpu" else 0.02)


def test_curves_are_drawn_every_curves_every_seconds_at_the_end_and_after_an_error(
    tiny_data, tmp_path, monkeypatch
):
    """curves.png costs ~0.2 s a picture: a run draws it at most every CURVES_EVERY seconds, always after its last
    epoch, and, stopped by an error, with every tested epoch it has."""
    fit_mod, plots = importlib.import_module("reslab.engine.fit"), importlib.import_module("reslab.plots")
    real, drawn = plots.curves, []
    monkeypatch.setattr(plots, "curves", lambda history, *a: (drawn.append(len(history)), real(history, *a)))
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 3})
    for every, expected in ((1e9, [3]), (0.0, [1, 2, 3])):
        monkeypatch.setattr(fit_mod, "CURVES_EVERY", every)
        drawn.clear()
        fit(cfg, tmp_path / f"every-{every}", quiet=True)
        assert drawn == expected
    monkeypatch.setattr(fit_mod, "CURVES_EVERY", 1e9)
    drawn.clear()

    def fail(r):
        if r.epoch == 2:
            raise RuntimeError("a fault in epoch 3")

    with pytest.raises(RuntimeError, match="a fault in epoch 3"):
        fit(cfg, tmp_path / "failed", quiet=True, on_step=fail)
    assert drawn == [2] and (tmp_path / "failed" / "curves.png").stat().st_size > 0


def test_a_validation_split_chooses_best_pt_and_the_test_set_only_reports(tiny_data, tmp_path, monkeypatch):
    """With data.val, best.pt is the epoch best on the held-out training images, however the test set scores; the
    summary names that epoch and its test accuracy, and `reslab eval` of best.pt finds the same."""
    fit_mod, val_scores = importlib.import_module("reslab.engine.fit"), [0.9, 0.5, 0.4]
    real = fit_mod.evaluate

    def shaped(model, loader, *args):  # the validation set best after epoch 1; the test set scores as it does
        m = real(model, loader, *args)
        return m | {"test_acc": val_scores.pop(0)} if loader.num_examples == 100 else m

    monkeypatch.setattr(fit_mod, "evaluate", shaped)
    summary = fit(tiny_cfg(tiny_data, **{"data.val": 100, "train.epochs": 3}), tmp_path / "run", quiet=True)
    rows = read_history(tmp_path / "run")
    assert [r["val_acc"] for r in rows] == [0.9, 0.5, 0.4] and all("val_loss" in r for r in rows)
    assert (summary["best_val_acc"], summary["best_epoch"]) == (0.9, 1) and summary["val_acc"] == 0.4
    # the test accuracy of the epoch the validation chose, which is not the test set's own pick
    assert summary["test_acc_at_best_val"] == rows[0]["test_acc"] < summary["best_test_acc"]
    best = checkpoint.load(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 1
    assert evaluate_checkpoint(tmp_path / "run" / "best.pt")["test_acc"] == rows[0]["test_acc"]
    # eval reads the test set alone: a --limit below the held-out count is no error
    assert evaluate_checkpoint(tmp_path / "run" / "best.pt", limit=50)["test_images"] == 50
    # and scores the held-out images as training did (the loss: the accuracies above are shaped)
    held_out = evaluate_checkpoint(tmp_path / "run" / "best.pt", split="val")
    assert held_out["val_images"] == 100 and held_out["val_loss"] == pytest.approx(
        rows[0]["val_loss"], rel=1e-5
    )
    assert evaluate_checkpoint(tmp_path / "run" / "best.pt", split="train")["train_images"] == 412
    assert load_dataset(config.load(tmp_path / "run" / "config.yaml").data).val_images.shape[0] == 100
    row = runs.describe(tmp_path / "run")  # `reslab runs`: best.pt's test accuracy, not the test set's best
    assert (row["best_val_acc"], row["test_acc_at_best_val"]) == (0.9, summary["test_acc_at_best_val"])
    assert f"| {rows[0]['test_acc']:.4f} (by val) |" in runs.table([row])
