#!/usr/bin/env bash
# Issue 5's GPU check as one script, for a lent GPU machine that has PyTorch but no network.
#
# Once, in the repo root on the machine that has the dataset:
#   mkdir -p .fmnist && cp /usr/share/datasets/fashion-mnist/*.gz .fmnist/ && echo /.fmnist/ >> .git/info/exclude
# then on the GPU machine: `bash benchmarks/gpu_check.sh` (device tool: carry [".fmnist"], timeout_s 595).
#
# Steps, each under its own time limit and all inside DEADLINE seconds (a failed step is recorded and the next
# one runs). Their durations on an H200 in session 47 (23 or 8 where marked) are in brackets.
#   tests          the CUDA-marked tests (`pytest -m cuda`: tests/test_cuda.py and CUDA cases elsewhere) [80 s]
#   bench          `reslab bench --device cuda`: GEMM peaks, step throughput and MFU, engine overhead, the
#                  notebook's code against reslab [session 23: 76 s], and since session 41 fast.yaml against the
#                  seed recipe in the same wall time [~40 s est.]
#   seed           the seed recipe (configs/seed.yaml), 10 epochs: img/s (goal >= 40,000 on an H100) [54 s]
#   profile        benchmarks/profile_step.py: best.yaml's training loop against bare steps, per operator
#   profile-sprint the same for sprint.yaml (profile-sprint.json) [25 s]
#   layout         benchmarks/zeropad_layout.py: ResNet-20's zero-pad shortcut before and after d841b80 (layout.json)
#   sprint         configs/sprint.yaml: time to 0.94 test accuracy (goal < 10 s of training) [28 s]
#   sprint-s1, sprint-s2  the same with seeds 1 and 2 [28 s each]; results.json's sprint_seeds puts the 3 side by side
#   best           configs/best.yaml for as many of (100, 80, 60) epochs as fit at EPOCH_S seconds an epoch
#                  [session 8, 100 epochs: 240 s]; its run directory comes back as best-run.tar
#   sprint-graphs  sprint.yaml compiled with CUDA graphs (train.compile_mode=reduce-overhead): the host's launches
#                  are what bind this small net on a GPU [47 s]
#   seed-graphs    the seed recipe compiled the same way: its ResNet-18 at batch 256 waits on the host too [67 s]
#   profile-seed   profile_step.py on the seed recipe (profile-seed.json): how much of its step the GPU is busy, and
#                  with which kernels; last of the short plan, so the first step a tight DEADLINE skips [43 s]
#   wrn            configs/wrn.yaml's 200 epochs with CUDA graphs [session 48: 400 s, then its evaluation and weights];
#                  a call that DEADLINE stops leaves a checkpoint that the next call, at once, resumes (below)
# Writes $OUT (default ./gpu-check): results.json (everything, summarised), bench.json, profile.json, pytest.log,
# log.txt, best-run.tar, wrn.tar.NN (or wrn-metrics.jsonl while the wrn run is not finished).
# With 15 minutes of device time, the machine's start (~30 s in sessions 23 and 47, 1-2 min in session 8) and the
# transfers included, a session does one of two plans (a machine idle for 30 s goes back, and with it what the
# calls left on it). Session 47 ran the short goals (411 s) and a probe of wrn with and without CUDA graphs.
#   the short goals:
#     ONLY="tests seed seed-graphs profile-sprint sprint sprint-s1 sprint-s2 sprint-graphs profile-seed" DEADLINE=420
#   wrn.yaml in full, in one call (timeout_s 560; session 48: 0.9600), or a variant of it in its own directory
#   (session 49, dropout 0.3: 0.9594, 430 s):
#     ONLY=wrn DEADLINE=540 bash benchmarks/gpu_check.sh
#     ONLY=wrn SET="model.options.dropout=0.3" WRN_DIR=runs/gpu-wrn-drop DEADLINE=540 bash benchmarks/gpu_check.sh
#   the lever not yet tried, the paper's batch 128 (4x the steps; lr and EMA scaled back), likely two calls at once
#   (its speed under CUDA graphs is not measured; the second resumes the first's checkpoint), with no third:
#     ONLY=wrn WRN_BATCH=128 SET="optim.lr=0.1 train.ema=0.999" WRN_DIR=runs/gpu-wrn-b128 DEADLINE=540 bash ...
#   after a one-call run, while the machine is warm (~400 s left in sessions 48, 49): ONLY="tests bench" DEADLINE=280
# `ONLY=best BEST="train.epochs=N" RESERVE=0 DEADLINE=D` runs best.yaml instead, N = (D - 30) / 2.6: 2.4 s an epoch
# measured on an H200 with test-time flip, plus ~0.2 s estimated for the 1-px shift's views. A call the budget cuts
# short returns only what $OUT already holds, and the tar files are written after the run: D must fit.
# Knobs (environment): ONLY="sprint best" runs just those steps; BEST="train.epochs=..." adds overrides to the best
# step; DEADLINE (default 565 s); EPOCH_S (default 2.6, the H200's 2.4 s an epoch of best.yaml with margin);
# DEVICE (default cuda) and SET (overrides added to every training and profiling step): a dry run of the script on
# a CPU, to catch a broken step before it costs device time (train.compile=false: wrn.yaml compiles, which takes
# minutes on a CPU; the *-graphs steps compile all the same):
#   DEVICE=cpu SET="data.limit=512 train.epochs=1 train.compile=false" BEST="train.epochs=3" PROFILE_STEPS=4 \
#     WRN_BATCH=8 WRN_EPOCHS=3 DEADLINE=400 bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu-check}
DEADLINE=${DEADLINE:-565}
EPOCH_S=${EPOCH_S:-2.6}
ONLY=${ONLY:-}
read -ra BEST <<<"${BEST:-}"
DEVICE=${DEVICE:-cuda}
read -ra SET <<<"device=$DEVICE ${SET:-}"
PROFILE_STEPS=${PROFILE_STEPS:-40}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RESLAB_DATA=${RESLAB_DATA:-$PWD/.fmnist}
PY=${PY:-python3}
RUNS=$(mktemp -d)
LOG="$OUT/log.txt"
STEPS=""
RESERVE=${RESERVE:-90} # what the best step leaves for sprint-graphs

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
step bench 180 "$PY" -m reslab bench --device "$DEVICE" --seed-rounds 1 --out "$OUT/bench.json"
step seed 100 "$PY" -m reslab train --config configs/seed.yaml --quiet --out "$RUNS/seed" --set "${SET[@]}"
step profile 60 "$PY" benchmarks/profile_step.py --config configs/best.yaml --set "${SET[@]}" \
	--steps "$PROFILE_STEPS" --out "$OUT/profile.json"
