#!/usr/bin/env bash
# Issue 5's GPU check as one script, for a lent GPU machine that has PyTorch but no network.
#
# Once, in the repo root on the machine that has the dataset:
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/ && echo /.fmnist/ >> .git/info/exclude
# then on the GPU machine: `bash benchmarks/gpu_check.sh` (device tool: carry [".fmnist"], timeout_s 595).
#
# Steps, each under its own time limit and all inside DEADLINE seconds (a failed step is recorded and the next
# one runs):
#   1. the CUDA-marked tests (`pytest -m cuda`: tests/test_cuda.py and CUDA cases elsewhere)
#   2. `reslab bench --device cuda`: GEMM peaks, step throughput and MFU, engine overhead, seed notebook vs reslab
#   3. the seed recipe (configs/seed.yaml) for its 10 epochs on the GPU: img/s (goal >= 40,000 on an H100)
#   3b. benchmarks/profile_step.py: best.yaml's training loop against bare steps under torch.profiler, per operator
#   4. time to 0.94 test accuracy: best.yaml's recipe on ResNet-20 for 20 epochs (goal < 10 s of training)
#   5. best.yaml's recipe on ResNet-20 for as many epochs of (100, 80, 60, 55, 45) as the time left allows,
#      sized from step 4's epoch time; its run directory comes back as long-run.tar (`reslab eval` it at home)
#   6. the seed recipe with torch.compile (train.compile=true) for 3 epochs, in what time is left
# Writes $OUT (default ./gpu-check): results.json (everything, summarised), bench.json, profile.json, pytest.log,
# log.txt, long-run.tar.
# Knobs (environment): ONLY="to-0.94 long" runs just those steps; R20="train.batch_size=512 optim.lr=0.4" adds
# overrides to steps 4 and 5; DEADLINE (default 565 s); RESERVE, the seconds step 5 leaves for step 6 (default 90).
set -u
OUT=${OUT:-gpu-check}
DEADLINE=${DEADLINE:-565}
RESERVE=${RESERVE:-90}
ONLY=${ONLY:-}
read -ra R20 <<<"${R20:-}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RESLAB_DATA=${RESLAB_DATA:-$PWD/.fmnist}
PY=${PY:-python3}
RUNS=$(mktemp -d)
LOG="$OUT/log.txt"
STEPS=""

step() { # name limit_seconds command...; the limit shrinks to what is left before DEADLINE
	local name=$1 limit=$2 start=$SECONDS rc
	shift 2
	if [[ -n $ONLY && " $ONLY " != *" $name "* ]]; then
		STEPS="$STEPS $name=skipped:0"
		return
	fi
	((limit > DEADLINE - SECONDS)) && limit=$((DEADLINE - SECONDS))
	if ((limit < 20)); then
		echo "== $name: skipped, ${limit} s left" | tee -a "$LOG"
		STEPS="$STEPS $name=skipped:0"
		return
	fi
	echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
	timeout "$limit" "$@" >>"$LOG" 2>&1
	rc=$?
	echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
	STEPS="$STEPS $name=$rc:$((SECONDS - start))"
}

nvidia-smi >>"$LOG" 2>&1
step tests 90 "$PY" -m pytest -m cuda tests -q -p no:cacheprovider
grep -E "(passed|failed|skipped|error).* in [0-9.]+s" "$LOG" | tail -1 >"$OUT/pytest.log"
step bench 120 "$PY" -m reslab bench --device cuda --out "$OUT/bench.json"
step seed 100 "$PY" -m reslab train --config configs/seed.yaml --quiet --out "$RUNS/seed" --set device=cuda
step profile 60 "$PY" benchmarks/profile_step.py --config configs/best.yaml --set device=cuda --steps 40 \
	--out "$OUT/profile.json"
step to-0.94 90 "$PY" -m reslab train --config configs/best.yaml --quiet --out "$RUNS/target" \
	--set device=cuda model.name=resnet20 train.epochs=20 "${R20[@]}"
# step 5's epochs: the largest of (100, 80, 60, 55, 45) that, at step 4's slowest epoch, ends RESERVE s before DEADLINE
LONG=$("$PY" - "$RUNS/target/metrics.jsonl" $((DEADLINE - SECONDS - RESERVE)) <<'EOF'
import json, sys
from pathlib import Path

path, left = Path(sys.argv[1]), float(sys.argv[2])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
per_epoch = max(r["epoch_seconds"] for r in rows[1:]) if len(rows) > 1 else float("inf")
print(next((n for n in (100, 80, 60, 55, 45) if 15 + n * per_epoch <= left), 0))
EOF
)
echo "== long run: ${LONG} epochs" | tee -a "$LOG"
if ((LONG > 0)); then
	step long $((DEADLINE - SECONDS - RESERVE + 30)) "$PY" -m reslab train --config configs/best.yaml --quiet \
		--out "$RUNS/long" --set device=cuda model.name=resnet20 train.epochs="$LONG" "${R20[@]}"
	[[ -d $RUNS/long ]] && tar -cf "$OUT/long-run.tar" -C "$RUNS" long
fi
step seed-compiled 150 "$PY" -m reslab train --config configs/seed.yaml --quiet --out "$RUNS/seed-compiled" \
	--set device=cuda train.compile=true train.epochs=3

STEPS="$STEPS" R20="${R20[*]}" "$PY" - "$OUT" "$RUNS" <<'EOF'
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


seed, compiled, target, long = (history(n) for n in ("seed", "seed-compiled", "target", "long"))


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
    "overrides": os.environ.get("R20", ""),
    "time_to_0.94": {"run": "best.yaml, resnet20, 20 epochs", "reached": time_to(target, 0.94), "history": target},
    "long": {
        "run": f"best.yaml, resnet20, {len(long)} epochs",
        "final_test_acc": long[-1]["test_acc"] if long else None,
        "seconds": sum(r["epoch_seconds"] for r in long),
        "reached_0.94": time_to(long, 0.94),
        "history": long,
    },
}
if (out / "bench.json").is_file():
    result["bench"] = json.loads((out / "bench.json").read_text())
(out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
brief = {k: v for k, v in result.items() if k not in ("bench", "seed", "seed_compiled", "time_to_0.94", "long")}
for key in ("seed", "seed_compiled"):
    brief[key] = {k: v for k, v in result[key].items() if k != "history"}
brief["time_to_0.94"] = result["time_to_0.94"]["reached"]
brief["target_final_test_acc"] = target[-1]["test_acc"] if target else None
brief["long"] = {k: v for k, v in result["long"].items() if k != "history"}
print(json.dumps(brief, indent=1))
EOF
rm -rf "$RUNS"
grep -A12 "^GEMM peak" "$LOG"  # the bench table
