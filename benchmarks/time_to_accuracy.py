"""Time to accuracy: the default recipe (configs/fast.yaml) against the seed recipe (configs/seed.yaml, the
notebook's) under the same wall-clock budget, each a whole `reslab train` process on the full data
(reslab.baseline.time_to_accuracy; `reslab bench` runs it too).

fast.yaml runs to its end, and its wall time is the budget (or --budget). The seed recipe then trains for that long
and is stopped as a job scheduler stops a job: SIGTERM, after which the run finishes its current step, saves
last.pt and exits. That checkpoint is evaluated on the full test set with `reslab eval` (its time, and the seconds
the run takes to stop, are not charged to the seed recipe). For each recipe the JSON lists the epochs that ended,
with the seconds of training and testing up to their end, and the seconds to the first epoch at 0.85, 0.90, 0.92
and 0.93 test accuracy.

Usage: .venv/bin/python benchmarks/time_to_accuracy.py [--budget SECONDS] [--set KEY=VALUE ...] [--out FILE]
(--set applies to both recipes: data.root=DIR, ...)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reslab.baseline import time_to_accuracy
from reslab.errors import ReslabError
from reslab.studies.common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", type=float, help="seconds for the seed recipe (default: fast.yaml's wall time)"
    )
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    try:
        measured = time_to_accuracy(args.overrides, args.budget)
    except ReslabError as e:
        sys.exit(f"time_to_accuracy: {e}")
    result = {"command": " ".join(sys.argv), "machine": machine(), **measured}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
