"""torch.compile against eager training steps on the CPU, with and without engine/gemm_conv.py's small-map matrix
multiplies: bare bf16 steps (forward, backward, SGD), channels_last. Each variant runs in a process of its own
beside training's eager step, in alternating rounds: img/s are medians, the speed-up the median of the rounds'
ratios, and a compiled variant's compile is its first call's seconds.

The variants, each against "eager" (training's eager step: the matrix multiplies where gemm_conv.pays):
- eager, oneDNN: every convolution oneDNN's;
- compiled: training's compiled step (since session 40: the matrix multiplies where they pay, traced into the graph);
- compiled, oneDNN: every convolution oneDNN's, inside the graph (training's compiled step before session 40);
- compiled, gemm eager: the matrix-multiply convolutions left out of the graph (torch.compiler.disable), so the
  graph breaks at each convolution and Inductor fuses what lies between them.

A process per variant: with "compiled, gemm eager" in the same process, the plain compiled step of ResNet-20 ran at
1,258 img/s against 2,267 beside eager alone (machine E).

Usage: .venv/bin/python benchmarks/compile_step.py [--rounds 5] [--models ...] [--variants ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from reslab import bench
from reslab.engine import gemm_conv
from reslab.engine.host import set_up
from reslab.studies.common import machine

CPU = torch.device("cpu")
# (model, size, batch, options): the seed recipe's step, best.yaml's, fast.yaml's as it was until session 42 (a
# 32-channel stem; compile-step-e*.json were measured with it)
STEPS = [
    ("d2l-resnet18", 96, 256, {}),
    ("resnet20", 28, 512, {}),
    ("resnet8", 28, 128, {"width": 32, "first_stride": 2}),
]
# name: (compiled, gemm_convs: None where training would use them, graph breaks at the matrix-multiply convs)
VARIANTS = {
    "eager": (False, None, False),
    "eager, oneDNN": (False, False, False),
    "compiled": (True, None, False),
    "compiled, oneDNN": (True, False, False),
    "compiled, gemm eager": (True, True, True),
}


class EagerConv2d(gemm_conv.Conv2d):
    """gemm_conv.Conv2d run outside the compiled graph."""

    forward = torch.compiler.disable(gemm_conv.Conv2d.forward)


def make(name: str, size: int, batch: int, options: dict, variant: str):
    compiled, gemm_convs, eager_convs = VARIANTS[variant]
    step = bench.make_step(name, size, batch, "bf16", True, CPU, gemm_convs, compiled=compiled, **options)
    for m in step.model.modules() if eager_convs else ():
        if type(m) is gemm_conv.Conv2d:
            m.__class__ = EagerConv2d
    return step


def compare(name: str, size: int, batch: int, options: dict, variant: str, rounds: int) -> dict:
    """`variant`'s steps against training's eager steps, in this process."""
    fns, first = {}, {}
    for v in ("eager", variant):
        fns[v] = make(name, size, batch, options, v)
        start = time.perf_counter()
        fns[v]()  # compiles a compiled variant
        first[v] = time.perf_counter() - start
    times = bench.paired(fns, rounds)
    row = {"model": name, "size": size, "batch": batch, "variant": variant, "rounds": rounds}
    row |= {"img_s": batch / statistics.median(t[variant] for t in times), "first_call_s": first[variant]}
    row |= {"eager_img_s": batch / statistics.median(t["eager"] for t in times)}
    row |= {"speedup": statistics.median(t["eager"] / t[variant] for t in times), "runs_s": times}
    print(
        f"{name} @ {size}, batch {batch}: {variant:<22} {row['img_s']:7,.0f} img/s against eager "
        f"{row['eager_img_s']:7,.0f}: {row['speedup']:.2f}x (first call {first[variant]:.1f} s)",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS)[1:], default=list(VARIANTS)[1:])
    parser.add_argument("--models", nargs="+", choices=[s[0] for s in STEPS], default=[s[0] for s in STEPS])
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    set_up(CPU)  # as training does
    # Dynamo's default limit of 8 graphs per function would leave the later blocks eager when the graph breaks
    # at each convolution (a graph per block)
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    result = {"machine": machine(), "amx": gemm_conv.has_amx(), "steps": []}

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(result, indent=1) + "\n")

    if len(args.models) == len(args.variants) == 1:  # one process's part
        name, size, batch, options = next(s for s in STEPS if s[0] == args.models[0])
        result["steps"].append(compare(name, size, batch, options, args.variants[0], args.rounds))
        return save()
    print(f"AMX: {gemm_conv.has_amx()} (training uses the matrix multiplies: {gemm_conv.pays(CPU, 'bf16')})")
    for name in args.models:
        for variant in args.variants:
            with tempfile.NamedTemporaryFile("r", suffix=".json") as part:
                cmd = [sys.executable, __file__, "--models", name, "--variants", variant]
                subprocess.run([*cmd, "--rounds", str(args.rounds), "--out", part.name], check=True)
                result["steps"] += json.load(part)["steps"]
            save()


if __name__ == "__main__":
    main()
