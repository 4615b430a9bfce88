"""gloo processes on the CPU under torchrun: the same training as one process with the same global batch, exact
resumes on 2 and 3 ranks, the guard across ranks, a study."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from reslab import cli
from reslab.cli import main
from reslab.engine import checkpoint
from reslab.engine.precision import bf16_native
from reslab.errors import ReslabError
from reslab.runs import read_history, without_timings

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


def launch(out, data, nproc, extra=None, resume=False, kill_at=None, epochs=3, nan_at=None):
    env = dict(os.environ, RESLAB_DIST_TIMEOUT="120", OMP_NUM_THREADS="1")
    if kill_at:
        env["RESLAB_KILL_AT"] = kill_at
    if nan_at:
        env["RESLAB_NAN_AT"] = nan_at
    overrides = tiny_overrides(data, **{"train.epochs": epochs, **(extra or {})})
    args = ["train", "--out", str(out), "--quiet"] + (["--resume"] if resume else ["--set", *overrides])
    if nproc == 1:
        cmd = [sys.executable, "-m", "reslab", *args]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "reslab", *args]
    # a hung rank fails the test instead of hanging CI
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def assert_same_run(out: Path, whole: Path) -> None:
    """The run in `out` (stopped and resumed) ended as the one in `whole`: the same metrics, timings aside, and the
    same weights, bit for bit."""
    assert without_timings(read_history(out)) == without_timings(read_history(whole))
    a, b = (checkpoint.load(d / "last.pt")["model"] for d in (whole, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_data, tmp_path):
    held_out = {"data.val": 75}  # the validation set too is dealt out over the ranks
    one = launch(tmp_path / "one", tiny_data, 1, held_out)
    two = launch(tmp_path / "two", tiny_data, 2, held_out)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = read_history(tmp_path / "one"), read_history(tmp_path / "two")
    assert [m["world_size"] for m in m2] == [2, 2, 2] and m1[0]["world_size"] == 1
    epoch_lines = [line for line in two.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and two.stdout.count("done: test acc") == 1  # only rank 0 prints
    # the same global batches and lr; only BatchNorm sees 32 instead of 64 images per batch:
    # stated tolerance: training loss within 10% per epoch, final test accuracy within 0.1
    for a, b in zip(m1, m2):
        assert abs(a["train_loss"] - b["train_loss"]) / a["train_loss"] < 0.10
    assert abs(m1[-1]["test_acc"] - m2[-1]["test_acc"]) < 0.1
    # the test and validation sets are covered exactly once over both ranks: accuracies are multiples of 1/256, 1/75
    assert abs(m2[-1]["test_acc"] * 256 - round(m2[-1]["test_acc"] * 256)) < 1e-6
    assert abs(m2[-1]["val_acc"] * 75 - round(m2[-1]["val_acc"] * 75)) < 1e-6
    # again into the same directory: every rank refuses before training, the run stays as it was
    before = (tmp_path / "two" / "last.pt").read_bytes()
    again = launch(tmp_path / "two", tiny_data, 2, held_out)
    assert again.returncode != 0 and "two already holds a run; continue it with --resume" in again.stderr
    assert (tmp_path / "two" / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_sync_bn_on_cpu_is_a_clear_error(tiny_data, tmp_path):
    done = launch(tmp_path / "sync", tiny_data, 2, {"train.sync_bn": True}, epochs=1)
    assert done.returncode != 0
    # each rank prints the one line; torchrun's own report of the failed ranks names it too, from the file it
    # gives each rank for that (TORCHELASTIC_ERROR_FILE), where it said "To enable traceback see: <a link>"
    assert "reslab: error: train.sync_bn needs CUDA devices" in done.stderr
    said = re.findall(r"traceback : (.*)", done.stderr)
    assert len(said) == 2 and all(line.startswith("reslab: error: train.sync_bn needs CUDA") for line in said)


@pytest.mark.slow
def test_kill_then_resume_under_torchrun_and_with_another_world_size(tiny_data, tmp_path):
    # dropout draws from each rank's own generator: the resume must give every rank its own back
    drop = {"model.options.dropout": 0.2}
    whole = launch(tmp_path / "whole", tiny_data, 2, drop)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "run"
    # rank 0 dies in epoch 2; rank 1 is stopped by torchrun
    killed = launch(out, tiny_data, 2, drop, kill_at="step:12")
    assert killed.returncode != 0
    saved = checkpoint.load(out / "last.pt")
    assert saved["epoch"] == 1
    ranks = saved["rank_rng"]  # seeded seed + rank: the ranks' streams differ
    assert len(ranks) == 2 and not torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    assert torch.equal(ranks[0]["rng"], saved["rng"])
    shutil.copytree(out, tmp_path / "single")
    resumed = launch(out, tiny_data, 2, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["world_size"] for m in read_history(out)] == [2, 2, 2]
    # bit for bit the run that was never killed (gloo's sum of two ranks is exact, one thread each)
    a, b = (checkpoint.load(d / "last.pt")["model"] for d in (tmp_path / "whole", out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same run continued by one process: the global batch stays 64
    single = launch(tmp_path / "single", tiny_data, 1, resume=True)
    assert single.returncode == 0, single.stderr
    assert [m["world_size"] for m in read_history(tmp_path / "single")] == [2, 1, 1]


@pytest.mark.slow
def test_a_rank_whose_peer_died_says_so_in_one_line(tiny_data, tmp_path):
    """Rank 0 killed (or stopped by its own error, a full disk): rank 1's next collective lost it and printed a
    traceback of 30 lines ending in gloo's "Connection closed by peer", below rank 0's one line."""
    out = tmp_path / "run"
    killed = launch(out, tiny_data, 2, kill_at="step:12:0")  # rank 0 alone, in epoch 2
    assert killed.returncode != 0
    assert "[rank1]" not in killed.stderr  # torchrun's prefix of a rank's traceback
    said = r"rank 1 stopped: another rank left \((Connection (closed|reset) by peer|Broken pipe)\); that rank's message"
    assert re.search(said, killed.stderr), killed.stderr[-3000:]
    assert checkpoint.load(out / "last.pt")["epoch"] == 1
    resumed = launch(out, tiny_data, 2, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def on_two_machines(dirs: list[Path], args: list[str]) -> list[tuple[int, str]]:
    """The README's command for two machines, one rank each: two torchrun agents meeting at a c10d rendezvous on a
    free port of this machine, each in its own working directory. Each machine's (exit code, output)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RESLAB_DIST_TIMEOUT="300", OMP_NUM_THREADS="1")
    rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=test"]
    cmd = [TORCHRUN, "--nnodes=2", "--nproc_per_node=1", *rendezvous, "-m", "reslab", *args]
    logs = [d.parent / f"{d.name}.log" for d in dirs]
    machines = []
    for d, log in zip(dirs, logs):
        with open(log, "w") as f:
            machines.append(subprocess.Popen(cmd, cwd=d, env=env, stdout=f, stderr=subprocess.STDOUT))
    return [(m.wait(timeout=600), log.read_text()) for m, log in zip(machines, logs)]


