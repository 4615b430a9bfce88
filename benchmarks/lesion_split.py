"""How much of a net's fall with k units deleted is one unit's? (docs/studies/units.md, "Three orders, three
seeds, at 20 draws").

The studies delete k units at a time in seeded draws (lesion.draws) and keep each draw's test error in the run
directory (lesion-recalibrated.json with the statistics re-estimated, lesion.json as trained). This splits each
k's draws in two, those that delete --unit and those that leave it, and gives each side's mean error and its
standard error. Nothing is measured: the kept lesions are read, checked against the run's own last.pt, and their
sets drawn again.

Usage: .venv/bin/python benchmarks/lesion_split.py RUN_DIR... [--unit stage1.0] [--as-trained] [--out FILE.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reslab.errors import ReslabError
from reslab.files import make_file_dir
from reslab.studies import lesion, lesion_report
from reslab.studies.common import write_json


def stats(errors: list[float]) -> dict:
    """Some draws' errors, their number, mean and standard error (None below two draws)."""
    return {"errors": errors, **lesion_report.summary(errors)}


def split(run: Path, unit: str, kept_name: str = lesion.KEPT_RECALIBRATED) -> dict:
    """The run's kept k-deleted errors, all and split by whether the draw deletes `unit`."""
    path = run / kept_name
    try:
        key, kept = lesion.kept_in(path)
        sha = lesion.key_of(run, {})["checkpoint_sha256"]
    except (OSError, TypeError):  # no last.pt; no kept file (None)
        raise ReslabError(
            f"{run}: no kept lesions with a last.pt beside them ({kept_name}); run a study on it first"
        ) from None
    if key.get("checkpoint_sha256") != sha:
        raise ReslabError(f"{path}: kept for another last.pt than the one beside it")
    if unit not in kept["units"]:
        raise ReslabError(
            f"--unit {unit}: not a deletable unit of {run}; choose from {', '.join(kept['units'])}"
        )
    drawn = dict(lesion.draws(kept["units"], tuple(key["ks"]), key["samples"]))
    ks = []
    for r in kept["random"]:
        sets = drawn[r["k"]]
        if len(sets) != len(r["errors"]):
            raise ReslabError(f"{path}: {len(r['errors'])} errors for {len(sets)} draws of {r['k']} units")
        with_unit = [e for e, names in zip(r["errors"], sets) if unit in names]
        without = [e for e, names in zip(r["errors"], sets) if unit not in names]
        ks.append(
            {"k": r["k"], "all": stats(r["errors"]), "with": stats(with_unit), "without": stats(without)}
        )
    alone = kept["single"][kept["units"].index(unit)]
    return {
        "run": str(run),
        "unit": unit,
        "intact": kept["intact"],
        "unit_alone": alone,
        "ks": ks,
        "key": key,
    }


def lines(found: dict) -> str:
    """The net, then a line for each k: its draws' mean error, with the unit deleted and without."""

    def show(s: dict) -> str:
        if s["mean"] is None:
            return "-"
        return (
            f"{s['mean']:.3f}" + (f" ± {s['stderr']:.3f}" if s["stderr"] is not None else "") + f" ({s['n']})"
        )

    name, unit = Path(found["run"]).name, found["unit"]
    head = f"{name}: intact {found['intact']:.3f}, {unit} deleted alone {found['unit_alone']:.3f}"
    rows = [
        f"  {r['k']:>2} deleted {show(r['all'])}: with {unit} {show(r['with'])}, without {show(r['without'])}"
        for r in found["ks"]
    ]
    return "\n".join([head, *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories a study has lesioned")
    p.add_argument("--unit", default="stage1.0", help="the unit to split the draws by (default: the first)")
    p.add_argument("--as-trained", action="store_true", help="the lesions as trained (lesion.json)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    kept_name = lesion.KEPT if args.as_trained else lesion.KEPT_RECALIBRATED
    try:
        out = args.out and make_file_dir(args.out, "results.json")
        nets = [split(run, args.unit, kept_name) for run in args.runs]
    except ReslabError as e:
        p.error(str(e))
    for found in nets:
        print(lines(found))
    if out:
        write_json(out, {"nets": nets})


if __name__ == "__main__":
    main()
