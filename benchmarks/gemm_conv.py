"""oneDNN's bf16 convolutions against engine/gemm_conv.py's matrix multiplies, side by side in one run: each layer
of the small maps (forward + backward), then whole training steps with and without the conversion. Alternating
rounds, medians. Usage: .venv/bin/python benchmarks/gemm_conv.py [--rounds 7] [--out FILE.json]

On a CPU without AMX training never converts (gemm_conv.pays); this script converts anyway, to compare. Without
native bf16 (no AVX-512 BF16) it is meaningless: bf16 is emulated there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from reslab import bench
from reslab.engine import gemm_conv
from reslab.engine.host import set_up
from reslab.studies.common import machine

CPU = torch.device("cpu")
# (batch, in, out, output map, stride): d2l-resnet18 @ 96 at the seed recipe's batch (maps 6 and 3), fast.yaml's
# resnet8 at its batch (map 4), and a 7x7 map (resnet20's last stage), which stays with oneDNN
LAYERS = [
    (256, 512, 512, 3, 1),
    (256, 256, 512, 3, 2),
    (256, 256, 256, 6, 1),
    (256, 128, 256, 6, 2),
    (128, 128, 128, 4, 1),
    (128, 64, 128, 4, 2),
    (128, 64, 64, 7, 1),
]
# (model, size, batch, options): the notebook's net at both of the bench's batches, fast.yaml's net as it was
# until session 42 (a 32-channel stem; gemm-conv-*.json were measured with it)
STEPS = [
    ("d2l-resnet18", 96, 256, {}),
    ("d2l-resnet18", 96, 64, {}),
    ("resnet8", 28, 128, {"width": 32, "first_stride": 2}),
]


def alternate(fns: dict, rounds: int, calls: int = 2) -> dict:
    """Median seconds per call of each function, timed in alternating rounds after two warm-up calls."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn(), fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[k].append((time.perf_counter() - start) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def layer_step(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        out.backward(grad)

    return step


def compare(label: str, fns: dict, rounds: int, show) -> dict:
    """Time oneDNN against gemm_conv (fns["onednn"], fns["gemm"]), print one line and return it as a row."""
    t = alternate(fns, rounds)
    row = {"case": label, "onednn_s": t["onednn"], "gemm_s": t["gemm"], "speedup": t["onednn"] / t["gemm"]}
    print(
        f"  {label:<46} oneDNN {show(t['onednn'])}, gemm_conv {show(t['gemm'])}: {row['speedup']:.2f}x",
        flush=True,
    )
    return row


def layers(rounds: int) -> list[dict]:
    rows = []
    for b, cin, cout, size, stride in LAYERS:
        torch.manual_seed(0)
        plain = nn.Conv2d(cin, cout, 3, stride, 1).to(memory_format=torch.channels_last)
        fast = nn.Conv2d(cin, cout, 3, stride, 1).to(memory_format=torch.channels_last)
        gemm_conv.use_gemm_convs(fast)
        x = torch.randn(b, cin, size * stride, size * stride).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        grad = torch.randn(b, cout, size, size, dtype=torch.bfloat16)
        grad = grad.contiguous(memory_format=torch.channels_last)
        label = f"{cin}->{cout}, {size}x{size} out, stride {stride}, batch {b}"
        fns = {"onednn": layer_step(plain, x, grad), "gemm": layer_step(fast, x, grad)}
        rows.append(compare(label, fns, rounds, lambda s: f"{1000 * s:6.1f} ms"))
    return rows


def steps(rounds: int) -> list[dict]:
    rows = []
    for name, size, b, options in STEPS:
        fns = {
            "onednn": bench.make_step(name, size, b, "bf16", True, CPU, gemm_convs=False, **options),
            "gemm": bench.make_step(name, size, b, "bf16", True, CPU, gemm_convs=True, **options),
        }
        row = compare(f"{name} @ {size}, batch {b}", fns, rounds, lambda s, b=b: f"{b / s:6,.0f} img/s")
        rows.append(row | {"onednn_img_s": b / row["onednn_s"], "gemm_img_s": b / row["gemm_s"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    set_up(CPU)  # as training does
    print(f"AMX: {gemm_conv.has_amx()}; bf16 layers, forward + backward (channels_last):")
    result = {"machine": machine(), "amx": gemm_conv.has_amx(), "layers": layers(args.rounds)}
    print("whole training steps (forward, backward, SGD), bf16 channels_last:")
    result["steps"] = steps(args.rounds)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