@pytest.mark.slow
def test_two_machines_train_as_two_ranks_and_one_that_lacks_the_run_stops_both_at_once(tiny_data, tmp_path):
    """Each machine's --out here is its own ("run" in its own directory), not storage both see: rank 0 writes the
    run where it runs. Resumed, the rank on the machine without it stopped with its line before the ranks met,
    and the other waited in the join for RESLAB_DIST_TIMEOUT (10 minutes), to end in a traceback of
    DistStoreError; now it stops as soon as the first has, quoting it."""
    whole = launch(tmp_path / "whole", tiny_data, 2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    overrides = tiny_overrides(tiny_data, **{"train.epochs": 3})
    trained = on_two_machines(dirs, ["train", "--out", "run", "--quiet", "--set", *overrides])
    assert [code for code, _ in trained] == [0, 0], trained
    # rank 0 is on either machine: torchrun's rendezvous numbers them
    (run,) = [d / "run" for d in dirs if (d / "run").exists()]
    a, b = (checkpoint.load(d / "last.pt")["model"] for d in (tmp_path / "whole", run))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same bits as two ranks on one machine
    before = (run / "last.pt").read_bytes()
    resumed = on_two_machines(dirs, ["train", "--out", "run", "--resume", "--set", "train.epochs=4"])
    (lacks,) = [out for d, (_, out) in zip(dirs, resumed) if not (d / "run").exists()]
    (holds,) = [out for d, (_, out) in zip(dirs, resumed) if (d / "run").exists()]
    assert all(code != 0 for code, _ in resumed)
    why = (
        "cannot resume: run holds no run (no config.yaml, no last.pt): on several machines, --out must be a "
    )
    assert f"reslab: error: {why}" in lacks
    said = re.search(r"reslab: error: rank (\d) stopped: rank (\d) failed before the ranks met: (.*)", holds)
    assert said and said[1] != said[2] and said[3].startswith(why), holds[-3000:]
    assert "DistStoreError" not in holds and "reslab/cli.py" not in holds  # no traceback of the rank's
    assert (run / "last.pt").read_bytes() == before


def test_a_rank_that_stops_before_the_ranks_meet_stops_those_that_wait_for_it(monkeypatch):
    """torchrun's agent serves a store to every rank of a run (here one of this process's own), where the ranks
    say they came to train and, before they meet, that one stopped. An attempt of torchrun's --max-restarts does
    not read the last one's word."""
    from torch.distributed import TCPStore

    from reslab.engine import dist

    store = TCPStore("localhost", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    monkeypatch.setenv("RANK", "1")

    def attempt(n: int) -> None:
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(n))

    attempt(0)
    dist.tell_others("reslab: error: --config x.yaml: no such file")
    dist.tell_others("reslab: error: a second line")  # the first rank to stop is the one quoted
    said = r"^rank 0 stopped: rank 1 failed before the ranks met: --config x.yaml: no such file$"
    with pytest.raises(ReslabError, match=said) as stopped:
        dist.wait_for_ranks(0, 3, 300)
    assert stopped.value.after == 1  # torchrun names the rank that failed first its root cause
    attempt(1)  # a rank that waits already: the one that stops stays until it has read why
    waits = []
    other = threading.Thread(
        target=lambda: waits.append(pytest.raises(ReslabError, dist.wait_for_ranks, 0, 2, 300))
    )
    other.start()
    while store.add("reslab/run/1/ready", 0) < 1:
        time.sleep(0.01)
    dist.tell_others("reslab: error: --config x.yaml: no such file")
    assert store.add("reslab/run/1/told", 0) == 1
    other.join()
    assert waits and waits[0].match(said)
    attempt(2)  # every rank comes
    other = threading.Thread(target=dist.wait_for_ranks, args=(1, 2, 300))
    other.start()
    dist.wait_for_ranks(0, 2, 300)
    other.join()
    attempt(3)
    with pytest.raises(
        ReslabError,
        match=r"^rank 0 stopped: 1 of the 2 ranks did not come to train in RESLAB_DIST_TIMEOUT=0.2 s$",
    ):
        dist.wait_for_ranks(0, 2, 0.2)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")  # another launcher: rank 0's join serves the store
    dist.wait_for_ranks(0, 2, 0.01)
    port = store.port
    del store  # the store's machine went
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with pytest.raises(
        ReslabError, match=r"^rank 0 stopped: torchrun's store went away before the ranks met"
    ):
        dist.wait_for_ranks(0, 2, 0.5)


def test_an_error_line_goes_into_the_file_torchrun_reads_each_failed_ranks_reason_from(monkeypatch, tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert main(["train", "--print-config", "--set", "train.epochs=0"]) == 2
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(tmp_path / "error.json"))
    assert failure.message == "reslab: error: train.epochs: must be > 0, got 0"
    # torchrun's root cause is the earliest failure, to the second: a rank that lost another fails a second later
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "peer.json"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    monkeypatch.setattr("reslab.cli.import_modules", lambda specs: (_ for _ in ()).throw(gone))
    assert cli._main(["models"]) == 1  # main() would leave as a torchrun worker does (os._exit)
    peer = ProcessFailure(local_rank=1, pid=2, exitcode=1, error_file=str(tmp_path / "peer.json"))
    assert peer.message.startswith(
        "reslab: error: rank 1 stopped: another rank left (Connection closed by peer)"
    )
    assert peer.timestamp > failure.timestamp


def test_an_error_line_is_one_write_so_the_ranks_lines_do_not_splice(monkeypatch):
    """Under torchrun every rank may print the same error at the same moment. print writes the line, then its
    newline, and two ranks' lines spliced into one ("...the shortcut sees xreslab: error: ..."; a fuzz of config
    keys under torchrun found it). One write of a short line to a pipe is not split."""
    writes = []

    class Stderr:
        def write(self, text):
            writes.append(text)
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Stderr())
    assert cli._main(["train", "--set", "optim.lr=-1"]) == 2
    assert writes == ["reslab: error: optim.lr: must be > 0, got -1.0\n"]


