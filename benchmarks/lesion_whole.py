"""Does a deleted unit cost what its branch did, or also what its deletion leaves on the stream?
(docs/studies/units.md, "Deleting whole units").

The study deletes a unit's residual branch, F(x) = 0, and leaves x' = f(s h(x)) (lesion.without): x itself for an
unscaled identity shortcut in the original and pre-activation orders, but relu(BN(x)) with BN after the addition
and relu(x/2) = x/2 with the shortcut scaled by 0.5. There a deletion also changes every path through the unit: a
BatchNorm re-scales them, or they are halved, compared with those through the units after it. Here each unit goes
two ways, with the BatchNorm statistics re-estimated on the first --recalibrate training images after each:
- branch: the study's lesion, read back from the run's kept lesions (lesion-recalibrated.json) where their key
  matches these settings, measured otherwise;
- whole: the unit replaced by the identity, x' = x (lesion.without(whole=True)).
Each unit alone, and k units at a time in the study's own draws (lesion.draws, the study's ks and --samples) for
each k of --ks. If the whole deletions cost much less, the cost was the re-scaling, not the lost branch.

Evaluated on the first --images test images, in eval mode, in the precision training resolves to (as the study).

Usage: .venv/bin/python benchmarks/lesion_whole.py RUN_DIR... [--ks 8,16] [--samples 20] [--images 10000]
           [--recalibrate 10000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import fmean

from reslab.studies import lesion


def measure(run: Path, ks: list[int], samples: int, images: int, recalibrate: int) -> dict:
    model, batches, calibration, precision = lesion.of_run(run, images, recalibrate)
    units = lesion.deletable(model)
    drawn = lesion.draws_of(run, units, ks, samples)
    settings = lesion.settings_of(batches, calibration, lesion.KS, samples, precision)

    def error(names: list[str], whole: bool) -> float:
        return lesion.error_without(model, names, batches, precision, calibration, whole)

    def deletions(whole: bool) -> dict:
        return {
            "single": [error([u], whole) for u in units],
            "random": [
                {"k": k, "errors": [error(names, whole) for names in sets]} for k, sets in drawn.items()
            ],
        }

    kept = lesion.read_kept(run / lesion.KEPT_RECALIBRATED, lesion.key_of(run, settings))
    if kept is not None:
        print(f"{run.name}: the branch deletions kept in {run / lesion.KEPT_RECALIBRATED}", flush=True)
        branch = {"single": kept["single"], "random": [r for r in kept["random"] if r["k"] in drawn]}
        intact = kept["intact"]
    else:
        intact, branch = error([], False), deletions(False)
    whole = deletions(True)
    for way, found in (("branch", branch), ("whole", whole)):
        costs = sorted(100 * (e - intact) for e in found["single"])
        means = ", ".join(f"{r['k']} deleted {fmean(r['errors']):.3f}" for r in found["random"])
        print(
            f"{run.name} {way}: one deleted, median cost {costs[len(costs) // 2]:.1f} points; {means}",
            flush=True,
        )
    return {"run": str(run), "units": units, "intact": intact, "branch": branch, "whole": whole, **settings}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lesion.measure_runs(p, lambda a, run, ks: measure(run, ks, a.samples, a.images, a.recalibrate))


if __name__ == "__main__":
    main()