step profile-sprint 60 "$PY" benchmarks/profile_step.py --config configs/sprint.yaml --set "${SET[@]}" \
	--steps "$PROFILE_STEPS" --out "$OUT/profile-sprint.json"
step layout 60 "$PY" benchmarks/zeropad_layout.py --model resnet20 --set --batch 512 --device "$DEVICE" \
	--precision bf16 --steps 20 --out "$OUT/layout.json"
step sprint 60 "$PY" -m reslab train --config configs/sprint.yaml --quiet --out "$RUNS/sprint" \
	--set "${SET[@]}"
for s in 1 2; do # the sprint's other two seeds, for a median of 3
	step sprint-s$s 60 "$PY" -m reslab train --config configs/sprint.yaml --quiet --out "$RUNS/sprint-s$s" \
		--set "${SET[@]}" seed=$s
done
# the largest of (100, 80, 60) epochs that end RESERVE s before DEADLINE at EPOCH_S an epoch (plus 20 s start-up)
EPOCHS=$(awk -v left=$((DEADLINE - SECONDS - RESERVE)) -v per="$EPOCH_S" \
	'BEGIN { n = 0; split("100 80 60", c); for (i = 3; i >= 1; i--) if (20 + c[i] * per <= left) n = c[i]; print n }')
if ((EPOCHS > 0)); then
	step best $((DEADLINE - SECONDS - RESERVE + 30)) "$PY" -m reslab train --config configs/best.yaml --quiet \
		--out "$RUNS/best" --set "${SET[@]}" train.epochs="$EPOCHS" "${BEST[@]}"
	[[ -d $RUNS/best ]] && tar -cf "$OUT/best-run.tar" -C "$RUNS" best
else
	STEPS="$STEPS best=skipped:0"
fi
step sprint-graphs 150 "$PY" -m reslab train --config configs/sprint.yaml --quiet --out "$RUNS/sprint-graphs" \
	--set "${SET[@]}" train.compile=true train.compile_mode=reduce-overhead
step seed-graphs 150 "$PY" -m reslab train --config configs/seed.yaml --quiet --out "$RUNS/seed-graphs" \
	--set "${SET[@]}" train.compile=true train.compile_mode=reduce-overhead
step profile-seed 60 "$PY" benchmarks/profile_step.py --config configs/seed.yaml --set "${SET[@]}" \
	--steps "$PROFILE_STEPS" --out "$OUT/profile-seed.json"

