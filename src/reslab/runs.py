"""`reslab runs`: the run directories under a folder as one table, read from their text files (no checkpoint
is loaded)."""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import yaml

from .config import SafeLoader, flat, load
from .errors import ReslabError, is_count
from .history import CROWDED, best_by_val, epoch_fault, n_epochs, tested, time_to_go
from .lock import lock_owner


def find_runs(paths: list[str]) -> list[Path]:
    """Each path that is a run directory (it has a config.yaml, or a last.pt that --resume continues without
    one), else the run directories anywhere under it."""

    def is_run(path: Path) -> bool:
        return (path / "config.yaml").is_file() or (path / "last.pt").is_file()

    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReslabError(f"{path} is not a directory" if path.exists() else f"{path}: no such directory")
        if is_run(path):
            found.append(path)
            continue
        marks = [*path.rglob("config.yaml"), *path.rglob("last.pt")]
        found += sorted({p.parent for p in marks if p.is_file()})
    return found


# what an epoch's metrics measure of the machine rather than of the training: two runs of the same training differ
TIMINGS = ("images_per_sec", "epoch_seconds", "cpu_wait")


def without_timings(rows: list[dict]) -> list[dict]:
    """An epoch's metrics rows without TIMINGS, for comparing the training of two runs."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def read_history(run: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per finished epoch ([] before the first). A line that is not an epoch's
    metrics as reslab writes them (history.epoch_fault: a file edited by hand, or cut short) is a ReslabError
    naming the file and the line."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ReslabError(f"{path}: not text ({e.reason} at byte {e.start})") from None
    history = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():  # a blank line (an editor's) holds no epoch
            continue
        try:
            h = json.loads(line)
        except ValueError as e:
            raise ReslabError(f"{path}: line {n} is not JSON ({e})") from None
        if why := epoch_fault(h, len(history) + 1):
            raise ReslabError(f"{path}: line {n}: {why}")
        history.append(h)
    return history


def gave_up(path: Path) -> str:
    """' in epoch 3': the epoch diverged.json says the divergence guard gave up in ('' if it cannot be read)."""
    try:
        epoch = json.loads(path.read_text()).get("epoch")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" in epoch {epoch}" if is_count(epoch) else ""


def describe(run: Path) -> dict:
    """What a run directory holds: its model (and the run it started from), epochs done of those planned, last
    and best test accuracy, training seconds and how many epochs other processes slowed (their threads waited for
    a CPU CROWDED of the time or more: the seconds say little of the recipe), and its state (finished, stopped and
    resumable, diverged, training now, or never checkpointed)."""
    if not (run / "config.yaml").is_file():  # deleted by hand: last.pt still holds the config for --resume
        return {"run": str(run), "state": "no config.yaml; --resume continues it from last.pt"}
    try:
        cfg = yaml.load((run / "config.yaml").read_text(), Loader=SafeLoader) or {}
    except (OSError, ValueError, yaml.YAMLError) as e:  # a YAML or decoding error does not name the file
        return {"run": str(run), "state": f"unreadable (config.yaml: {str(e).splitlines()[0]})"}
    try:
        history = read_history(run)
    except (OSError, ReslabError) as e:
        return {"run": str(run), "state": f"unreadable ({str(e).splitlines()[0]})"}
    if not isinstance(cfg, dict):
        return {"run": str(run), "state": "unreadable (config.yaml is not a mapping)"}

    def section(name: str) -> dict:  # a config edited by hand may hold anything where a section should be
        return value if isinstance(value := cfg.get(name), dict) else {}

    planned = section("train").get("epochs")
    planned = planned if is_count(planned) else None  # train.epochs as reslab writes it, else unknown
    scored = tested(history)  # train.eval_every > 1 skips some epochs
    done = len(history)
    owner = lock_owner(run)
    if owner is not None:
        left = time_to_go(history, planned) if planned is not None else None
        state = f"training (pid {owner}{f', {left} to go' if left else ''})"
    elif done and done >= (planned or 0) and (run / "summary.json").is_file():
        state = "finished"
    elif (run / "diverged.json").is_file():
        state = f"diverged{gave_up(run / 'diverged.json')}; --resume tries again (lower optim.lr with --set)"
    elif (run / "last.pt").is_file():
        state = "stopped; --resume continues it"
    else:
        state = "no checkpoint"
    return {
        "run": str(run),
        "model": section("model").get("name"),
        "init": section("model").get("init"),  # the run its weights started from, if any
        "epochs": done,
        "planned_epochs": planned,
        "test_acc": scored[-1]["test_acc"] if scored else None,  # the last evaluated epoch
        "best_test_acc": max(h["test_acc"] for h in scored) if scored else None,
        **best_by_val(scored),  # with data.val: best.pt's epoch, as summary.json names it
        "train_seconds": sum(h["epoch_seconds"] for h in history),
        "crowded_epochs": sum(h.get("cpu_wait", 0.0) >= CROWDED for h in history),
        "state": state,
    }


def _acc(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _model(row: dict) -> str:
    """The run's model, and the run its weights started from, if any."""
    return f"{row['model']}{f' from {init}' if (init := row.get('init')) else ''}"


