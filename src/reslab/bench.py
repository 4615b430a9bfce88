"""`reslab bench`: training-step throughput and MFU against a GEMM peak measured in the same run, engine
overhead, and the seed notebook's code against reslab as whole processes. Every ratio compares two things
measured side by side in one run; times are medians."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .baseline import seed_vs_reslab, time_to_accuracy
from .config import Config, OptimConfig, load
from .data import input_side
from .data.fashion_mnist import TRAIN_IMAGES
from .engine.host import cpu_wait_seconds, crowding_cause, set_up, wait_share
from .engine.optim import make_optimizer
from .engine.precision import autocast, bf16_native, memory_format, resolve_device, resolve_precision
from .engine.run import model_side, speed_up
from .errors import ReslabError
from .files import make_file_dir, write_text
from .history import CROWDED
from .models import build_model, summary
from .studies.common import machine

CASES = (("d2l-resnet18", 96), ("resnet20", 28), ("resnet56", 28))
CPU = torch.device("cpu")


def wait(device: torch.device) -> None:
    """Wait for the kernels queued on a GPU, so that a timing counts them; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired(fns: dict, rounds: int, warmup: int = 2, device: torch.device = CPU) -> list[dict]:
    """Seconds of one call of each function per round, back to back in alternating order (the last first in
    round 0), after `warmup` calls each: a machine that speeds up or slows down weighs on both sides of a round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wait(device)
    times = []
    for r in range(rounds):
        t = {}
        for k in list(fns)[:: 1 if r % 2 else -1]:
            start = time.perf_counter()
            fns[k]()
            wait(device)
            t[k] = time.perf_counter() - start
        times.append(t)
    return times


def _median_time(fn, repeats: int, warmup: int = 2, device: torch.device = CPU) -> float:
    """Median seconds of fn(); on a GPU each call is waited for, so its queued kernels are counted."""
    for _ in range(warmup):
        fn()
    wait(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        wait(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_route(
    dtype: torch.dtype, n: int = 2048, device: torch.device = CPU, name: str | None = None
) -> tuple[str, Callable[[], object]]:
    """The faster of two routes to the same (n x n) by (n x n) product, 2 n^3 FLOPs: `matmul` (BLAS: MKL on a
    CPU, cuBLAS) and `conv1x1`, a 1x1 convolution of n channels over n positions in channels_last (oneDNN on a CPU,
    cuDNN), the library the models' convolutions run in. On machine D (AMD, full-width AVX-512) MKL's fp32
    matmul reached 180 GFLOP/s and oneDNN's 1x1 convolution 386: a peak from `matmul` alone read fp32 MFUs of up
    to 156%. The name of the route comes back with a function that runs it once. `name` takes a route already
    chosen (a bench run picks once, with its peak) instead of timing both again."""
    routes = gemm_routes(*(torch.randn(n, n, dtype=dtype, device=device) for _ in range(2)))
    if name is None:
        name = min(routes, key=lambda k: _median_time(routes[k], 3, warmup=1, device=device))
    return name, routes[name]


def gemm_routes(a: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Functions that compute a @ b for square a and b, as a matmul and as a 1x1 convolution (whose output is
    the product laid out as n/64 channels_last images of 8x8)."""
    n = a.shape[0]
    if n % 64:
        raise ValueError(
            f"n={n}: the 1x1 convolution lays n rows out as n/64 images of 8x8; n must divide by 64"
        )
    x = a.reshape(n // 64, 8, 8, n).permute(0, 3, 1, 2)  # channels_last: the rows of a are its positions
    w = b.t().contiguous().reshape(n, n, 1, 1)  # out x in
    return {"matmul": lambda: a @ b, "conv1x1": lambda: nn.functional.conv2d(x, w)}


def gemm_peak(
    dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: torch.device = CPU
) -> tuple[float, str]:
    """GFLOP/s of an n x n matrix multiply by its faster route, the ceiling MFU is measured against, and the
    route's name (`gemm_route`)."""
    route, product = gemm_route(dtype, n, device)
    return 2 * n**3 / _median_time(product, repeats, device=device) / 1e9, route


def train_flops(name: str, size: int) -> float:
    """FLOPs of one training image: forward (convs and linear) x 3 for forward + backward."""
    rows = summary(build_model(name, 1, 10), (1, 1, size, size), print_table=False)
    return 3.0 * sum(r.flops for r in rows)


def make_step(
    name: str,
    size: int,
    batch: int,
    precision: str,
    channels_last: bool = True,
    device: torch.device = CPU,
    gemm_convs: bool | None = None,
    skip: tuple[str, ...] = (),
    optim: OptimConfig | None = None,
    compiled: bool = False,
    **options,
):
    """A bare training step (forward, backward, SGD) of a fresh model on a fixed random batch, as a function
    (its `model` attribute: the model it steps). The model is sped up as training's (engine/run.speed_up, whose
    skip and gemm_convs these pass on) and, `compiled`, called through torch.compile as training's
    train.compile does (compiling in its first call). `optim` (default: SGD, lr 0.01, momentum 0.9) sets the
    update and the label smoothing, made as training makes them; a recipe's own makes the step the one its
    training loop runs, less the loop."""
    set_up(device)  # as training does
    torch.manual_seed(0)
    mem = memory_format(channels_last)
    model = build_model(name, 1, 10, **options).to(device=device, memory_format=mem).train()
    speed_up(model, device, precision, skip, gemm_convs)
    net = torch.compile(model) if compiled else model
    optim = optim or OptimConfig(lr=0.01, momentum=0.9)
    opt = make_optimizer(model, optim)
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=mem)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with autocast(device, precision):
            loss = nn.functional.cross_entropy(net(x), y, label_smoothing=optim.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step.model = model
    return step


def recipe_step(cfg: Config, precision: str, device: torch.device = CPU, size: int | None = None, **extra):
    """make_step for a recipe: its model and options, batch size, layout and update, at `size` (default: the
    side its data gives the model, data.input_side); `extra` (skip, gemm_convs, compiled) goes to make_step."""
    return make_step(
        cfg.model.name,
        size or input_side(cfg.data),
        cfg.train.batch_size,
        precision,
        cfg.train.channels_last,
        device,
        optim=cfg.optim,
        **extra,
        **cfg.model.options,
    )


def step_throughput(
    name: str,
    size: int,
    batch: int,
    precision: str,
    channels_last: bool = True,
    repeats: int = 5,
    device: torch.device = CPU,
    **options,
) -> float:
    """Images per second of bare training steps (forward, backward, SGD) on a fixed random batch."""
    step = make_step(name, size, batch, precision, channels_last, device, **options)
    return batch / _median_time(step, repeats, device=device)


def step_mfu(
    name: str,
    size: int,
    batch: int,
    precision: str,
    channels_last: bool = True,
    rounds: int = 5,
    n: int = 2048,
    device: torch.device = CPU,
    route: str | None = None,
) -> dict:
    """Bare training steps against the GEMM peak, timed back to back in alternating rounds (`paired`): one step,
    then n x n matrix multiplies of the step's precision for about as long, by `route` (default: the faster of the
    two, timed here; `gemm_route`). The MFU is the median of the rounds'
    ratios, so a machine whose speed drifts during the run (shared VMs, clocks that change with load) weighs on
    both sides of each ratio, not on the peak at the run's start and the steps minutes later."""
    step = make_step(name, size, batch, precision, channels_last, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    route, product = gemm_route(dtype, n, device, route)
    reps = max(1, round(_median_time(step, 1, device=device) / _median_time(product, 1, device=device)))

    def gemm():
        for _ in range(reps):
            product()

    times = paired({"step": step, "gemm": gemm}, rounds, warmup=0, device=device)
    flops = train_flops(name, size)
    ips = [batch / t["step"] for t in times]
    peaks = [reps * 2 * n**3 / t["gemm"] / 1e9 for t in times]
    mfu = [i * flops / 1e9 / p for i, p in zip(ips, peaks)]
    img_s = statistics.median(ips)
    return {
        "model": name,
        "size": size,
        "batch": batch,
        "precision": precision,
        "channels_last": channels_last,
        "img_s": img_s,
        "gflops": img_s * flops / 1e9,
        "peak_gflops": statistics.median(peaks),
        "mfu": statistics.median(mfu),
        "mfu_runs": mfu,
        "gemm_calls": reps,
        "gemm_route": route,
        "train_gflop_per_image": flops / 1e9,
    }


def _precision(device: torch.device) -> str:
    """The precision side-by-side comparisons use: what training's `precision: auto` picks (bf16 where it is
    native, on a GPU or a CPU with AVX-512 BF16 or AMX; else fp32)."""
    return resolve_precision("auto", device)


def engine_overhead(
    config_path: str = "configs/fast.yaml", batches: int = 40, rounds: int = 9, device: torch.device = CPU
) -> dict:
    """One reslab training epoch of `batches` batches (data slicing, augmentation, guard checks, metrics;
    evaluation excluded) against as many bare steps of the same model, batch size, loss and optimiser. Each
    round times the two back to back, in alternating order; the overhead is the median of the rounds' ratios,
    so a machine that speeds up or slows down between rounds weighs on both sides of each."""
    from .engine.fit import train_one_epoch
    from .engine.run import prepare

    precision = _precision(device)
    cfg = load(config_path, [f"precision={precision}", f"device={device.type}", "train.epochs=1"])
    cfg.data.limit = cfg.train.batch_size * batches
    run = prepare(cfg, Path("/nonexistent"), quiet=True)
    step = recipe_step(cfg, precision, device, size=model_side(run.meta))

    def bare_epoch():
        for _ in range(batches):
            step()

    def engine_epoch():
        run.finish_epoch()
        train_one_epoch(run, run.epoch)

    times = paired({"bare": bare_epoch, "engine": engine_epoch}, rounds, warmup=1, device=device)
    engine = [cfg.data.limit / t["engine"] for t in times]
    bare = [cfg.data.limit / t["bare"] for t in times]
    return {
        "config": config_path,
        "model": cfg.model.name,
        "batch": cfg.train.batch_size,
        "precision": precision,
        "rounds": rounds,
        "engine_img_s": statistics.median(engine),
        "bare_img_s": statistics.median(bare),
        "overhead": statistics.median(b / e - 1 for b, e in zip(bare, engine)),
        "overhead_runs": [b / e - 1 for b, e in zip(bare, engine)],
    }


def data_cost(config_path: str = "configs/fast.yaml", device: torch.device = CPU) -> dict:
    """Reading the files, building the loaders and one epoch of augmented batches without a model, against one
    epoch of bare training steps of the recipe's model."""
    from .data import load_dataset, make_loaders

    cfg = load(config_path, [f"device={device.type}"])
    start = time.perf_counter()
    data = load_dataset(cfg.data)
    train, _ = make_loaders(data, cfg.data, cfg.train.batch_size, cfg.train.eval_batch_size, 0, device)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for x, _ in train:
        x.contiguous(memory_format=torch.channels_last)
    wait(device)
    batch_seconds = time.perf_counter() - start
    size = cfg.data.resize or data.train_images.shape[-1]
    ips = step_throughput(
        cfg.model.name,
        size,
        cfg.train.batch_size,
        _precision(device),
        cfg.train.channels_last,
        device=device,
        **cfg.model.options,
    )
    epoch_seconds = train.num_examples / ips
    return {
        "config": config_path,
        "load_seconds": load_seconds,
        "batches_seconds": batch_seconds,
        "model_epoch_seconds": epoch_seconds,
        "fraction": (load_seconds + batch_seconds) / epoch_seconds,
    }


def run(
    out: Path | None = None,
    quick: bool = False,
    seed_limit: int = 2560,
    device: str = "auto",
    seed_rounds: int = 3,
) -> dict:
    dev = resolve_device(device)
    set_up(dev)
    start, waited = time.perf_counter(), cpu_wait_seconds() if dev.type == "cpu" else None
    if out is not None:  # checked before minutes of measuring, not after them, as is the seed limit
        make_file_dir(Path(out), "bench.json")
    if not quick:
        batch = load("seed").train.batch_size
        if seed_limit < batch:
            raise ReslabError(
                f"--seed-limit {seed_limit}: the seed recipe needs at least one batch ({batch} images)"
            )
        if seed_limit > TRAIN_IMAGES:  # both would train on all of them, and the results would say more
            raise ReslabError(
                f"--seed-limit {seed_limit}: Fashion-MNIST has {TRAIN_IMAGES:,} training images; "
                f"give {TRAIN_IMAGES} or fewer"
            )
    gpu = dev.type == "cuda"
    if gpu:  # fp32 convolutions run on TF32 tensor cores by default (cuDNN); let the GEMM peak do the same
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # as training does on a GPU
    bf16_ok = bf16_native(dev)
    n = 8192 if gpu else 2048
    peaks, routes = {}, {}
    peaks["fp32"], routes["fp32"] = gemm_peak(torch.float32, n=n, device=dev)
    peaks["bf16"], routes["bf16"] = gemm_peak(torch.bfloat16, n=n if bf16_ok else 256, repeats=3, device=dev)
    results = {
        "machine": machine(),
        "device": dev.type,
        "bf16_native": bf16_ok,
        "gemm_gflops": peaks,
        "gemm_route": routes,
        "steps": [],
    }
    precisions = ["fp32", "bf16"] if bf16_ok else ["fp32"]
    rounds = 3 if quick else 5

    def keep() -> None:  # the JSON is rewritten after each part: a later failure loses no measurement
        if out is not None:
            write_text(Path(out), json.dumps(results, indent=2) + "\n")

    for name, size in CASES[1:] if quick else CASES:
        batch = (256 if gpu else 64) if name == "d2l-resnet18" else (512 if gpu else 256)
        for precision in precisions:
            for channels_last in (False, True):
                step = step_mfu(
                    name, size, batch, precision, channels_last, rounds, n, dev, routes[precision]
                )
                results["steps"].append(step)
                print(_step_line(step), flush=True)
                keep()
    results["engine_overhead"] = engine_overhead(device=dev)
    print(f"engine overhead: {results['engine_overhead']}", flush=True)
    results["data_cost"] = data_cost(device=dev)
    print(f"data cost: {results['data_cost']}", flush=True)
    if waited is not None and (now := cpu_wait_seconds()) is not None:  # over what ran in this process
        results["cpu_wait"] = wait_share(max(now - waited, 0.0), time.perf_counter() - start)
        if results["cpu_wait"] >= CROWDED:
            results["cpu_wait_cause"] = crowding_cause()
    keep()
    if not quick:
        results["seed_vs_reslab"] = seed_vs_reslab(seed_limit, device=dev, rounds=seed_rounds)
        print(f"seed notebook vs reslab: {results['seed_vs_reslab']}", flush=True)
        keep()
        results["time_to_accuracy"] = time_to_accuracy(device=dev)
        print(f"time to accuracy: {results['time_to_accuracy']}", flush=True)
        keep()
    print(table(results))
    return results


def _spread(runs: list[float], fmt: str) -> str:
    """The lowest and highest of a measurement's rounds, in percent: how far one reading is to be trusted."""
    return f"{100 * min(runs):{fmt}}% to {100 * max(runs):{fmt}}%" if runs else ""


def _step_line(s: dict) -> str:
    layout = "channels_last" if s["channels_last"] else "NCHW"
    return (
        f"| {s['model']} @ {s['size']} | {s['precision']} {layout} | {s['batch']} | {s['img_s']:,.0f} | "
        f"{s['gflops']:.0f} | {s['peak_gflops']:.0f} | {100 * s['mfu']:.0f}% | {_spread(s.get('mfu_runs'), '.0f')} |"
    )


def table(results: dict) -> str:
    peaks = results["gemm_gflops"]
    # which route gave each peak; files written before session 36 do not say
    routes = {k: f" ({v})" for k, v in results.get("gemm_route", {}).items()}
    m = results.get("machine", {})
    if results.get("device") == "cuda":
        where = m.get("gpu")
    else:  # files written before session 41 do not give the threads
        where = "CPU" + (f", {m['threads']} thread{'s' * (m['threads'] > 1)}" if m.get("threads") else "")
    lines = [
        f"GEMM peak at the start of this run ({where}): {peaks['fp32']:.0f} GFLOP/s fp32{routes.get('fp32', '')}, "
        f"{peaks['bf16']:.1f} GFLOP/s bf16{routes.get('bf16', '')}"
        f"{'' if results['bf16_native'] else ' (no native bf16 here: emulated)'}",
        "",
        "MFU: the median of alternating rounds' ratios of a step to the same precision's GEMM run beside it (the",
        "faster of a matmul and a 1x1 convolution: `gemm_route` in the JSON)",
        "",
        "| model @ px | precision, layout | batch | img/s | GFLOP/s | GEMM GFLOP/s beside | MFU | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *(_step_line(s) for s in results["steps"]),
    ]
    o = results["engine_overhead"]
    spread = _spread(o.get("overhead_runs"), "+.1f")
    lines += [
        "",
        f"Engine overhead ({o['config']}: {o['model']}, batch {o['batch']}, {o.get('precision', 'fp32')}, "
        f"{o.get('rounds', 3)} paired rounds): full epoch {o['engine_img_s']:,.0f} img/s vs bare steps "
        f"{o['bare_img_s']:,.0f} img/s (medians); overhead, the median of the rounds' ratios: "
        f"{100 * o['overhead']:+.1f}%{f' (rounds {spread})' if spread else ''}",
    ]
    d = results["data_cost"]
    lines += [
        f"Data ({d['config']}): loading {d['load_seconds']:.2f} s + one epoch of batches {d['batches_seconds']:.2f} s "
        f"= {100 * d['fraction']:.1f}% of one epoch of model steps ({d['model_epoch_seconds']:.0f} s)"
    ]
    if "cpu_wait" in results:
        w = results["cpu_wait"]
        lines += [
            f"Waiting for a CPU: the measuring threads, {100 * w:.1f}% of their time"
            + (
                f" (from {CROWDED:.0%}: {results.get('cpu_wait_cause', 'other processes share these cores')}; "
                'these figures understate this machine; README.md, "Sharing the CPU")'
                if w >= CROWDED
                else ""
            )
        ]
    if "seed_vs_reslab" in results:
        s = results["seed_vs_reslab"]
        lines += [
            f"Seed notebook code vs reslab seed.yaml ({s['images']} images, {s['epochs']} epoch, whole processes, "
            f"median of {s.get('rounds', 1)} alternating rounds): {s['seed_notebook_seconds']:.0f} s vs "
            f"{s['reslab_seconds']:.0f} s, {s['speedup']:.2f}x; peak RSS of the "
            f"largest process {s['seed_notebook_peak_rss_mb']:.0f} MB vs {s['reslab_peak_rss_mb']:.0f} MB"
        ]
    if "time_to_accuracy" in results:
        t = results["time_to_accuracy"]
        f, seed = t["fast"], t["seed"]
        lines += [
            f"Time to accuracy (whole processes, the full data): fast.yaml {f['test_acc']:.4f} in "
            f"{f['wall_seconds']:.0f} s; the seed recipe in the same time: {seed['epochs_done']} "
            f"epoch{'s' * (seed['epochs_done'] != 1)} and "
            f"{seed['batches_into_next_epoch']} batches of {seed['batch_size']}, {seed['test_acc_at_budget']:.4f}"
        ]
    return "\n".join(lines)
