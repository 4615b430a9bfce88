"""The benchmark's pieces on small inputs: real measurements, compared side by side in the same process."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script, tiny_overrides

from reslab import baseline, bench
from reslab.cli import main
from reslab.engine.host import keep_freed_memory
from reslab.engine.precision import resolve_precision


def test_gemm_peak_is_the_faster_route_and_its_flops_over_its_median_time(monkeypatch):
    # real: any positive speed, as a busy machine may be slow
    gflops, route = bench.gemm_peak(torch.float32, n=256, repeats=2)
    assert gflops > 0 and route in ("matmul", "conv1x1")
    # timed by a stand-in clock (the 1x1 convolution's result is 4-d): the arithmetic and the choice, exactly
    monkeypatch.setattr(bench, "_median_time", lambda fn, *a, **k: 0.004 if fn().dim() == 4 else 0.008)
    assert bench.gemm_peak(torch.float32, n=256, repeats=2) == (2 * 256**3 / 0.004 / 1e9, "conv1x1")


def test_train_flops_match_the_published_costs():
    # per training image (forward x 3): ResNet-20 at 28 px 0.19 GFLOP, the notebook's ResNet-18 at 96 px 1.90
    assert 0.17e9 < bench.train_flops("resnet20", 28) < 0.20e9
    assert 1.8e9 < bench.train_flops("d2l-resnet18", 96) < 2.0e9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_gemm_routes_compute_the_same_product(dtype):
    a, b = (torch.randn(128, 128).to(dtype) for _ in range(2))
    routes = bench.gemm_routes(a, b)
    want = a.double() @ b.double()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, fn in routes.items():
        got = fn()
        if name == "conv1x1":  # (n/64, n, 8, 8): image, channel, row, column -> position x channel
            got = got.permute(0, 2, 3, 1).reshape(128, 128)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 128**0.5, msg=name)
    with pytest.raises(ValueError, match="must divide by 64"):
        bench.gemm_routes(torch.ones(100, 100), torch.ones(100, 100))
    assert bench.gemm_route(dtype, n=128)[0] in routes
    assert bench.gemm_route(dtype, n=128, name="conv1x1")[0] == "conv1x1"  # chosen before: not timed again


def bench_results(**parts) -> dict:
    """A bench JSON's minimal parts, for its table: no steps, made-up overhead and data cost; `parts` add or
    replace."""
    overhead = {"config": "c", "model": "m", "batch": 1, "engine_img_s": 9, "bare_img_s": 10, "overhead": 0.1}
    data = {
        "config": "c",
        "load_seconds": 1,
        "batches_seconds": 1,
        "model_epoch_seconds": 100,
        "fraction": 0.02,
    }
    results = {"bf16_native": True, "steps": [], "engine_overhead": overhead, "data_cost": data}
    return results | parts


def test_the_table_names_each_peak_route_and_reads_files_without_one():
    results = bench_results(
        gemm_gflops={"fp32": 386.4, "bf16": 808.0}, gemm_route={"fp32": "conv1x1", "bf16": "matmul"}
    )
    head = bench.table(results).splitlines()[0]
    assert (
        head
        == "GEMM peak at the start of this run (CPU): 386 GFLOP/s fp32 (conv1x1), 808.0 GFLOP/s bf16 (matmul)"
    )
    del results["gemm_route"]  # a file written before the routes
    assert bench.table(results).splitlines()[0].endswith("386 GFLOP/s fp32, 808.0 GFLOP/s bf16")
    results["machine"] = {"threads": 1, "gpu": None}  # since session 41 the file gives the CPU threads
    assert bench.table(results).startswith("GEMM peak at the start of this run (CPU, 1 thread):")


def test_the_table_says_when_the_threads_waited_for_a_cpu():
    peaks = {"gemm_gflops": {"fp32": 386.4, "bf16": 808.0}}
    assert "Waiting for a CPU" not in bench.table(bench_results(**peaks))  # a GPU's, or a file from before
    alone = bench.table(bench_results(**peaks, cpu_wait=0.004)).splitlines()[-1]
    assert alone == "Waiting for a CPU: the measuring threads, 0.4% of their time"
    shared = bench.table(bench_results(**peaks, cpu_wait=0.49)).splitlines()[-1]
    assert shared.startswith("Waiting for a CPU: the measuring threads, 49.0% of their time (from 20%: other")
    cause = "this process runs 4 threads on 2 CPUs: set OMP_NUM_THREADS=2"  # as the run found it
    crowded = bench.table(bench_results(**peaks, cpu_wait=0.49, cpu_wait_cause=cause)).splitlines()[-1]
    assert f"(from 20%: {cause}; these figures understate this machine" in crowded


def test_a_compiled_bare_step_updates_its_model_as_the_eager_one_does():
    """make_step(compiled=True) calls the model through torch.compile, as train.compile does; `step.model` is the
    model it steps (benchmarks/compile_step.py swaps its convolutions). A batch of 64 28-px images, as test_engine's
    tiny runs train: on a fresh machine inductor builds the kernels once, for both tests (17 s saved)."""
    eager, compiled = (bench.make_step("resnet8", 28, 64, "fp32", compiled=c) for c in (False, True))
    before = [p.detach().clone() for p in eager.model.parameters()]
    eager(), compiled()
    for e, c in zip(eager.model.parameters(), compiled.model.parameters()):
        assert torch.allclose(e, c, atol=1e-5)  # the same fresh model (seed 0), the same update, to rounding
    assert any(not torch.equal(b, e) for b, e in zip(before, eager.model.parameters()))  # a step was taken


def test_step_mfu_pairs_each_step_with_a_gemm_beside_it():
    s = bench.step_mfu("resnet8", 28, 32, "fp32", rounds=3, n=256)
    assert len(s["mfu_runs"]) == 3 and min(s["mfu_runs"]) <= s["mfu"] <= max(s["mfu_runs"])
    # any speed above zero: a busy machine is slow
    assert s["img_s"] > 0 and s["peak_gflops"] > 0 and s["gemm_calls"] >= 1
    assert s["gemm_route"] in ("matmul", "conv1x1")
    assert s["gflops"] == pytest.approx(s["img_s"] * s["train_gflop_per_image"])
    line = bench._step_line(s)  # a row of the table
    lo, hi = 100 * min(s["mfu_runs"]), 100 * max(s["mfu_runs"])  # the rounds' spread closes the row
    assert line.startswith("| resnet8 @ 28 | fp32 channels_last | 32 |") and line.endswith(
        f"| {100 * s['mfu']:.0f}% | {lo:.0f}% to {hi:.0f}% |"
    )


def test_step_throughput_and_engine_overhead():
    ips = bench.step_throughput("resnet8", 28, 32, "fp32", repeats=2)
    assert ips > 0
    o = bench.engine_overhead(batches=4, rounds=2)
    assert o["engine_img_s"] > 0 and o["bare_img_s"] > 0 and o["model"] == "resnet8" and o["rounds"] == 2
    # measured at the precision `reslab train` runs at here: bf16 on a CPU with AVX-512 BF16, else fp32
    assert o["precision"] == resolve_precision("auto", torch.device("cpu"))
    assert len(o["overhead_runs"]) == 2 and o["overhead"] == pytest.approx(sum(o["overhead_runs"]) / 2)


def test_cpu_steps_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    # glibc's defaults hand a step's freed activations back to the OS: 6,000-8,000 page faults every step here
    # (fresh zeroed 4 KiB pages). make_step, like training, keeps them; what faults is the heap still growing now
    # and then: 0 a step in most windows of 8 steps after 8 warm-ups, 300-400 in some, and once, within the whole
    # suite, 1,568. So the quietest of three windows is what must stay low.
    if not keep_freed_memory(torch.device("cpu")):
        pytest.skip("not glibc: the allocator is left as it is")
    step = bench.make_step("resnet8", 28, 256, "fp32")
    for _ in range(8):
        step()
    windows = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(8):
            step()
        windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
    assert min(windows) < 1500, windows


def test_timed_process_reports_the_process_own_peak_memory_not_its_parent():
    held = bytearray(800 * 2**20)  # the benchmark's own peak, gigabytes after its measurements in a real run
    held[::4096] = b"\1" * len(held[::4096])  # touch every page so it is resident
    seconds, out, rss_mb = baseline.timed_process(
        [sys.executable, "-c", "x = bytearray(100 * 2**20); print('ok')"]
    )
    assert out.strip() == "ok" and seconds > 0
    # its 100 MB plus Python; a process started straight from this one would report over 800
    assert 100 < rss_mb < 400, rss_mb
    with pytest.raises(RuntimeError, match="failed: .*boom"):
        baseline.timed_process([sys.executable, "-c", "raise SystemExit('boom')"])
    del held


@pytest.mark.slow
def test_seed_notebook_against_reslab_as_processes():
    result = baseline.seed_vs_reslab(limit=256, epochs=1, workers=2, rounds=2)
    assert len(result["seed_notebook_runs_s"]) == len(result["reslab_runs_s"]) == result["rounds"] == 2
    assert (
        min(result["seed_notebook_runs_s"])
        <= result["seed_notebook_seconds"]
        <= max(result["seed_notebook_runs_s"])
    )
    ratios = [a / b for a, b in zip(result["seed_notebook_runs_s"], result["reslab_runs_s"])]
    assert min(ratios) <= result["speedup"] <= max(ratios)
    assert 0 <= result["seed_notebook_test_acc"] <= 1 and 0 <= result["reslab_test_acc"] <= 1
    overhead = bench_results()["engine_overhead"] | {"overhead_runs": [0.1, -0.05, 0.125]}
    table = bench.table(
        bench_results(
            gemm_gflops={"fp32": 100.0, "bf16": 1.0},
            bf16_native=False,
            engine_overhead=overhead,
            seed_vs_reslab=result,
        )
    )
    assert "Seed notebook code vs reslab" in table and "2.0% of one epoch" in table
    assert "median of 2 alternating rounds" in table
    assert "ratios: +10.0% (rounds -5.0% to +12.5%)" in table  # how far one reading is to be trusted


@pytest.mark.parametrize("flag", ["--seed-limit", "--seed-rounds"])
def test_bench_refuses_a_seed_comparison_of_nothing_and_its_options_with_quick(flag, capsys, tmp_path):
    assert main(["bench", flag, "0"]) == 2
    assert f"{flag} must be a positive integer" in capsys.readouterr().err
    # --quick leaves the seed comparison out: its options would be ignored
    assert main(["bench", "--quick", flag, "5", "--out", str(tmp_path / "bench.json")]) == 2
    assert not (tmp_path / "bench.json").exists()
    assert (
        capsys.readouterr().err == f"reslab: error: {flag}: the seed comparison's, which --quick leaves out\n"
    )


def test_a_late_failure_keeps_the_measurements_already_written(tmp_path, monkeypatch):
    """The JSON is rewritten after each part: the seed comparison, last and longest, failing (here on purpose)
    leaves every step, the engine overhead and the data cost in the file."""
    import json

    monkeypatch.setattr(bench, "gemm_peak", lambda dtype, **kw: (100.0, "matmul"))
    monkeypatch.setattr(
        bench, "step_mfu", lambda name, size, batch, precision, cl, *a: {"model": name, "cl": cl}
    )
    monkeypatch.setattr(bench, "_step_line", lambda s: "")
    monkeypatch.setattr(bench, "engine_overhead", lambda device: {"overhead": 0.01})
    monkeypatch.setattr(bench, "data_cost", lambda device: {"fraction": 0.02})

    def broken(*a, **kw):
        raise RuntimeError("the notebook's process failed")

    monkeypatch.setattr(bench, "seed_vs_reslab", broken)
    out = tmp_path / "bench.json"
    with pytest.raises(RuntimeError, match="notebook"):
        bench.run(out, quick=False, device="cpu")
    saved = json.loads(out.read_text())
    assert len(saved["steps"]) == len(bench.CASES) * 2 * (2 if saved["bf16_native"] else 1)
    assert saved["engine_overhead"] == {"overhead": 0.01} and saved["data_cost"] == {"fraction": 0.02}
    assert "seed_vs_reslab" not in saved
    assert saved["cpu_wait"] >= 0  # the share of the measuring threads' time spent waiting for a CPU, so far


def test_profile_step_script_measures_the_loop_and_the_bare_steps(tiny_data, tmp_path):
    """benchmarks/profile_step.py, which gpu_check.sh runs on a lent GPU, trains two epochs through the engine's
    own loop: it broke once when the epoch's running sums grew and the script still reset them by hand."""
    out = tmp_path / "profile.json"
    sets = tiny_overrides(tiny_data, **{"train.batch_size": 32})
    script = Path(__file__).parents[1] / "benchmarks" / "profile_step.py"
    done = subprocess.run(
        [sys.executable, str(script), "--config", "fast", "--set", *sets, "--steps", "3", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    for side in ("engine", "bare"):
        assert result[side]["ms_per_step"] > 0 and result[side]["ops_per_step"] > 10
    # the loop adds work of its own (the batch's slice, the guard's norm), never fewer operators than bare steps
    assert result["engine"]["ops_per_step"] > result["bare"]["ops_per_step"]
    assert "operators the loop adds" in done.stdout


def test_time_to_accuracy_script_evaluates_what_each_recipe_reached(tiny_data, tmp_path):
    """benchmarks/time_to_accuracy.py (reslab bench's last part) on tiny data, the seed recipe given time to
    finish: the accuracy it reports for the seed recipe, from `reslab eval` of its checkpoint, is the run's own
    final test accuracy; bench's table gives it."""
    out = tmp_path / "tta.json"
    sets = tiny_overrides(tiny_data, **{"data.resize": 32, "train.epochs": 1})
    script = Path(__file__).parents[1] / "benchmarks" / "time_to_accuracy.py"
    done = subprocess.run(
        [sys.executable, str(script), "--budget", "600", "--set", *sets, "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    fast, seed = result["fast"], result["seed"]
    assert (
        fast["test_acc"] == fast["epochs"][-1]["test_acc"]
        and fast["wall_seconds"] > fast["epochs"][-1]["seconds"]
    )
    assert seed["exit_code"] == 0 and seed["epochs_done"] == 1 and seed["batches_into_next_epoch"] == 0
    assert seed["test_acc_at_budget"] == seed["epochs"][-1]["test_acc"]
    assert set(seed["seconds_to"]) == {"0.85", "0.9", "0.92", "0.93"}
    line = bench.table(bench_results(gemm_gflops={"fp32": 1.0, "bf16": 1.0}, time_to_accuracy=result))
    assert line.endswith(f"in the same time: 1 epoch and 0 batches of 64, {seed['test_acc_at_budget']:.4f}")


def test_step_ab_script_times_the_two_variants_it_names(capsys, monkeypatch):
    """benchmarks/step_ab.py: each variant is the recipe with its own overrides, both with the shared ones."""
    script = load_script("step_ab")
    sets = ["model.options.width=8", "train.batch_size=4", "precision=fp32"]
    argv = [
        "step_ab",
        "--config",
        "fast",
        "--a",
        "model.options.stem_width=4",
        "--b",
        "model.options.stem_width=8",
    ]
    monkeypatch.setattr(sys, "argv", [*argv, "--set", *sets, "--rounds", "2", "--steps", "1"])
    script.main()
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0].startswith("A model.options.stem_width=4: ") and lines[0].split("rounds ")[1].count(",") == 1
    )
    assert lines[1].startswith("B model.options.stem_width=8: ") and lines[2].endswith("median of 2 rounds")
    assert float(lines[2].split()[3].rstrip(",")) > 0  # B's time over A's
    stems = [
        script.variant("fast", [*sets, f"model.options.stem_width={w}"], 1).model.stem[0] for w in (4, 8)
    ]
    assert [conv.out_channels for conv in stems] == [4, 8]


def test_epoch_steps_script_times_every_step_and_counts_subnormals(tiny_data, tmp_path):
    """benchmarks/epoch_steps.py: a line per epoch with all its steps but the first timed, and the census of the
    finished net; its subnormal count is float32's (non-zero, below the smallest normal)."""
    script = load_script("epoch_steps")
    assert script.subnormals([torch.tensor([1e-40, 0.0, 1.0, -1e-39]), torch.tensor([2e-38])]) == "2 of 5"
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "epoch_steps.py"), "--out", str(out)]
        + ["--set", *tiny_overrides(tiny_data), "--flush"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ") and " steps, median " in line]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1", "epoch 2"]
    # 512 images in batches of 64: 8 steps an epoch, 7 intervals between them
    assert all(e.split(": ")[1].startswith("7 steps, median ") for e in epochs), epochs
    assert lines[-2].startswith("final test accuracy ") and (out / "last.pt").exists()
    assert lines[-1].startswith("subnormal numbers: weights 0 of ")


