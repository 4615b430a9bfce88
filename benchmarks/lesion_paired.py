"""What does one unit cost on top of the others a draw deletes? (docs/studies/units.md, "One unit among
others, paired").

lesion_split.py compares the draws that delete --unit with those that leave it, but the two sides also differ in
all their other units. Here each of the study's draws of k units (lesion.draws, its ks and --samples) is taken
twice, with the same other units deleted: once with --unit deleted too and once without it. The draw itself is
one of the two, read back from the run's kept lesions (lesion-recalibrated.json) where their key matches these
settings; the other is measured, with the BatchNorm statistics re-estimated on the first --recalibrate training
images as the study does. A draw that deleted the unit gives its cost among k - 1 others, one that left it among k.

With --partner, each draw's units other than the two are taken four times: with neither, either or both of them
deleted. Both units' costs are then read on the same others, with the other unit kept and deleted, and so is their
interaction: a fixed set of draws holds some units more often than others, which a unit's plain paired cost mixes
into it when the units it pairs with matter together.

Evaluated on the first --images test images, in eval mode, in the precision training resolves to (as the study).

Usage: .venv/bin/python benchmarks/lesion_paired.py RUN_DIR... [--unit stage1.0] [--partner stage1.1] [--ks 8,16]
           [--samples 20] [--images 10000] [--recalibrate 10000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reslab.errors import ReslabError
from reslab.studies import lesion, lesion_report


def measure(
    run: Path,
    unit: str,
    ks: list[int],
    samples: int,
    images: int,
    recalibrate: int,
    partner: str | None = None,
) -> dict:
    model, batches, calibration, precision = lesion.of_run(run, images, recalibrate)
    units = lesion.deletable(model)
    for flag, name in (("--unit", unit), ("--partner", partner)):
        if name is not None and name not in units:
            raise ReslabError(f"{flag} {name}: not a deletable unit of {run}; choose from {', '.join(units)}")
    if partner == unit:
        raise ReslabError(f"--partner {partner}: the same unit as --unit; name another")
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
    sides = {"with": [unit], "without": []}  # what each pair deletes beside the draw's other units
    if partner is not None:
        sides = {"none": [], "unit": [unit], "partner": [partner], "both": [unit, partner]}
    found = []
    for k, sets in study_draws.items():
        pairs = []
        for i, names in enumerate(sets):
            others = [name for name in names if name not in (unit, partner)]
            pair = {"others": others}
            # the draw itself is one of the sides: its kept error is read back
            for side, extra in sides.items():
                drawn = k in kept_errors and set(others + extra) == set(names)
                pair[side] = kept_errors[k][i] if drawn else error(others + extra)
            pairs.append(pair)
        found.append({"k": k, "pairs": pairs, **(costs(pairs, k) if partner is None else effects(pairs))})
        print(lines(run.name, unit, alone - intact, found[-1], partner), flush=True)
    return {
        "run": str(run),
        "unit": unit,
        **({"partner": partner} if partner is not None else {}),
        "intact": intact,
        "unit_alone": alone,
        "ks": found,
        "settings": settings,
    }


def costs(pairs: list[dict], k: int) -> dict:
    """The unit's cost in each pair, over all pairs and split by whether the draw deleted it (k - 1 others)."""
    cost = [p["with"] - p["without"] for p in pairs]
    return {
        "all": lesion_report.summary(cost),
        **{
            side: lesion_report.summary([c for c, p in zip(cost, pairs) if len(p["others"]) == n])
            for side, n in (("among_k_minus_1", k - 1), ("among_k", k))
        },
    }


def effects(pairs: list[dict]) -> dict:
    """With a partner: each unit's cost with the other kept and with it deleted, on the same others, and their
    interaction (both - unit - partner + none: above 0 when the two stand in for each other)."""
    each = {
        "unit_partner_kept": ("unit", "none"),
        "unit_partner_deleted": ("both", "partner"),
        "partner_unit_kept": ("partner", "none"),
        "partner_unit_deleted": ("both", "unit"),
    }
    found = {name: lesion_report.summary([p[a] - p[b] for p in pairs]) for name, (a, b) in each.items()}
    found["interaction"] = lesion_report.summary(
        [p["both"] - p["unit"] - p["partner"] + p["none"] for p in pairs]
    )
    return found


def lines(name: str, unit: str, alone_cost: float, k: dict, partner: str | None = None) -> str:
    """One k's paired costs of the unit, beside its cost deleted alone (with a partner: both units' costs with
    the other kept and deleted, and their interaction)."""

    def show(s: dict) -> str:
        if s["mean"] is None:
            return "-"
        stderr = f" ± {s['stderr']:.3f}" if s["stderr"] is not None else ""
        return f"{s['mean']:+.3f}{stderr} ({s['n']})"

    if partner is not None:
        return (
            f"{name}: {unit} alone {alone_cost:+.3f}; among {k['k']} drawn, {unit} with {partner} kept "
            f"{show(k['unit_partner_kept'])}, deleted {show(k['unit_partner_deleted'])}; {partner} with {unit} "
            f"kept {show(k['partner_unit_kept'])}, deleted {show(k['partner_unit_deleted'])}; "
            f"interaction {show(k['interaction'])}"
        )
    return (
        f"{name}: {unit} alone {alone_cost:+.3f}; among {k['k'] - 1} others {show(k['among_k_minus_1'])}, "
        f"among {k['k']} {show(k['among_k'])}, all {show(k['all'])}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unit", default="stage1.0", help="the unit to pair the draws by (default: the first)")
    p.add_argument(
        "--partner", help="a second unit: each draw's other units with neither, either or both deleted"
    )
    lesion.measure_runs(
        p, lambda a, run, ks: measure(run, a.unit, ks, a.samples, a.images, a.recalibrate, a.partner)
    )


if __name__ == "__main__":
    main()
