#!/usr/bin/env bash
# Issue 5's GPU check as one script, for a lent GPU machine that has PyTorch but no network.
#
# Once, in the repo root on the machine that has the dataset:
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/ && echo /.fmnist/ >> .git/info/exclude
# then on the GPU machine: `bash benchmarks/gpu_check.sh` (device tool: carry [".fmnist"], timeout_s 580).
#
# Steps, each under its own time limit (a failed step is recorded and the next one runs; 9 min at most):
#   1. the CUDA-marked tests (`pytest -m cuda`: tests/test_cuda.py and CUDA cases elsewhere)
#   2. `reslab bench --device cuda`: GEMM peaks, step throughput and MFU, engine overhead, seed notebook vs reslab
#   3. the seed recipe (configs/seed.yaml) for its 10 epochs on the GPU: img/s (goal >= 40,000 on an H100),
#      eager and with torch.compile (train.compile=true)
#   4. time to 0.94 test accuracy: best.yaml's recipe on ResNet-20 for 20 epochs (goal < 10 s of training)
# Writes $OUT (default ./gpu-check): results.json (everything, summarised), bench.json, pytest.log, log.txt.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RESLAB_DATA=${RESLAB_DATA:-$PWD/.fmnist}
PY=${PY:-python3}
RUNS=$(mktemp -d)
LOG="$OUT/log.txt"
STEPS=""

step() { # name limit_seconds command...
	local name=$1 limit=$2 start=$SECONDS rc
	shift 2
	echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
	timeout "$limit" "$@" >>"$LOG" 2>&1
	rc=$?
	echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
	STEPS="$STEPS $name=$rc:$((SECONDS - start))"
}

nvidia-smi >>"$LOG" 2>&1
step tests 60 "$PY" -m pytest -m cuda tests -q -p no:cacheprovider
grep -E "(passed|failed|skipped|error).* in [0-9.]+s" "$LOG" | tail -1 >"$OUT/pytest.log"
step bench 120 "$PY" -m reslab bench --device cuda --out "$OUT/bench.json"
step seed 100 "$PY" -m reslab train --config configs/seed.yaml --quiet --out "$RUNS/seed" --set device=cuda
step seed-compiled 120 "$PY" -m reslab train --config configs/seed.yaml --quiet --out "$RUNS/seed-compiled" \
	--set device=cuda train.compile=true
step to-0.94 120 "$PY" -m reslab train --config configs/best.yaml --quiet --out "$RUNS/target" \
	--set device=cuda model.name=resnet20 train.epochs=20

STEPS="$STEPS" "$PY" - "$OUT" "$RUNS" <<'EOF'
import json, os, statistics, sys
from pathlib import Path

import torch

from reslab.studies.common import machine

out, runs = Path(sys.argv[1]), Path(sys.argv[2])


def history(name):
    path = runs / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def time_to(rows, goal, images=60000):
    """First epoch at `goal` test accuracy; seconds of training (images / img/s) and with evaluation."""
    train = total = 0.0
    for r in rows:
        train += images / r["images_per_sec"]
        total += r["epoch_seconds"]
        if r["test_acc"] >= goal:
            return {"epoch": r["epoch"], "train_seconds": train, "seconds_with_eval": total}
    return None


seed, compiled, target = history("seed"), history("seed-compiled"), history("target")


def throughput(rows):
    return {
        "epochs": len(rows),
        "median_img_s": statistics.median(r["images_per_sec"] for r in rows) if rows else None,
        "final_test_acc": rows[-1]["test_acc"] if rows else None,
        "history": rows,
    }

result = {
    "machine": machine(),
    "torch_cuda": torch.version.cuda,
    "steps": dict(s.split("=") for s in os.environ["STEPS"].split()),
    "tests": (out / "pytest.log").read_text().strip(),
    "seed": throughput(seed),
    "seed_compiled": throughput(compiled),
    "time_to_0.94": {"run": "best.yaml, resnet20, 20 epochs", "reached": time_to(target, 0.94), "history": target},
}
if (out / "bench.json").is_file():
    result["bench"] = json.loads((out / "bench.json").read_text())
(out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
brief = {k: v for k, v in result.items() if k not in ("bench", "seed", "seed_compiled", "time_to_0.94")}
for key in ("seed", "seed_compiled"):
    brief[key] = {k: v for k, v in result[key].items() if k != "history"}
brief["time_to_0.94"] = result["time_to_0.94"]["reached"]
brief["target_final_test_acc"] = target[-1]["test_acc"] if target else None
print(json.dumps(brief, indent=1))
EOF
rm -rf "$RUNS"
grep -A12 "^GEMM peak" "$LOG"  # the bench table
