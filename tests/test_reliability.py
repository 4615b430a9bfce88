"""Faults, hostile files and bad input: a crash, a broken file or a typo never costs a user their run."""

import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import tiny_overrides

from reslab.engine import checkpoint
from reslab.engine.checkpoint import CheckpointError
from reslab.lock import lock_dir
from reslab.runs import read_history, without_timings

KILL_POINTS = [
    "start:1",  # before the first checkpoint
    "step:3",  # mid-epoch 1
    "step:13",  # mid-epoch 2 (after a checkpoint)
    "eval:1",  # during the first evaluation
    "checkpoint-write:1",  # the first last.pt written to a temp file, not yet renamed
    "checkpoint-write:3",  # a later one, while the previous last.pt is in place
    "after-checkpoint:2",  # last.pt saved, metrics.jsonl not yet rewritten
    "after-checkpoint:3",  # the last epoch's last.pt saved; best.pt, metrics.jsonl and summary.json not yet
    "epoch-end:1",  # between epochs
]


def train_process(out, data, extra=(), env_extra=None, resume=False):
    env = dict(os.environ, **(env_extra or {}))
    overrides = tiny_overrides(
        data, **{"train.epochs": 3, "data.flip": True, "data.crop_padding": 2, "train.ema": 0.9}
    )
    cmd = [sys.executable, "-m", "reslab", "train", "--out", str(out), "--quiet"]
    cmd += ["--resume"] if resume else ["--set", *overrides, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def outcome(out):
    """What a finished run leaves: last.pt's weights and EMA, metrics.jsonl, best.pt's weights and epoch."""
    state, best = checkpoint.load(out / "last.pt"), checkpoint.load(out / "best.pt")
    return state["model"], state["ema"], without_timings(read_history(out)), (best["model"], best["epoch"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import make_dataset

    tmp = tmp_path_factory.mktemp("ref")
    data = make_dataset(tmp / "data")
    done = train_process(tmp / "run", data)
    assert done.returncode == 0, done.stderr
    return data, outcome(tmp / "run")


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_anywhere_then_resume_is_bit_identical(reference, tmp_path, point):
    data, (ref_model, ref_ema, ref_rows, (ref_best, ref_best_epoch)) = reference
    out = tmp_path / "run"
    killed = train_process(out, data, env_extra={"RESLAB_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = list(out.glob(".*.tmp"))  # killed inside a write: its temporary file, until the resume removes it
    assert bool(left) == point.startswith("checkpoint-write")
    if (out / "last.pt").exists():
        checkpoint.load(out / "last.pt")  # never a half-written checkpoint in place
    resumed = train_process(out, data, resume=True)  # killed before the first checkpoint: it starts again
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.glob(".*.tmp"))
    if point == "after-checkpoint:3":  # nothing left to train: it writes what the kill left unwritten
        assert f"{out} trained its 3 epochs but stopped before its summary: writing it" in resumed.stdout
    model, ema, rows, (best, best_epoch) = outcome(out)
    assert rows == ref_rows
    assert all(torch.equal(model[k], ref_model[k]) for k in ref_model)
    assert all(torch.equal(ema[k], ref_ema[k]) for k in ref_ema)
    assert best_epoch == ref_best_epoch and all(torch.equal(best[k], ref_best[k]) for k in ref_best)


@pytest.mark.slow
def signalled(args: list[str], signum: int, hangup) -> tuple[subprocess.Popen, str, str]:
    """`reslab train ARGS` in a process whose SIGHUP disposition is `hangup`, sent `signum` once training is under
    way (its first epoch line); the finished process, the rest of its stdout, its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "reslab", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, hangup),
    )
    line = proc.stdout.readline()
    while line and not line.startswith("epoch"):
        line = proc.stdout.readline()
    proc.send_signal(signum)
    rest, err = proc.communicate(timeout=300)
    return proc, rest, err


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_sigint_or_sigterm_saves_a_resumable_checkpoint(reference, tmp_path, signum):
    """Ctrl-C, the SIGTERM a scheduler sends before it kills a job, or the SIGHUP of a closed terminal (which ended
    the run where it was, with nothing saved since its last epoch): the run stops after its step with a
    checkpoint, exits 128 + the signal, and resumes bit-identical."""
    data, (ref_model, _, ref_rows, _) = reference
    out = tmp_path / "run"
    overrides = tiny_overrides(
        data, **{"train.epochs": 3, "data.flip": True, "data.crop_padding": 2, "train.ema": 0.9}
    )
    # as from a terminal, whatever this test runs under (nohup ignores SIGHUP, and its children inherit that)
    proc, _, err = signalled(["--out", str(out), "--quiet", "--set", *overrides], signum, signal.SIG_DFL)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signum and "Traceback" not in err
    assert f"interrupted by {signum.name}; saved {out / 'last.pt'}; continue with: reslab train --out" in err
    resumed = train_process(out, data, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    model, _, rows, _ = outcome(out)
    assert rows == ref_rows and all(torch.equal(model[k], ref_model[k]) for k in ref_model)


def test_a_run_under_nohup_keeps_training_through_sighup(tiny_data, tmp_path):
    """nohup makes a process ignore SIGHUP so that it outlives its terminal: reslab keeps that, and trains on."""
    args = ["--out", str(tmp_path / "run"), "--set", *tiny_overrides(tiny_data)]
    proc, rest, err = signalled(args, signal.SIGHUP, signal.SIG_IGN)
    assert proc.returncode == 0 and "interrupted" not in err and "done: test acc" in rest


def test_a_script_is_told_to_resume_with_fit(tiny_data, tmp_path):
    """fit() called from Python says how Python continues it: it named `reslab train --out X --resume`, the
    command line's way, to a script or notebook."""
    from reslab import config
    from reslab.engine import Interrupted, fit

    def press(run):
        if run.batch == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cfg, out = config.load(None, tiny_overrides(tiny_data)), tmp_path / "run"
    with pytest.raises(Interrupted) as stopped:
        fit(cfg, out, quiet=True, on_step=press)
    assert str(stopped.value).endswith(f"continue with: fit(cfg, {str(out)!r}, resume=True)")
    assert fit(cfg, out, resume=True, quiet=True)["epochs"] == cfg.train.epochs


def test_a_second_signal_stops_at_once_and_the_handlers_are_restored(tiny_data, tmp_path):
    """The first Ctrl-C asks for a checkpoint at the end of the step; a second one does not wait for it."""
    from reslab import config
    from reslab.engine import fit

    def press_twice(run):
        if run.batch == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with pytest.raises(KeyboardInterrupt):
        fit(config.load(None, tiny_overrides(tiny_data)), tmp_path / "run", quiet=True, on_step=press_twice)
    assert {s: signal.getsignal(s) for s in before} == before
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no half-written file left behind


def test_fit_in_another_thread_trains_and_leaves_the_main_threads_handlers(tiny_data, tmp_path):
    """Python lets only the main thread set signal handlers: fit() in a server's or an app's thread failed at
    once ("signal only works in main thread of the main interpreter")."""
    import threading

    from reslab import config
    from reslab.engine import fit

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    done = []
    worker = threading.Thread(
        target=lambda: done.append(
            fit(config.load(None, tiny_overrides(tiny_data)), tmp_path / "run", quiet=True)
        )
    )
    worker.start()
    worker.join()
    assert len(done) == 1 and done[0]["epochs"] == 2
    assert {s: signal.getsignal(s) for s in before} == before


def test_disk_full_on_checkpoint_stops_cleanly_or_continues(tiny_data, tmp_path, monkeypatch, capsys):
    from reslab import config
    from reslab.cli import main
    from reslab.engine import fit

    real_save = torch.save
    calls = []

    def flaky(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # the second epoch's last.pt
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky)
    out = tmp_path / "stop"
    assert main(["train", "--out", str(out), "--quiet", "--set", *tiny_overrides(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device; the previous one is intact" in err and len(err.strip().splitlines()) == 1
    assert checkpoint.load(out / "last.pt")["epoch"] == 1  # epoch 1's checkpoint survived
    calls.clear()
    cfg = config.load(None, tiny_overrides(tiny_data, **{"train.on_checkpoint_error": "continue"}))
    summary = fit(cfg, tmp_path / "go-on", quiet=True)
    assert summary["epochs"] == 2 and "training goes on" in capsys.readouterr().err


def test_unwritable_run_directory_is_one_clear_line(tmp_path, monkeypatch):
    # as root, chmod does not stop writes: simulate the permission error the OS would raise
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*Permission denied"):
        checkpoint.save({"model": {}}, tmp_path / "last.pt")


def test_run_directory_that_is_a_file_is_one_clear_line(tiny_data, tmp_path, capsys):
    from reslab.cli import main

    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for out in (target, target / "run"):
        assert main(["train", "--out", str(out), "--quiet", "--set", *tiny_overrides(tiny_data)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("reslab: error:") and "notes.txt" in err
    assert target.read_text() == "keep me"


def test_resuming_a_finished_run_changes_nothing(tiny_data, tmp_path, capsys):
    """`--resume` on a run that has its epochs (here asking for fewer) says so and leaves its files as they were:
    its config.yaml and summary.json (with the run's own wall time) are not rewritten."""
    from reslab.cli import main

    out = tmp_path / "run"
    train = ["train", "--out", str(out), "--quiet"]
    assert main([*train, "--set", *tiny_overrides(tiny_data, **{"train.epochs": 2})]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for epochs in (2, 1):
        assert (
            main([*train, "--resume", "--set", *tiny_overrides(tiny_data, **{"train.epochs": epochs})]) == 0
        )
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"{out} already finished 2 epochs; raise train.epochs to train on"
        assert len(lines) == 2 and lines[1].startswith("done: test acc")  # the run's own summary
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_without_config_yaml_reads_the_checkpoints_config(reference, tmp_path):
    """A run whose config.yaml was lost resumes from its last.pt alone, which carries the config too."""
    data, (ref_model, _, ref_rows, _) = reference
    out = tmp_path / "run"
    killed = train_process(out, data, env_extra={"RESLAB_KILL_AT": "step:13"})
    assert killed.returncode == -signal.SIGKILL
    (out / "config.yaml").unlink()
    resumed = train_process(out, data, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    model, _, rows, _ = outcome(out)
    assert rows == ref_rows and all(torch.equal(model[k], ref_model[k]) for k in ref_model)
    (out / "config.yaml").unlink()
    (out / "last.pt").unlink()
    again = train_process(out, data, resume=True)
    assert again.returncode == 2 and "holds no run (no config.yaml, no last.pt)" in again.stderr


def test_a_run_directory_holding_a_run_is_kept_unless_told_to_overwrite(tiny_data, tmp_path, capsys):
    """Training again into --out without --resume used to replace the run there silently: now it is one line,
    exit 2, every file as it was; --overwrite replaces it, and --resume with --overwrite is a usage error."""
    from reslab import config
    from reslab.cli import main
    from reslab.engine import fit

    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--quiet", "--set", *tiny_overrides(tiny_data)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*argv, "model.name=resnet14"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"reslab: error: {out} already holds a run; continue it with --resume, replace it with " + (
        "--overwrite, or choose another --out"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*argv, "model.name=resnet14", "--overwrite"]) == 0
    assert checkpoint.load(out / "last.pt")["config"]["model"]["name"] == "resnet14"
    # an overwrite that fails in its first epoch leaves no file of the old run for a --resume to pick up

    def crash(run):
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        fit(config.load(None, tiny_overrides(tiny_data)), out, overwrite=True, on_step=crash)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml"]
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--resume", "--overwrite"])
    assert usage.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_run_directory_in_use_is_refused_until_its_trainer_ends(tiny_data, tmp_path, capsys):
    """Two trainers in one directory would interleave their checkpoints: while one holds out/.lock (here this
    test, standing in for a live `reslab train`), another is one line naming its pid, and writes nothing."""
    from reslab.cli import main

    out = tmp_path / "run"
    out.mkdir()
    argv = ["train", "--out", str(out), "--quiet", "--set", *tiny_overrides(tiny_data)]
    with lock_dir(out):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"reslab: error: {out} is in use by another training process (pid {os.getpid()}); " + (
            "wait for it to end or choose another --out"
        )
        assert [p.name for p in out.iterdir()] == [".lock"]
    assert main(argv) == 0  # the lock is freed with its holder
    assert (out / "summary.json").is_file()


def test_out_of_memory_mid_run_is_one_line_and_keeps_the_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    from reslab import faults
    from reslab.cli import main

    steps = []

    def allocation_fails(
        point,
    ):  # at a real point of the training loop, the error PyTorch's CPU allocator raises
        steps.append(point)
        if steps.count("step") == 10:  # in epoch 2 (tiny data: 8 steps an epoch)
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                "you tried to allocate 32768000000 bytes. Error code 12 (Cannot allocate memory)"
            )

    monkeypatch.setattr(faults, "reached", allocation_fails)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", "--set", *tiny_overrides(tiny_data)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("reslab: error: out of memory (")
    assert "train.batch_size" in err and "data.resize" in err
    assert checkpoint.load(out / "last.pt")["epoch"] == 1  # epoch 1's checkpoint is intact

    def bug(point):
        raise RuntimeError("shape mismatch")  # any other error is a bug: it keeps its traceback

    monkeypatch.setattr(faults, "reached", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["train", "--out", str(tmp_path / "bug"), "--quiet", "--set", *tiny_overrides(tiny_data)])


def test_available_memory_is_meminfos_under_the_tightest_group_limit(tmp_path):
    from reslab.memory import available

    meminfo, proc = tmp_path / "meminfo", tmp_path / "cgroup"
    meminfo.write_text("MemTotal:       24683772 kB\nMemAvailable:   20000000 kB\n")
    proc.write_text("0::/box/job\n")  # cgroup v2, no limit along the path
    (tmp_path / "box" / "job").mkdir(parents=True)
    (tmp_path / "box" / "memory.max").write_text("max\n")
    assert available(meminfo, proc, tmp_path) == 20_000_000 * 1024
    (tmp_path / "box" / "memory.max").write_text("4000000000\n")  # a container's limit, on the job's parent
    assert available(meminfo, proc, tmp_path) == 4_000_000_000
    # the pages its processes hold already take room; the page cache ("file") is given back under the limit
    (tmp_path / "box" / "memory.stat").write_text("anon 1500000000\nfile 2000000000\n")
    assert available(meminfo, proc, tmp_path) == 2_500_000_000
    proc.write_text("4:memory:/box\n3:cpu:/\n")  # cgroup v1, where "no limit" is about 2**63
    (tmp_path / "memory" / "box").mkdir(parents=True)
    (tmp_path / "memory" / "box" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert available(meminfo, proc, tmp_path) == 20_000_000 * 1024
    (tmp_path / "memory" / "box" / "memory.limit_in_bytes").write_text("3000000000\n")
    (tmp_path / "memory" / "box" / "memory.stat").write_text(
        "cache 9000\nrss 100\ntotal_cache 9000\ntotal_rss 1000\n"
    )
    assert available(meminfo, proc, tmp_path) == 3_000_000_000 - 1000
    assert available(tmp_path / "missing", proc, tmp_path) is None  # not Linux: nothing is refused


# at 200 px the count is made on the meta device; 64 images and one epoch keep the run short
LARGE = {
    "data.resize": 200,
    "data.limit": 64,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.eval_batch_size": 8,
}


@pytest.mark.parametrize(
    "extra, batch, what",
    [
        ({}, 64, "a training step"),
        # a micro-batch's activations at a time
        ({"train.accum_steps": 4, "train.eval_batch_size": 16}, 16, "a training step"),
        (LARGE, 8, "a training step"),
        ({"train.eval_batch_size": 256, "train.batch_size": 16}, 256, "an evaluation batch"),
    ],
)
def test_a_run_that_cannot_fit_in_memory_is_one_line_before_anything_is_written(
    tiny_data, tmp_path, monkeypatch, capsys, extra, batch, what
):
    """Linux's OOM killer ends a process that takes too much memory with SIGKILL: no message, often minutes in (an
    ad hoc fuzz of folder datasets found a first image of 5000x4000 pixels, which sets the side every image loads
    at). A CPU run whose activations alone cannot fit is refused before it starts; one that fits starts."""
    from reslab import config, memory
    from reslab.cli import main
    from reslab.engine.optim import state_bytes
    from reslab.models import activation_bytes, build_model

    overrides = tiny_overrides(tiny_data, **extra)
    cfg = config.load("fast", overrides)  # the recipe `reslab train` lays the overrides on
    side = cfg.data.resize or 28
    with torch.device("meta"):
        model = build_model("resnet8", 1, 10, **cfg.model.options)
        kept, largest = activation_bytes(model.train(), (1, side, side))
    # a step also keeps the gradients, SGD's momentum buffers and the guard's copy of both: 4.7 MB for resnet8
    state = state_bytes(model, cfg.optim, cfg.train.ema > 0, 1, cfg.train.epochs)
    need = batch * kept + state if what == "a training step" else batch * largest
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), "--quiet", "--set", *overrides]
    monkeypatch.setattr(memory, "available", lambda: need - 1)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    held = "gradients, optimiser state and the guard's rollback copy"
    plus = f", plus {memory.amount(state)} of {held}" * (what == "a training step")
    says = f"{what} of resnet8 needs at least {memory.amount(need)} ({batch} images of 1x{side}x{side}, fp32{plus})"
    assert says + f", more than the {memory.amount(need - 1)} this machine has free" in err, err
    assert not out.exists()
    monkeypatch.setattr(memory, "available", lambda: need)
    assert main(argv) == 0


@pytest.mark.parametrize(
    "world, extra, batch",
    [
        (2, {"train.eval_batch_size": 255}, 128),  # rank 0 evaluates images 0, 2, ..., 254 of each batch
        (1, {"train.eval_batch_size": 512, "data.val": 400}, 400),  # 400 held out, 256 test images
    ],
)
def test_the_evaluation_floor_is_a_ranks_share_of_the_largest_evaluation_set(
    tiny_data, tmp_path, monkeypatch, world, extra, batch
):
    """Under torchrun each rank evaluates its share of a batch; a validation set may be larger than the test set."""
    from reslab import config, memory
    from reslab.engine import dist, run
    from reslab.errors import ReslabError
    from reslab.models import activation_bytes, build_model

    # micro-batches of 1 or 2 images: the training step fits in what the evaluation batch does not
    cfg = config.load("fast", tiny_overrides(tiny_data, **{"train.accum_steps": 32, **extra}))
    _, largest = activation_bytes(build_model("resnet8", 1, 10, **cfg.model.options).train(), (1, 28, 28))
    monkeypatch.setattr(run.dist, "setup", lambda device_type: dist.DistContext(world_size=world))
    monkeypatch.setattr(memory, "available", lambda: batch * largest - 1)
    with pytest.raises(
        ReslabError, match=rf"^an evaluation batch of resnet8 needs at least .* \({batch} images of"
    ):
        run.prepare(cfg, tmp_path / "run")


def test_each_torchrun_rank_on_a_machine_needs_its_own_memory(tmp_path, monkeypatch):
    """torchrun's ranks on one machine each hold their own activations and data in the memory they share: each
    was checked against all of it, and several that fit one by one were let through to be killed together."""
    from PIL import Image

    from reslab import config, memory
    from reslab.data.folder import load_folder
    from reslab.engine.host import check_memory
    from reslab.errors import ReslabError
    from reslab.models import activation_bytes, build_model

    cfg = config.load("fast").model
    model = build_model("resnet8", 1, 10, **cfg.options)
    _, largest = activation_bytes(model.train(), (1, 28, 28))
    # room for one rank's evaluation batch of 100 images, one byte short of two ranks'
    monkeypatch.setattr(memory, "available", lambda: 2 * 100 * largest - 1)
    check_memory(model, cfg, (1, 28, 10), (0, 100), "fp32")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(
        ReslabError,
        match=r"^an evaluation batch of resnet8 needs at least .* \(100 images of 1x28x28, fp32\) on each of this "
        r"machine's 2 torchrun ranks \(.* in all\), more than .*: lower train.eval_batch_size or data.resize, or "
        r"start fewer ranks on this machine$",
    ):
        check_memory(model, cfg, (1, 28, 10), (0, 100), "fp32")
    for i in range(6):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.new("L", (100, 100)).save(tmp_path / f"c{i % 2}" / f"{i}.png")
    monkeypatch.setattr(memory, "available", lambda: 100_000)  # 60,000 bytes a rank
    with pytest.raises(
        ReslabError,
        match=r"need at least 0 MB in memory on each of this machine's 2 torchrun ranks \(0 MB in all\), more than the "
        r"0 MB this machine has free: set data.resize, or start fewer ranks on this machine$",
    ):
        load_folder(str(tmp_path), 0.5, None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # the other rank on another machine
    assert load_folder(str(tmp_path), 0.5, None).train_images.shape == (2, 100, 100)


def test_a_steps_gradients_and_optimiser_state_count_in_its_memory(monkeypatch):
    """Beside its activations a training step keeps a gradient per weight, the optimiser's slots, the moving
    average's copy of the weights, under DistributedDataParallel its gradient buckets, and the guard's copy of
    the weights, the EMA's and (from the second epoch) the slots: 1.7 GB for a ResNet-152 with AdamW and EMA on
    2 ranks, which the check left out."""
    import dataclasses

    from reslab import config, memory
    from reslab.engine.host import check_memory
    from reslab.engine.optim import state_bytes
    from reslab.errors import ReslabError
    from reslab.models import build_model

    cfg = config.load("fast")
    model = build_model("resnet8", 1, 10, **cfg.model.options)
    grads = 4 * sum(p.numel() for p in model.parameters())
    weights = grads + sum(b.numel() * b.element_size() for b in model.buffers())
    sgd, adamw = cfg.optim, dataclasses.replace(cfg.optim, name="adamw")
    # the guard's copy of the weights and buffers is in each
    assert state_bytes(model, sgd, ema=False) == 2 * grads + weights  # SGD's momentum buffer
    assert state_bytes(model, dataclasses.replace(sgd, momentum=0.0), ema=False) == grads + weights
    assert state_bytes(model, adamw, ema=False) == 3 * grads + weights  # AdamW's two moments
    # and from the second epoch, the guard's copy of them
    assert state_bytes(model, adamw, ema=False, epochs=2) == 5 * grads + weights
    assert state_bytes(model, adamw, ema=True, ranks=2) == 4 * grads + 3 * weights  # the EMA's, and its copy
    with torch.device("meta"):
        big = build_model("resnet152", 3, 1000)
    assert 1.68e9 < state_bytes(big, adamw, ema=True, ranks=2) < 1.69e9
    # the state alone past the limit: a smaller batch cannot help
    state = state_bytes(model, adamw, ema=False)
    monkeypatch.setattr(memory, "available", lambda: state)
    with pytest.raises(
        ReslabError,
        match=r"^a training step of resnet8 needs at least 5 MB \(1 image of 1x28x28, fp32, plus 5 MB of gradients, "
        r"optimiser state and the guard's rollback copy\), more than .*: choose a smaller model, or an optimiser "
        r"with fewer slots \(adamw keeps two, sgd one\)$",
    ):
        check_memory(model, cfg.model, (1, 28, 10), (1, 1), "fp32", state=state + 1)
    for p in model.parameters():  # frozen weights have no gradient and no slot
        p.requires_grad_(False)
    assert state_bytes(model, adamw, ema=True) == 3 * weights


def test_a_run_over_a_real_containers_memory_limit_is_one_line_not_killed(tiny_data, tmp_path):
    """Under a real control group's 1.6 GiB limit (needs root and a writable hierarchy), a ResNet-152 with AdamW
    and EMA is refused in one line: its 1.4 GB of gradients, optimiser state and the guard's copy do not fit beside
    the ~400 MB the process holds by then. Before the check counted either, the kernel's OOM killer ended it
    without a word."""
    from pathlib import Path

    root = Path("/sys/fs/cgroup")
    v2 = (root / "cgroup.controllers").exists()
    group = (root if v2 else root / "memory") / f"reslab-test-mem-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as e:
        pytest.skip(f"cannot make a control group: {e}")
    try:
        try:
            (group / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(1600 * 2**20))
        except OSError as e:
            pytest.skip(f"cannot limit a control group's memory: {e}")
        out = tmp_path / "run"
        sets = ["model.name=resnet152", "optim.name=adamw", "train.ema=0.999", "train.batch_size=8"]
        done = subprocess.run(
            [sys.executable, "-m", "reslab", "train", "--out", str(out), "--quiet"]
            + ["--set", *tiny_overrides(tiny_data, **{"train.epochs": 1}), *sets],
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
            capture_output=True,
            text=True,
        )
    finally:
        group.rmdir()
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, (done.returncode, done.stderr)
    assert (
        "plus 1.4 GB of gradients, optimiser state and the guard's rollback copy" in done.stderr
        and not out.exists()
    ), done.stderr


def test_a_folder_that_cannot_fit_in_memory_is_one_line_before_it_is_read(tmp_path, monkeypatch):
    from PIL import Image

    from reslab import memory
    from reslab.data.folder import load_folder
    from reslab.errors import ReslabError

    for i in range(6):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.new("L", (300, 200)).save(tmp_path / f"c{i % 2}" / f"{i}.png")
    monkeypatch.setattr(memory, "available", lambda: 500_000)
    with pytest.raises(
        ReslabError,
        match=r"its 6 images at 300x300 pixels need at least 1 MB in memory, more than the 0 MB .* set data.resize",
    ):
        load_folder(str(tmp_path), 0.5, None)
    assert load_folder(str(tmp_path), 0.5, 28).train_images.shape == (2, 28, 28)  # 6 x 28 x 28 bytes fit


# ------------------------------------------------------------------ hostile and broken checkpoints
class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/reslab-pwned",))


def test_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    path = tmp_path / "evil.pt"
    if os.path.exists("/tmp/reslab-pwned"):
        os.unlink("/tmp/reslab-pwned")
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"refused, .* \(possible code\): .*GLOBAL posix.system") as e:
        checkpoint.load(path)
    assert "weights_only" not in str(e.value)  # torch's advice to load it anyway is not passed on
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "raw.pt")
    assert not os.path.exists("/tmp/reslab-pwned")


def test_truncated_garbage_and_foreign_checkpoints(tmp_path):
    good = tmp_path / "good.pt"
    checkpoint.save({"model": {"w": torch.ones(2)}}, good)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(tmp_path / "cut.pt")
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:
        z.writestr("archive/data.pkl", b"garbage")
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "zip.pt")
    (tmp_path / "text.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        CheckpointError, match=r"not a readable checkpoint \(truncated or corrupt\?\): Unsupported"
    ):
        checkpoint.load(tmp_path / "text.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "empty.pt")
    torch.save({"format_version": 99, "model": {}}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer than this reslab"):
        checkpoint.load(tmp_path / "new.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a reslab checkpoint"):
        checkpoint.load(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")
    from reslab.report import load_model  # eval, predict and export: weights alone say nothing of the model

    with pytest.raises(
        CheckpointError, match=r"good.pt: no model description inside \(not written by reslab train"
    ):
        load_model(good)


def test_checkpoint_of_another_architecture_or_class_count(tiny_data, tmp_path, capsys):
    from reslab.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--out",
                str(out),
                "--quiet",
                "--set",
                *tiny_overrides(tiny_data, **{"train.epochs": 1}),
            ]
        )
        == 0
    )
    # resuming with another model or class count: one clear line naming the mismatch
    assert (
        main(["train", "--out", str(out), "--resume", "--set", "model.name=resnet14", "train.epochs=2"]) == 2
    )
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "does not fit the model of these settings (model.name 'resnet8', now" in err
    )
    from reslab.report import load_model

    state = checkpoint.load(out / "last.pt")
    state["meta"]["classes"] = state["meta"]["classes"][:5]
    checkpoint.save(state, tmp_path / "five.pt")
    with pytest.raises(
        CheckpointError, match=r"do not fit resnet8: \S+ is \(10, \d+\) in the checkpoint, \(5, "
    ):
        load_model(tmp_path / "five.pt")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run with an EMA, and an image to classify."""
    from conftest import make_dataset
    from PIL import Image

    from reslab.cli import main

    tmp = tmp_path_factory.mktemp("finished")
    overrides = tiny_overrides(make_dataset(tmp / "data"), **{"train.ema": 0.9})
    assert main(["train", "--out", str(tmp / "run"), "--quiet", "--set", *overrides]) == 0
    Image.new("L", (28, 28), 128).save(tmp / "shirt.png")
    return tmp / "run", tmp / "shirt.png"


def _snapshot_with_a_wrong_buffer(s):
    start = {
        k: s[k] for k in ("model", "optimizer", "ema", "scaler", "guard", "rng", "epoch", "batch", "sums")
    }
    start["optimizer"] = {**s["optimizer"], "state": {0: {"momentum_buffer": torch.zeros(3)}}}
    s["epoch_start"] = start


# each edit a damaged or foreign file could hold, the command that reads it, and the phrase its one line has;
# found by a fuzz of random edits (session 76): each was a traceback before
DAMAGE = {
    "class-name": (lambda s: s["meta"]["classes"].__setitem__(4, 7), "eval", "meta: classes: ["),
    "mean": (
        lambda s: s["meta"].__setitem__("mean", [0.1, 0.2]),
        "predict",
        "meta: mean: not a finite float for each of its 1 input",
    ),
    "image-size": (
        lambda s: s["meta"].__setitem__("image_size", [1, 2]),
        "export",
        "meta: image_size: [1, 2]",
    ),
    "nan-weights": (lambda s: s["ema"]["fc.bias"].fill_(math.nan), "eval", "fc.bias holds NaN or infinite"),
    "ema-missing": (
        lambda s: s["ema"].pop("fc.bias"),
        "train",
        "last.pt: checkpoint does not fit model resnet8: its EMA: 1 tensors are not in",
    ),
    "momentum-shape": (
        lambda s: s["optimizer"]["state"][0].__setitem__("momentum_buffer", torch.zeros(3)),
        "train",
        "its optimizer's momentum_buffer of parameter 0 is (3,), the parameter (",
    ),
    "history": (
        lambda s: s["history"][0].pop("epoch_seconds"),
        "train",
        "history: entry 1: lacks epoch_seconds",
    ),
    "rng": (
        lambda s: s.__setitem__("rng", s["rng"].float()),
        "train",
        "rng, cuda_rng: not the generators' states",
    ),
    "guard": (
        lambda s: s["guard"].__setitem__("lr_scale", 1e30),
        "train",
        "guard: not the divergence guard's",
    ),
    "batch": (lambda s: s.__setitem__("batch", "x"), "train", "batch: 'x', not an integer >= 0"),
    "config": (
        lambda s: s["config"].__setitem__("seed", torch.zeros(2)),
        "train",
        "config: not a mapping of",
    ),
    "tta-shift": (
        lambda s: s["config"]["train"].__setitem__("tta_shift", 10**30),
        "predict",
        "best.pt: train.tta_shift: must be smaller than the 28-pixel inputs, got 1000000000000000000000000000000",
    ),
    "epoch-start": (
        _snapshot_with_a_wrong_buffer,
        "train",
        "last.pt: the epoch's starting state does not fit model resnet8",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_checkpoint_damaged_inside_is_one_line_and_nothing_changes(finished, tmp_path, capsys, damage):
    """A checkpoint that loads but whose contents are not as reslab writes them (a hand edit, a foreign file, a
    damaged one): eval, predict, export and a resume each end in one line naming what is wrong, and leave every
    file of the run as it was."""
    from reslab.cli import main

    edit, command, phrase = DAMAGE[damage]
    run, image = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    # what each reads: a run directory's best.pt to score
    name = "last.pt" if command == "train" else "best.pt"
    state = checkpoint.load(out / name)
    edit(state)
    checkpoint.save(state, out / name)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = {
        "eval": ["eval", str(out)],
        "predict": ["predict", str(out), str(image)],
        "export": ["export", str(out), "--out", str(tmp_path / "model.pt")],
        "train": ["train", "--out", str(out), "--resume", "--quiet", "--set", "train.epochs=3"],
    }[command]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("reslab: error: ") and phrase in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "model.pt").exists()


# ------------------------------------------------------------------ injected non-finite values
@pytest.mark.parametrize("where", ["input", "gradient", "loss-inf"])
def test_guard_catches_nan_and_inf_in_inputs_gradients_and_loss(tiny_data, tmp_path, monkeypatch, where):
    import math

    from reslab import config
    from reslab.data.loader import TensorLoader
    from reslab.engine import fit

    fired = []
    real_batches = TensorLoader.batches

    def poisoned_batches(self, start=0):
        for b, (x, y) in enumerate(real_batches(self, start), start):
            if self.train and self.epoch == 1 and b == 2 and not fired:
                fired.append(where)
                if where == "input":
                    x = x.clone()
                    x[0, 0, 0, 0] = float("nan")
                elif where == "loss-inf":
                    x = x.clone()
                    x[0] = float("inf")
                else:
                    self._poison_grad = True
            yield x, y

    monkeypatch.setattr(TensorLoader, "batches", poisoned_batches)

    def on_step(run):
        if getattr(run.train_loader, "_poison_grad", False):
            run.train_loader._poison_grad = False
            shots = []

            def once(grad):  # the next backward pass only
                if shots:
                    return grad
                shots.append(1)
                return grad * float("inf")

            next(run.model.parameters()).register_hook(once)

    cfg = config.load(None, tiny_overrides(tiny_data, **{"train.epochs": 3}))
    summary = fit(cfg, tmp_path / "run", quiet=True, on_step=on_step)
    assert fired == [where]
    assert len(summary["guard_events"]) >= 1 and summary["epochs"] == 3
    rows = read_history(tmp_path / "run")
    assert all(math.isfinite(v) for r in rows for v in r.values())
