"""What train.accum_steps saves: the peak memory (RSS) and wall time of whole `reslab train` processes that each
train the same steps of a recipe, with each batch in 1, 2, 4 ... micro-batches. On the CPU the process's peak
RSS holds the data, the model, the optimiser and one step's activations; the activations are what the
micro-batches divide.
Usage: .venv/bin/python benchmarks/accum_memory.py [--config wrn] [--steps 1] [--accum 1,2,4,8]
           [--set KEY=VALUE ...] [--out benchmarks/accum-memory-wrn-a.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from reslab import config
from reslab.baseline import _train, timed_process
from reslab.studies.common import machine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="wrn")
    p.add_argument("--steps", type=int, default=1, help="training steps of each process")
    p.add_argument("--accum", default="1,2,4,8", help="micro-batches per step to compare")
    p.add_argument("--set", nargs="*", default=[], help="more overrides, for every process")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cfg = config.load(args.config, args.set)
    batch = cfg.train.batch_size
    # the same images for each: `steps` batches to train on, as few to test on, in small test batches so that
    # evaluation does not set the peak; no compile (its own memory and minutes)
    common = [
        f"data.limit={batch * args.steps}",
        "train.epochs=1",
        "optim.warmup_epochs=0",
        "train.eval_batch_size=32",
        "train.compile=false",
        "train.compile_mode=default",
        *args.set,
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for accum in (int(a) for a in args.accum.split(",")):
            cmd = _train(args.config, Path(tmp) / f"a{accum}", [*common, f"train.accum_steps={accum}"])
            seconds, _, peak_mb = timed_process(cmd)
            rows.append(
                {
                    "accum_steps": accum,
                    "micro_batch": batch // accum,
                    "peak_rss_mb": peak_mb,
                    "seconds": seconds,
                }
            )
            print(
                f"accum_steps {accum:>2} (micro-batch {batch // accum:>4}): peak RSS {peak_mb:7,.0f} MB  {seconds:6.1f} s",
                flush=True,
            )
    result = {
        "config": args.config,
        "batch_size": batch,
        "steps": args.steps,
        "overrides": common,
        "machine": machine(),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
