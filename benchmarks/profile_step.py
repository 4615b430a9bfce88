"""Where a training step's time goes: reslab's training loop on a config against bare steps of the same model and
batch (forward, backward, SGD), both under torch.profiler. Prints milliseconds and operators per step for each,
the bare step's largest operators, and the operators the engine adds, by host time. On a GPU the host's time per
operator is what bounds small nets.

Usage: .venv/bin/python benchmarks/profile_step.py --config configs/best.yaml [--set device=cuda] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from reslab import bench, config
from reslab.engine.fit import train_one_epoch
from reslab.engine.run import model_side, prepare
from reslab.errors import ReslabError


def profiled(fn, device: torch.device, steps: int) -> dict:
    """Wall ms per step, operators per step and each operator's host (self CPU) ms per step, of fn() = `steps` steps;
    on a GPU also each kernel's device ms per step, and their sum: the device's busy time a step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        bench.wait(device)
        seconds = time.perf_counter() - start
    ops = Counter()
    host = Counter()
    kernels = Counter()  # device time by GPU kernel (an operator's device time is its kernels': counted once)
    for e in prof.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("cuda"):
            ops[e.key] += e.count
            host[e.key] += e.self_cpu_time_total / 1000
        if e.device_type != DeviceType.CPU:
            kernels[e.key] += e.self_device_time_total / 1000
    return {
        "ms_per_step": 1000 * seconds / steps,
        "ops_per_step": sum(ops.values()) / steps,
        "ops": {k: ops[k] / steps for k in ops},
        "host_ms": {k: host[k] / steps for k in host},
        "device_busy_ms": sum(kernels.values()) / steps,
        "device_ms": {k: kernels[k] / steps for k in kernels},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/best.yaml")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()

    cfg = config.load(args.config, [*args.overrides, "train.epochs=1", "optim.warmup_epochs=0"])
    cfg.data.limit = cfg.train.batch_size * args.steps
    run = prepare(cfg, Path("/nonexistent"), quiet=True)
    train_one_epoch(run, 0)  # warm-up: cuDNN autotuning, allocator, momentum buffers
    run.finish_epoch()
    engine = profiled(lambda: train_one_epoch(run, 1), run.device, args.steps)

    step = bench.recipe_step(cfg, run.precision, run.device, size=model_side(run.meta))
    for _ in range(3):
        step()
    plain = profiled(lambda: [step() for _ in range(args.steps)], run.device, args.steps)

    extra = {k: v - plain["host_ms"].get(k, 0.0) for k, v in engine["host_ms"].items()}
    print(
        f"{cfg.model.name}, batch {cfg.train.batch_size}, {run.precision}, {run.device.type}, {args.steps} steps"
    )
    for name, r in (("reslab training loop", engine), ("bare steps", plain)):
        print(f"  {name:<22} {r['ms_per_step']:7.2f} ms a step, {r['ops_per_step']:6.0f} operators a step")
        if r["device_ms"]:  # a GPU: busy near the wall time means kernel-bound, far below it host-bound
            busy = r["device_busy_ms"]
            print(f"  {'':<22} {busy:7.2f} ms of it the GPU was busy ({100 * busy / r['ms_per_step']:.0f}%)")
    if plain["device_ms"]:
        print("  the bare step's largest GPU kernels, by device ms a step:")
        for k, v in sorted(plain["device_ms"].items(), key=lambda kv: -kv[1])[:12]:
            print(f"    {k[:70]:<70} {v:7.2f} ms  {100 * v / plain['device_busy_ms']:5.1f}%")
    print("  the bare step's largest operators, by host ms a step:")
    for k, v in sorted(plain["host_ms"].items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {k:<40} {v:7.2f} ms  {100 * v / plain['ms_per_step']:5.1f}%")
    print("  operators the loop adds, by host ms a step:")
    for k, v in sorted(extra.items(), key=lambda kv: -kv[1])[:15]:
        added = engine["ops"].get(k, 0) - plain["ops"].get(k, 0)
        print(f"    {k:<40} {v:+7.3f} ms  {added:+6.1f} calls")
    if args.out:
        Path(args.out).write_text(json.dumps({"engine": engine, "bare": plain}, indent=1) + "\n")


if __name__ == "__main__":
    try:
        main()
    except ReslabError as e:
        sys.exit(f"error: {e}")