def test_a_dist_timeout_that_is_not_a_number_of_seconds_is_refused(monkeypatch):
    """int() of the variable: "abc" was a ValueError traceback on every rank, "0" or "-5" a timeout that every
    collective would miss; "2.5" was refused."""
    from reslab.engine import dist

    for bad in ("abc", "0", "-5", "nan", "inf"):
        monkeypatch.setenv("RESLAB_DIST_TIMEOUT", bad)
        with pytest.raises(
            ReslabError, match=f"^RESLAB_DIST_TIMEOUT must be a number of seconds > 0, got '{bad}'$"
        ):
            dist.timeout_seconds()
    monkeypatch.setenv("RESLAB_DIST_TIMEOUT", "2.5")
    assert dist.timeout_seconds() == 2.5
    monkeypatch.delenv("RESLAB_DIST_TIMEOUT")
    assert dist.timeout_seconds() == 600


def test_a_collective_that_timed_out_is_one_line(monkeypatch, capsys):
    """A hung rank (SIGSTOP'd rank 0, checked by hand): after RESLAB_DIST_TIMEOUT the others' gloo collective
    raises, and each printed a traceback; now one line. Outside torchrun the error is not ours to word."""
    from reslab import cli, commands

    def hangs(args):
        raise RuntimeError(
            "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
            "10000ms for recv operation to complete"
        )

    monkeypatch.setattr(commands, "cmd_models", hangs)
    monkeypatch.setenv("RESLAB_DIST_TIMEOUT", "10")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="Timed out waiting"):
        cli._main(["models"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli._main(["models"]) == 1
    assert capsys.readouterr().err == (
        "reslab: error: rank 1 stopped: no answer from another rank in RESLAB_DIST_TIMEOUT=10 s: it hangs, "
        "or waits elsewhere\n"
    )
    # the join, launched without torchrun's agent (rank 0 serves the store): a rank that never came
    joined = "wait timeout after 10000ms, keys: /default_pg/0//cpu//0/1"
    monkeypatch.setattr(
        commands, "cmd_models", lambda args: (_ for _ in ()).throw(torch.distributed.DistStoreError(joined))
    )
    assert cli._main(["models"]) == 1
    assert capsys.readouterr().err == (
        "reslab: error: rank 1 stopped: not every rank joined in RESLAB_DIST_TIMEOUT=10 s: one stopped before "
        "(its own message says why), or cannot reach MASTER_ADDR:MASTER_PORT\n"
    )


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tiny_data, tmp_path):
    """A scheduler's SIGTERM (or Ctrl-C) goes to torchrun, which passes SIGTERM to each rank. The ranks had
    torchrun's default handling and died wherever they were: the last saved epoch end was all a resume had, and a
    rank killed inside a checkpoint write left its temporary file (2.4 MB for fast.yaml) behind. Now the ranks
    agree on a step and write one checkpoint together; the resumed run ends in the same bits."""
    import signal

    whole = launch(tmp_path / "whole", tiny_data, 2, epochs=6)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, **{"train.epochs": 6})
    proc = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "reslab", "train", "--out", str(out)]
        + ["--set", *overrides],
        env=dict(os.environ, RESLAB_DIST_TIMEOUT="120", OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # the first epoch line: training is under way
    while line and not line.startswith("epoch"):
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    said = f"reslab: error: interrupted by SIGTERM; saved {out / 'last.pt'}; continue with: the same torchrun command, with train --out"
    if proc.returncode == 0 and said not in err:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode != 0 and err.count(said) == 1  # rank 0 says it for both
    assert not list(out.glob(".*.tmp"))
    saved = checkpoint.load(out / "last.pt")
    assert len(saved["rank_rng"]) == 2 and saved["epoch"] < 6  # stopped early: within an epoch or at its end
    resumed = launch(out, tiny_data, 2, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, tmp_path / "whole")


@pytest.mark.slow
def test_micro_batches_make_the_steps_of_ranks_that_see_the_same_images(tiny_data, tmp_path):
    """train.accum_steps in one process is the step of as many ranks, each rank's share one micro-batch: the same
    images through each BatchNorm, the same weights and running statistics (without augmentation, which each rank
    draws for itself).
    Under torchrun the ranks accumulate too, and all-reduce once, after their last micro-batch."""
    weights = {}
    for name, nproc, accum, limit in (
        ("one-2", 1, 2, 256),  # 4 steps
        ("two-1", 2, 1, 256),
        ("one-4", 1, 4, 64),  # 1 step
        ("two-2", 2, 2, 64),
        ("one-2-short", 1, 2, 64),
    ):
        extra = {"data.flip": False, "data.limit": limit, "train.accum_steps": accum}
        done = launch(tmp_path / name, tiny_data, nproc, extra, epochs=1)
        assert done.returncode == 0, done.stderr[-3000:]
        state = checkpoint.load(tmp_path / name / "last.pt")["model"]
        # and BatchNorm's running statistics: DDP keeps rank 0's, micro-batches the first one's
        weights[name] = torch.cat([v.double().flatten() for v in state.values()])
    assert torch.equal(weights["one-2"], weights["two-1"])
    # the 4 gradients summed in another order: after one step the weights differ by a rounding. After more, a ReLU
    # whose input rounded to the other side of 0 passes another gradient, and the steps after amplify it: more
    # than 1e-5 after 4 steps on an AVX-512 EPYC (benchmarks/relu_flips.py shows one step's flips)
    assert torch.allclose(weights["one-4"], weights["two-2"], atol=1e-6)
    # BatchNorm saw other images
    assert not torch.allclose(weights["one-2-short"], weights["one-4"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not bf16_native(torch.device("cpu")), reason="bf16 is emulated on this CPU: far too slow")
def test_micro_batches_in_bf16_make_the_steps_of_ranks_bit_for_bit(tiny_data, tmp_path):
    """In bf16 autocast too, one process in 2 micro-batches ends as 2 ranks, weights and running statistics bit for
    bit: each micro-batch's forward casts as each rank's does, and weighting a loss by its share (1/2) and DDP's
    mean over 2 ranks scale by a power of two, which rounds nothing."""
    weights = []
    for name, nproc, accum in (("one-2", 1, 2), ("two-1", 2, 1)):
        extra = {"data.flip": False, "data.limit": 256, "train.accum_steps": accum, "precision": "bf16"}
        done = launch(tmp_path / name, tiny_data, nproc, extra, epochs=1)
        assert done.returncode == 0, done.stderr[-3000:]
        state = checkpoint.load(tmp_path / name / "last.pt")["model"]
        weights.append(torch.cat([v.double().flatten() for v in state.values()]))
    assert torch.equal(*weights)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_a_run_resumed_on_three_ranks_ends_the_same_bits(tiny_data, tmp_path, accum):
    """DDP lays its gradient buckets out again after its first step, and with 3 ranks the layout decides the
    order in which the ranks' gradients are added: a resumed run primes its buckets (fit) so that its first
    step all-reduces as the run never stopped did. Unprimed, its weights differed in their last bits. With
    micro-batches the first all-reduce comes at the last one of the step, and priming still matches it."""
    three = {"train.batch_size": 66, "train.accum_steps": accum}  # 7 steps an epoch, 22 images a rank
    whole = launch(tmp_path / "whole", tiny_data, 3, three, epochs=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "run"
    killed = launch(out, tiny_data, 3, three, epochs=2, kill_at="step:10")  # in epoch 2, after last.pt of 1
    assert killed.returncode != 0 and checkpoint.load(out / "last.pt")["epoch"] == 1
    resumed = launch(out, tiny_data, 3, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, tmp_path / "whole")


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_under_torchrun_keeps_every_ranks_share_of_the_epochs_metrics(
    tiny_data, tmp_path
):
    """last.pt written mid-epoch (train.checkpoint_every) holds every rank's loss and accuracy sums so far, so the
    resumed epoch's training loss and accuracy are the uninterrupted run's (a process that resumes it alone adds
    to all of them: restore() leaves them to rank 0)."""
    mid = {"train.checkpoint_every": 3}
    whole = launch(tmp_path / "whole", tiny_data, 2, mid, epochs=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "run"
    # killed in epoch 2, after its batch-3 checkpoint
    killed = launch(out, tiny_data, 2, mid, kill_at="step:13", epochs=2)
    saved = checkpoint.load(out / "last.pt")
    assert killed.returncode != 0 and saved["batch"] == 3
    assert saved["sums"][2] == 3 * 64  # the images of 3 global batches of 64, both ranks' halves
    shutil.copytree(out, tmp_path / "single")
    resumed = launch(out, tiny_data, 2, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timings(read_history(out)) == without_timings(read_history(tmp_path / "whole"))
    # finished by one process: its epoch 2 counts all 512 images, the 192 before the resume among them
    single = launch(tmp_path / "single", tiny_data, 1, resume=True)
    assert single.returncode == 0, single.stderr
    rows = read_history(tmp_path / "single")
    assert [m["world_size"] for m in rows] == [2, 1]
    correct = rows[1]["train_acc"] * 512
    assert abs(correct - round(correct)) < 1e-9 and 0 < correct <= 512


@pytest.mark.slow
def test_a_nan_on_one_rank_rolls_back_every_rank_and_so_does_a_run_resumed_mid_epoch(tiny_data, tmp_path):
    """NaN inputs on rank 1 alone: the ranks' summed loss and gradient norm make both roll the epoch back together
    (none waits alone in an all-reduce). A run killed mid-epoch and resumed meets the same NaN after its resume
    point: it rolls back to the epoch's start held in its last.pt, each rank with its own generators as they were
    then (dropout draws from them), and ends the same bits as the run never killed."""
    mid = {"train.checkpoint_every": 3, "model.options.dropout": 0.2}
    # 8 steps an epoch: global step 12 is epoch 2's fifth, after its batch-3 checkpoint
    whole = launch(tmp_path / "whole", tiny_data, 2, mid, epochs=2, nan_at="12:1")
    assert whole.returncode == 0, whole.stderr[-3000:]
    # one warning: only rank 0 prints
    assert whole.stderr.count("warning: non-finite loss (nan) at step 12 in epoch 2; restored") == 1
    events = json.loads((tmp_path / "whole" / "summary.json").read_text())["guard_events"]
    assert [(e["epoch"], e["lr_scale"]) for e in events] == [(2, 0.5)]
    out = tmp_path / "run"
    killed = launch(out, tiny_data, 2, mid, epochs=2, kill_at="step:12")  # after step 11
    assert killed.returncode != 0 and checkpoint.load(out / "last.pt")["batch"] == 3
    resumed = launch(out, tiny_data, 2, resume=True, nan_at="12:1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["guard_events"] == events
    assert_same_run(out, tmp_path / "whole")


@pytest.mark.slow
def test_a_study_trains_its_runs_under_torchrun_and_rank_0_reports(tiny_data, tmp_path):
    """A study's runs share one process group (a second after the first is destroyed often cannot form: the
    second run's ranks timed out connecting); every rank trains each run, rank 0 alone measures the nets and
    writes the study's files, and the study run again skips what it has."""
    env = dict(os.environ, RESLAB_DIST_TIMEOUT="120", OMP_NUM_THREADS="1")
    out = tmp_path / "study"
    overrides = tiny_overrides(tiny_data, **{"train.epochs": 1})
    overrides = [o for o in overrides if not o.startswith("model.name=")]  # the study names the models
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "reslab", "study", "degradation"]
    cmd += ["--depths", "8", "--out", str(out), "--set", *overrides]
    for _ in range(2):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("wrote ") == 1 and "| plain8 |" in done.stdout
    assert done.stdout.count("[1/2]") == 0  # the second time: both runs were done
    payload = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in payload["runs"]] == ["plain8", "resnet8"]
    for name in ("plain8-s0", "resnet8-s0"):
        assert [m["world_size"] for m in read_history(out / "runs" / name)] == [2]


TWO_FITS = """
import os
import sys
import torch.distributed as dist
from reslab import config
from reslab.engine import fit

groups = []
for lr in (0.05, 0.1):
    cfg = config.load("fast", sys.argv[2:] + [f"optim.lr={lr}"])
    fit(cfg, f"{sys.argv[1]}/lr{lr}")
    groups.append(dist.distributed_c10d._get_default_group() if dist.is_initialized() else None)
assert groups[0] is not None and groups[1] is groups[0], groups
print("one group", dist.get_rank(), flush=True)
os._exit(0)  # as README advises: a gloo thread can abort a torchrun worker that finalizes (the CLI does the same)
"""


@pytest.mark.slow
def test_a_script_that_calls_fit_twice_under_torchrun_trains_both_in_one_process_group(tiny_data, tmp_path):
    # fit() left the group after each run, and the next run's ranks then hung connecting in half the tries
    (tmp_path / "two_fits.py").write_text(TWO_FITS)
    env = dict(os.environ, RESLAB_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(tmp_path / "two_fits.py"), str(tmp_path)]
    cmd += tiny_overrides(tiny_data, **{"train.epochs": 1})
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    said = sorted(line for line in done.stdout.splitlines() if line.startswith("one group"))
    assert said == ["one group 0", "one group 1"]
    assert len([line for line in done.stdout.splitlines() if line.startswith("epoch ")]) == 2  # rank 0's
    for lr in (0.05, 0.1):
        assert [m["world_size"] for m in read_history(tmp_path / f"lr{lr}")] == [2]


SIGNAL_WHILE_LEAVING = """
import importlib
import os
import signal
import sys
from reslab import config
from reslab.engine import Interrupted, fit

fit_module = importlib.import_module("reslab.engine.fit")  # reslab.engine's `fit` is the function
write_outputs = fit_module._write_outputs


def outputs(run, draw):
    if run.interrupted:  # saved: torchrun's own SIGTERM comes as this rank leaves
        print("signalled", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    write_outputs(run, draw)


def on_step(run):
    if run.epoch == 1 and run.batch == 2:
        os.kill(os.getpid(), signal.SIGTERM)


fit_module._write_outputs = outputs
try:
    fit(config.load(None, sys.argv[2:]), sys.argv[1], quiet=True, on_step=on_step)
except Interrupted as e:
    print("interrupted", e, flush=True)
os._exit(0)
"""


@pytest.mark.slow
def test_a_signal_that_comes_as_the_ranks_leave_with_their_checkpoint_lets_them_say_so(tiny_data, tmp_path):
    """On two machines, torchrun's agent that served the store stops with its ranks; the other machine's agent
    then loses the store and sends its ranks SIGTERM too, ~0.2 s after the ranks agreed to stop and saved. fit()
    put the previous handlers back before it drew curves.png: the signal killed rank 0 before it said it had
    saved (in 3 of 4 tries of the two-machine command where the machine serving the store held rank 1)."""
    (tmp_path / "leave.py").write_text(SIGNAL_WHILE_LEAVING)
    env = dict(os.environ, RESLAB_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(tmp_path / "leave.py"), str(tmp_path / "run")]
    done = subprocess.run(
        cmd + tiny_overrides(tiny_data), env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines.count("signalled") == 2 and len([x for x in lines if x.startswith("interrupted")]) == 2, (
        lines
    )
    saved = checkpoint.load(tmp_path / "run" / "last.pt")
    assert (saved["epoch"], saved["batch"]) == (1, 3)  # the ranks agree at the step after the signal's


def test_a_torchrun_worker_leaves_through_os_exit_with_its_code(monkeypatch, tmp_path):
    # gloo worker threads outlive the run (torch.distributed.nn, imported by DDP, holds the process group), and
    # one that drops a finished all-reduce while Python finalizes aborts the process: a worker must end without
    # finalizing
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert exits == []  # a single process ends as usual
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert exits == [2]


SPARE = """
from torch import nn
from reslab.models import register


@register("spare")
class Spare(nn.Module):  # a model of your own with a layer its forward never calls
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, num_classes))
        self.spare = nn.Linear(4, 4)

    def forward(self, x):
        return self.body(x)
"""


@pytest.mark.slow
def test_a_model_of_your_own_with_an_unused_parameter_trains_under_torchrun(tiny_data, tmp_path):
    # DDP fails at the second step unless told of parameters without gradients; reslab finds them first
    (tmp_path / "spare_model.py").write_text(SPARE)
    env = dict(os.environ, RESLAB_DIST_TIMEOUT="120", OMP_NUM_THREADS="1")
    sets = tiny_overrides(tiny_data, **{"model.name": "spare", "train.epochs": 2})
    runs = {}
    for n in (1, 2):
        args = [
            "-m",
            "reslab",
            "train",
            "--import",
            "spare_model",
            "--out",
            f"r{n}",
            "--quiet",
            "--set",
            *sets,
        ]
        cmd = (
            [sys.executable, *args] if n == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={n}", *args]
        )
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = checkpoint.load(tmp_path / f"r{n}" / "last.pt")
    assert [m["world_size"] for m in read_history(tmp_path / "r2")] == [2, 2]
    for key in ("spare.weight", "spare.bias"):  # never updated, as in one process
        assert runs[2]["model"][key].equal(runs[1]["model"][key])


def test_a_group_the_script_joined_that_cannot_carry_the_runs_tensors_is_one_line_before_any_write(
    tiny_data, tmp_path, monkeypatch
):
    # a script's own group, of a backend for another device (nccl; here cuda:gloo, which the CPU build can form),
    # reached the first all-reduce with the run's tensors
    import torch.distributed as tdist

    from reslab import config
    from reslab.engine import dist, fit

    assert dist.carries("gloo", "cpu") and dist.carries("gloo", "cuda") and dist.carries("nccl", "cuda")
    assert not dist.carries("nccl", "cpu") and dist.carries("cpu:gloo,cuda:nccl", "cpu")
    assert not dist.carries("cuda:gloo", "cpu") and dist.carries("cuda:gloo", "cuda")
    tdist.init_process_group(
        "cuda:gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        # as torchrun's 2 ranks would say; the run stops before talking
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(
            ReslabError, match=r"^this process's group \(backend cuda:gloo\) cannot carry cpu"
        ):
            fit(config.load("fast", tiny_overrides(tiny_data)), tmp_path / "run")
    finally:
        tdist.destroy_process_group()
    assert not (tmp_path / "run").exists()
