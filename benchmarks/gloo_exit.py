"""How often a 2-rank gloo process that trained with DDP aborts as it exits, by what it does before exiting.

A gloo worker thread still running while Python finalizes aborts its process ("terminate called without an active
exception", SIGABRT) after every file is written: torchrun then reports the run as failed. Each try launches a small
DDP script under torchrun (20 steps of a 2-layer net and an all-reduce each) that ends in one of these ways:
  nothing   exits with the process group as it is
  destroy   dist.destroy_process_group(): the DDP wrapper, alive in reference cycles, still holds the group
  collect   gc.collect() then destroy_process_group(), as reslab's exit hook (engine/dist.py) does
  reslab    trains with reslab.engine.fit() on a tiny dataset and leaves by reslab's exit hook
Variants alternate try by try. A try that exits non-zero, or hangs past --timeout seconds, fails.

Usage: .venv/bin/python benchmarks/gloo_exit.py [--tries 40] [--variants nothing,destroy,collect,reslab]
           [--timeout 120] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = """
import gc, os, sys
import torch, torch.distributed as dist
from torch import nn

how = sys.argv[1]
if how == "reslab":
    from reslab import config
    from reslab.engine import fit

    sets = ["train.epochs=1", "train.batch_size=64", "precision=fp32", "device=cpu", f"data.root={sys.argv[2]}"]
    fit(config.load("fast", sets), os.path.join(sys.argv[3], "run"), overwrite=True)
    sys.exit(0)
dist.init_process_group("gloo")
net = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
opt = torch.optim.SGD(net.parameters(), lr=0.1)
for _ in range(20):
    loss = net(torch.randn(4, 8)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    t = torch.ones(3, dtype=torch.float64)
    dist.all_reduce(t)
if how == "collect":
    del net, opt, loss
    gc.collect()
if how in ("destroy", "collect"):
    dist.destroy_process_group()
"""


def tiny_data(directory: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import make_dataset

    return make_dataset(directory)


def cause(stderr: str) -> str:
    """What ended a failed try, from torchrun's report."""
    if "terminate called" in stderr:
        return "SIGABRT: terminate called without an active exception"
    lines = [line for line in stderr.splitlines() if "Error" in line or "exitcode" in line]
    return lines[-1].strip() if lines else "exit code not 0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tries", type=int, default=40, help="tries of each variant")
    p.add_argument("--variants", default="nothing,destroy,collect,reslab")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a try counts as hung")
    p.add_argument("--out", type=Path, help="write the counts here as JSON")
    args = p.parse_args()
    variants = args.variants.split(",")
    failed, causes = {v: 0 for v in variants}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "exit.py").write_text(SCRIPT)
        data = tiny_data(tmp / "data")
        env = dict(os.environ, OMP_NUM_THREADS="1", RESLAB_DIST_TIMEOUT="60")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        for i in range(args.tries):
            for v in variants:
                cmd = [*torchrun, str(tmp / "exit.py"), v, str(data), str(tmp)]
                try:
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                    why = None if done.returncode == 0 else cause(done.stderr)
                except subprocess.TimeoutExpired:
                    why = f"hung past {args.timeout:g} s"
                if why:
                    failed[v] += 1
                    causes.append({"try": i + 1, "variant": v, "cause": why})
                print(f"try {i + 1} {v}: {why or 'ok'}", flush=True)
    for v in variants:
        print(f"{v}: {failed[v]} of {args.tries} failed")
    if args.out:
        import torch

        result = {
            "tries": args.tries,
            "failed": failed,
            "causes": causes,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