def table(rows: list[dict]) -> str:
    # best.pt's test accuracy: with data.val, the epoch the validation chose, not the test set's best
    def best(r: dict) -> str:
        if "test_acc_at_best_val" in r:
            return f"{_acc(r['test_acc_at_best_val'])} (by val)"
        return _acc(r["best_test_acc"])

    def shared(epochs: int) -> str:
        return f" (CPU shared in {n_epochs(epochs)})" if epochs else ""

    def cells(r: dict) -> list[str]:
        return [
            r["run"],
            as_set(r.get("settings", {})),
            _model(r),
            f"{r['epochs']}/{r['planned_epochs']}",
            _acc(r["test_acc"]),
            best(r),
            f"{r['train_seconds']:.0f}{shared(r['crowded_epochs'])}",
            r["state"],
        ]

    return _markdown(
        ["run", "settings", "model", "epochs", "test acc", "best", "seconds", "state"], rows, cells
    )


def _markdown(columns: list[str], rows: list[dict], cells) -> str:
    """A Markdown table: `cells` of each row that has a model, the place and state alone of one that does not
    (unreadable)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        row = cells(r) if "model" in r else [r["run"], *[""] * (len(columns) - 2), r["state"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def recipe(run: Path) -> dict:
    """A run's config as dotted keys (as --set names them), every key resolved, without its name (a label)."""
    values = flat(_resolved(run / "config.yaml"))
    values.pop("name", None)
    return values


def apart(recipes: list[dict]) -> list[dict]:
    """For each config, the keys whose values are not the same in all of them: what sets it apart."""
    keys = {k for r in recipes for k in r}
    # a key some configs lack (another model's options) varies too: a missing key is not a value that could be equal
    varying = sorted(
        k for k in keys if len({(k in r, json.dumps(r.get(k), default=str)) for r in recipes}) > 1
    )
    return [{k: r[k] for k in varying if k in r} for r in recipes]


def add_settings(runs: list[Path], rows: list[dict]) -> None:
    """Each readable run's row gets its settings: what sets it apart from the other runs listed."""
    readable = [(run, row) for run, row in zip(runs, rows) if "model" in row]
    for (_, row), settings in zip(readable, apart([recipe(run) for run, _ in readable])):
        row["settings"] = settings