def test_relu_flips_script_finds_the_relus_that_move_a_gradient(tmp_path, monkeypatch):
    """benchmarks/relu_flips.py: one fp32 step against fp64 in each layout and on 1 and 2 threads. A gradient that
    moved by more than fp32's rounding did so through a ReLU whose input fell on the other side of 0."""
    script = load_script("relu_flips")
    out = tmp_path / "flips.json"
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["relu_flips.py", "--batch", "16", "--out", str(out)])
    script.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["channels_last"], r["threads"]) for r in rows] == [
        (False, 1),
        (False, 2),
        (True, 1),
        (True, 2),
    ]
    for r in rows:
        assert 0 < r["worst_gradient_error"] < 1e-3 or r["flipped_relus"], r
        assert all(abs(float(v)) < 1e-3 for values in r["flipped_relus"].values() for v in values), r
    assert torch.get_num_threads() == threads  # the test process keeps its threads


def test_every_case_the_reliability_report_runs_exists():
    """docs/reliability.md lists what benchmarks/reliability_report.py runs: a renamed test would drop from it."""
    import ast

    root = Path(__file__).parents[1]
    report = load_script("reliability_report")
    for case in report.SELECT:
        path, _, name = case.partition("::")
        tree = ast.parse((root / path).read_text())
        tests = {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
        assert (name in tests) if name else tests, case


@pytest.mark.slow
def one_fuzz_case(out, capsys, monkeypatch, *args):
    """benchmarks/resume_fuzz.py run for one case into `out`, which must end the same bits: (the script as a
    module, its printed lines, the case's row of results.json)."""
    script = load_script("resume_fuzz")
    monkeypatch.setattr(sys, "argv", ["resume_fuzz", "--out", str(out), "--cases", "1", *args])
    with pytest.raises(SystemExit) as done:
        script.main()
    lines = capsys.readouterr().out.splitlines()
    assert done.value.code == 0 and lines[-1] == "1 of 1 cases the same bits after the kill and resume", lines
    (row,) = json.loads((out / "results.json").read_text())
    return script, lines, row


def test_resume_fuzz_script_kills_resumes_and_compares_the_runs(tiny_data, tmp_path, capsys, monkeypatch):
    """benchmarks/resume_fuzz.py: a drawn recipe trained whole, then killed and resumed, ends the same bits; a run
    that differs is named by what differs."""
    fixed = [f"data.root={tiny_data}", "model.name=resnet8", "train.epochs=2", "train.ema=0.9"]
    script, out, row = one_fuzz_case(tmp_path / "fuzz", capsys, monkeypatch, "--seed", "3", "--set", *fixed)
    assert row["result"] == "same" and row["killed"] and row["overrides"][-4:] == fixed
    case = tmp_path / "fuzz" / "case0"
    a, b = script.outcome(case / "whole"), script.outcome(case / "killed")
    assert script.same(a, b) and a["best.pt"][2] is not None  # the EMA's weights are compared too
    first = next(iter(b["last.pt"][1]))
    b["last.pt"][1][first] = b["last.pt"][1][first] + 1
    assert not script.same(a["last.pt"], b["last.pt"]) and script.same(a["metrics"], b["metrics"])


def test_resume_fuzz_with_nan_rolls_back_both_runs_alike(tiny_data, tmp_path, capsys, monkeypatch):
    """--nan: the run whole and the one killed and resumed meet the same NaN step, roll back, and end the same."""
    fixed = [f"data.root={tiny_data}", "model.name=resnet8", "train.epochs=2"]
    _, out, row = one_fuzz_case(tmp_path / "fuzz", capsys, monkeypatch, "--nan", "--set", *fixed)
    assert row["result"] == "same" and row["rollbacks"] == 1 and 0 <= int(row["nan_at"]) < 16
    assert f"NaN at step {row['nan_at']} (1 rollbacks)" in out[0]


def test_resume_fuzz_tells_a_kill_under_torchrun_from_an_error():
    """torchrun exits 1 when a rank is SIGKILLed, as for any failure: its report names the signal's exit code."""
    script = load_script("resume_fuzz")

    def done(code: int, err: str = "") -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], code, "", err)

    assert script.was_killed(done(-9)) and not script.was_killed(done(0)) and not script.was_killed(done(2))
    assert script.was_killed(
        done(1, "E1206 api.py:1002] failed (exitcode: -9) local_rank: 0 (pid: 1) of binary")
    )
    assert not script.was_killed(done(1, "reslab: error: unknown model 'nope'"))
    assert script.last_line(done(1)) == "exit code 1, nothing on stderr"