# wrn: configs/wrn.yaml's full schedule (WRN_EPOCHS, default 200) in WRN_DIR, which git ignores, so the machine
# keeps it between two calls: a call that the DEADLINE stops saves a checkpoint (SIGTERM), and the next call, at
# once, resumes it. Eager, an epoch took 2.7 s on an H200 (3.2 s when tested), too slow for 200 in one call; with
# the CUDA graphs wrn.yaml now asks for, 1.4 s (2.0 s tested, every 5th) after a first epoch of 36 s that compiles
# (session 47). Session 48 ran the 200 in one call: 338 s of epochs, 400 s for the whole step; session 49, with
# dropout, 357 s and 415 s, then 15 s for its evaluation on the GPU, the weights and the packing.
# Once the run has finished, its final checkpoint is evaluated on the device (eval.json, confusion.png,
# errors.png) and comes back with the run's files and its weights alone (fp32, ~36 MB) as wrn.tar.00, .01, ...
# (`cat wrn.tar.* | tar -x`); until then wrn-metrics.jsonl brings its epochs so far.
WRN_BATCH=${WRN_BATCH:-512}
WRN_DIR=${WRN_DIR:-runs/gpu-wrn}
if [[ -z $ONLY || " $ONLY " == *" wrn "* ]]; then
	FROM=(--config configs/wrn.yaml) # or, with a checkpoint there, the run itself
	[[ -f $WRN_DIR/last.pt ]] && FROM=(--resume)
	step wrn $((DEADLINE - SECONDS - 105)) "$PY" -m reslab train "${FROM[@]}" --quiet --out "$WRN_DIR" \
		--set "${SET[@]}" train.epochs="${WRN_EPOCHS:-200}" train.batch_size="$WRN_BATCH"
	[[ -d $WRN_DIR ]] && ln -s "$(realpath "$WRN_DIR")" "$RUNS/wrn" # for results.json
	if [[ -f $WRN_DIR/summary.json ]]; then
		# session 48's evaluation outlived its 40 s limit: `reslab eval` then ran on the host's CPU, not the GPU
		timeout 75 "$PY" -m reslab eval "$WRN_DIR/last.pt" --out "$WRN_DIR/eval" >>"$LOG" 2>&1 ||
			echo "== wrn eval: exit $?" | tee -a "$LOG"
		timeout 25 "$PY" benchmarks/slim_checkpoint.py "$WRN_DIR/last.pt" "$WRN_DIR/weights.pt" >>"$LOG" 2>&1 ||
			echo "== wrn weights: exit $?" | tee -a "$LOG"
		tar -cf "$OUT/wrn.tar" -C "$(dirname "$WRN_DIR")" --exclude=last.pt --exclude=best.pt \
			"$(basename "$WRN_DIR")" && split -b 15M -d "$OUT/wrn.tar" "$OUT/wrn.tar." && rm "$OUT/wrn.tar"
	elif [[ -f $WRN_DIR/metrics.jsonl ]]; then
		cp "$WRN_DIR/metrics.jsonl" "$OUT/wrn-metrics.jsonl"
		echo "== wrn: not finished; the same command, at once, resumes it from $WRN_DIR/last.pt" | tee -a "$LOG"
	fi
else
	STEPS="$STEPS wrn=skipped:0"
fi

STEPS="$STEPS" BEST="${BEST[*]}" "$PY" - "$OUT" "$RUNS" <<'EOF'
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
        if r.get("test_acc", -1) >= goal:  # wrn.yaml tests every 5th epoch
            return {"epoch": r["epoch"], "train_seconds": train, "seconds_with_eval": total}
    return None


def summary(rows):
    return {
        "epochs": len(rows),
        "median_img_s": statistics.median(r["images_per_sec"] for r in rows) if rows else None,
        "final_test_acc": rows[-1].get("test_acc") if rows else None,
        "seconds": sum(r["epoch_seconds"] for r in rows),
        "reached_0.94": time_to(rows, 0.94),
    }


# results.json's key for each run directory: its name with "_" for "-"
run_names = ("seed", "sprint", "sprint-s1", "sprint-s2", "best", "sprint-graphs", "seed-graphs", "wrn")
names = {n.replace("-", "_"): n for n in run_names}
result = {
    "machine": machine(),
    "torch_cuda": torch.version.cuda,
    "steps": dict(s.split("=") for s in os.environ["STEPS"].split()),
    "tests": (out / "pytest.log").read_text().strip(),
    "best_overrides": os.environ.get("BEST", ""),
}
for key, name in names.items():
    rows = history(name)
    result[key] = {**summary(rows), "history": rows}
# the sprint's seeds side by side: each one's training seconds to 0.94 (None: not reached) and final accuracy
sprints = [result[k] for k in ("sprint", "sprint_s1", "sprint_s2") if result[k]["epochs"]]
result["sprint_seeds"] = {
    "train_seconds_to_0.94": [s["reached_0.94"] and s["reached_0.94"]["train_seconds"] for s in sprints],
    "final_test_acc": [s["final_test_acc"] for s in sprints],
    "median_final_test_acc": statistics.median(s["final_test_acc"] for s in sprints) if sprints else None,
}
for name in ("bench", "layout"):
    if (out / f"{name}.json").is_file():
        result[name] = json.loads((out / f"{name}.json").read_text())
(out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
brief = {k: v for k, v in result.items() if k not in ("bench", "layout") and k not in names}
brief["layout"] = result.get("layout", {}).get("medians")
for key in names:
    brief[key] = {k: v for k, v in result[key].items() if k != "history"}
print(json.dumps(brief, indent=1))
EOF
rm -rf "$RUNS"
grep -A20 "^GEMM peak" "$LOG" || true # the bench table, when bench ran
grep -A34 "operators a step" "$LOG" || true # the profiles, when they ran