def seed_groups(runs: list[Path], rows: list[dict]) -> list[dict]:
    """The rows of runs whose configs differ in `seed` alone, as one row each (runs that cannot be read stay rows
    of their own): the settings that set it apart from the other rows, the seeds, the median and range over the
    seeds of the finished runs' last test accuracy (a seed run more than once counts once, at its runs' median)
    and the finished runs' median seconds, as a recipe's result is quoted over seeds. In the order of each
    group's first run."""
    groups: dict[str, list[tuple[Path, dict, object]]] = {}
    recipes: dict[str, dict] = {}  # each group's config, without its seed
    for run, row in zip(runs, rows):
        if "model" not in row:  # unreadable: nothing to compare it by
            groups[f"run {run}"] = [(run, row, None)]
            continue
        values = recipe(run)
        seed = values.pop("seed", None)
        seed = json.dumps(seed) if isinstance(seed, list | dict) else seed  # a hand-edited one, as written
        key = json.dumps(values, sort_keys=True, default=str)
        groups.setdefault(key, []).append((run, row, seed))
        recipes[key] = values
    settings = dict(zip(recipes, apart(list(recipes.values()))))
    out = []
    for key, members in groups.items():
        first = members[0][1]
        if "model" not in first:
            out.append(first)
            continue
        finished = [row for _, row, _ in members if row["state"] == "finished"]
        by_seed: dict[object, list[float]] = {}  # a seed run again counts once: its runs' median
        for _, row, seed in members:
            if row["state"] == "finished" and row["test_acc"] is not None:
                by_seed.setdefault(seed, []).append(row["test_acc"])
        accs = [statistics.median(runs_of_seed) for runs_of_seed in by_seed.values()]
        epochs = sorted({row["epochs"] for _, row, _ in members})
        states = Counter(row["state"].split(" (")[0].split(";")[0] for _, row, _ in members)
        out.append(
            {
                "run": braces([str(run) for run, _, _ in members]),
                "runs": [str(run) for run, _, _ in members],
                "settings": settings[key],
                "seeds": [seed for _, _, seed in members],
                "finished_seeds": len(by_seed),
                "model": first["model"],
                "init": first["init"],
                "epochs": epochs[0] if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}",
                "planned_epochs": first["planned_epochs"],
                "finished": len(finished),
                "test_acc": statistics.median(accs) if accs else None,
                "test_acc_min": min(accs) if accs else None,
                "test_acc_max": max(accs) if accs else None,
                "train_seconds": statistics.median(r["train_seconds"] for r in finished)
                if finished
                else None,
                "state": ", ".join(f"{n} {state}" for state, n in states.items()),
            }
        )
    return out


def _resolved(path: Path) -> dict:
    """A run's config with every key, so that a run from before a key existed compares as its default; as written
    when this version cannot read it."""
    try:
        return asdict(load(path, model=False))
    except ReslabError:
        return yaml.load(path.read_text(), Loader=SafeLoader)


def as_set(settings: dict) -> str:
    """Settings as --set takes them: optim.lr=0.1 model.options.width=64."""
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items())


def braces(names: list[str], most: int = 4) -> str:
    """Paths as one shell brace pattern: runs/fast-s{0,1,2}; one path as itself, more than `most` as the first and
    how many more."""
    if len(names) == 1:
        return names[0]
    if len(names) > most:
        return f"{names[0]} and {len(names) - 1} more"
    head = os.path.commonprefix(names)
    tail = os.path.commonprefix([n[len(head) :][::-1] for n in names])[::-1]
    return f"{head}{{{','.join(n[len(head) : len(n) - len(tail)] for n in names)}}}{tail}"


def group_table(groups: list[dict]) -> str:
    def cells(g: dict) -> list[str]:
        seeds = ", ".join(
            f"{seed}{f' ({n} runs)' if n > 1 else ''}" for seed, n in Counter(g["seeds"]).items()
        )
        return [
            g["run"],
            as_set(g["settings"]),
            seeds,
            _model(g),
            f"{g['epochs']}/{g['planned_epochs']}",
            _acc(g["test_acc"]),
            f"{_acc(g['test_acc_min'])}-{_acc(g['test_acc_max'])}" if g["finished_seeds"] > 1 else "",
            "" if g["train_seconds"] is None else f"{g['train_seconds']:.0f}",
            g["state"],
        ]

    columns = [
        "runs",
        "settings",
        "seeds",
        "model",
        "epochs",
        "test acc (median)",
        "range",
        "seconds (median)",
        "state",
    ]
    return _markdown(columns, groups, cells)
