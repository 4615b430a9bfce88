"""What does one unit cost on top of the others a draw deletes? (docs/studies/units.md, "One unit among
others, paired").

lesion_split.py compares the draws that delete --unit with those that leave it, but the two sides also differ in
all their other units. Here each of the study's draws of k units (lesion.draws, its ks and --samples) is taken
twice, with the same other units deleted: once with --unit deleted too and once without it. The draw itself is
one of the two, read back from the run's kept lesions (lesion-recalibrated.json) where their key matches these
settings; the other is measured, with the BatchNorm statistics re-estimated on the first --recalibrate training
images as the study does. A draw that deleted the unit gives its cost among k - 1 others, one that left it among k.

Evaluated on the first --images test images, in eval mode, in the precision training resolves to (as the study).

Usage: .venv/bin/python benchmarks/lesion_paired.py RUN_DIR... [--unit stage1.0] [--ks 8,16] [--samples 20]
           [--images 10000] [--recalibrate 10000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reslab.errors import ReslabError
from reslab.studies import lesion


def measure(run: Path, unit: str, ks: list[int], samples: int, images: int, recalibrate: int) -> dict:
    model, batches, calibration, precision = lesion.of_run(run, images, recalibrate)
    units = lesion.deletable(model)
    if unit not in units:
        raise ReslabError(f"--unit {unit}: not a deletable unit of {run}; choose from {', '.join(units)}")
    study_draws = lesion.draws_of(run, units, ks, samples)
    settings = lesion.settings_of(batches, calibration, lesion.KS, samples, precision)

    def error(names: list[str]) -> float:
        return lesion.error_without(model, names, batches, precision, calibration)

    kept = lesion.read_kept(run / lesion.KEPT_RECALIBRATED, lesion.key_of(run, settings))
    if kept is None:
        print(f"{run.name}: no kept lesions under these settings; each draw is measured too", flush=True)
        kept = {"intact": error([]), "single": [], "random": []}
    kept_errors = {r["k"]: r["errors"] for r in kept["random"]}
    intact = kept["intact"]
    alone = kept["single"][units.index(unit)] if kept["single"] else error([unit])
    found = []
    for k, sets in study_draws.items():
        pairs = []
        for i, names in enumerate(sets):
            others = [name for name in names if name != unit]
            drawn = kept_errors[k][i] if k in kept_errors else error(names)
            other = error(others + [unit] if unit not in names else others)
            with_unit, without_unit = (drawn, other) if unit in names else (other, drawn)
            pairs.append({"others": others, "with": with_unit, "without": without_unit})
        costs = [p["with"] - p["without"] for p in pairs]
        sides = {
            side: lesion.summary([c for c, p in zip(costs, pairs) if len(p["others"]) == n])
            for side, n in (("among_k_minus_1", k - 1), ("among_k", k))
        }
        found.append({"k": k, "pairs": pairs, "all": lesion.summary(costs), **sides})
        print(lines(run.name, unit, alone - intact, found[-1]), flush=True)
    return {
        "run": str(run),
        "unit": unit,
        "intact": intact,
        "unit_alone": alone,
        "ks": found,
        "settings": settings,
    }


def lines(name: str, unit: str, alone_cost: float, k: dict) -> str:
    """One k's paired costs of the unit, beside its cost deleted alone."""

    def show(s: dict) -> str:
        if s["mean"] is None:
            return "-"
        stderr = f" ± {s['stderr']:.3f}" if s["stderr"] is not None else ""
        return f"{s['mean']:+.3f}{stderr} ({s['n']})"

    return (
        f"{name}: {unit} alone {alone_cost:+.3f}; among {k['k'] - 1} others {show(k['among_k_minus_1'])}, "
        f"among {k['k']} {show(k['among_k'])}, all {show(k['all'])}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unit", default="stage1.0", help="the unit to pair the draws by (default: the first)")
    lesion.measure_runs(p, lambda a, run, ks: measure(run, a.unit, ks, a.samples, a.images, a.recalibrate))


if __name__ == "__main__":
    main()
