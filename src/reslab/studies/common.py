"""What every study shares: a grid of ordinary runs (finished ones skipped), results.json, the machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from .. import config as config_mod
from ..config import Config
from ..errors import ReslabError
from ..files import write_text


def machine() -> dict:
    """A description of where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def final_nets(run_dirs: dict[str, Path]) -> dict[str, tuple[torch.nn.Module, dict]]:
    """{name: (model, meta)}: each run directory's final weights, from its last.pt. A run whose last.pt is gone or
    unreadable (its summary.json and metrics kept) is left out with a note: the study's tables need only those."""
    from ..engine.checkpoint import CheckpointError
    from ..report import load_model

    nets = {}
    for name, d in run_dirs.items():
        try:
            model, meta, _ = load_model(d / "last.pt")
        except CheckpointError as e:
            print(f"note: {name} is left out of the measures of trained nets: {e}", flush=True)
            continue
        nets[name] = (model, meta)
    return nets


def run_grid(runs: list[tuple[str, Config]], out: Path, quiet: bool = True) -> list[dict] | None:
    """Train each (name, config) into out/runs/name, skipping runs whose summary.json exists (resumable).
    A run interrupted mid-way resumes from its last checkpoint. Returns [{name, summary, history}]; under
    torchrun every rank trains each run with the others, and the ranks above 0 return None: what a study
    measures and writes after training is rank 0's."""
    from ..engine import Interrupted, checkpoint, dist, fit
    from ..runs import read_history

    for name, cfg in runs:  # before anything trains: a study's rows must all follow its own settings
        _check_same_settings(out / "runs" / name, cfg)
    main = dist.is_main_process()
    results = []
    for i, (name, cfg) in enumerate(runs, 1):
        run_dir = out / "runs" / name
        if not (run_dir / "summary.json").is_file():
            if main:
                print(f"[{i}/{len(runs)}] {name}", flush=True)
            resume = (run_dir / "last.pt").is_file()
            if resume:
                try:
                    checkpoint.load(run_dir / "last.pt")
                except checkpoint.CheckpointError:
                    resume = False
            try:  # overwrite: an unreadable last.pt starts again
                fit(cfg, run_dir, resume=resume, quiet=quiet, overwrite=not resume)
            except Interrupted as e:
                raise Interrupted(e.signum, e.out, "the same reslab study command (it resumes)") from None
        if main:
            summary = json.loads((run_dir / "summary.json").read_text())
            results.append({"name": name, "summary": summary, "history": read_history(run_dir)})
    return results if main else None


# settings that decide where files are and how a run is kept, not what it learns: a study run again may change them
HOW_IT_RUNS = {
    "data.root",
    "data.download",
    "train.eval_batch_size",
    "train.save_every",
    "train.checkpoint_every",
    "train.on_checkpoint_error",
    "train.max_retries",
    "train.guard_every",
}


def _check_same_settings(run_dir: Path, cfg: Config) -> None:
    """A run directory already there (finished, or stopped midway) was trained with the settings it saved in
    config.yaml; reusing it under other ones would put its numbers in a table that names the new ones. One
    stopped before its first checkpoint keeps nothing to reuse: fit() starts it again under the new
    settings."""
    if not any((run_dir / f).is_file() for f in ("summary.json", "last.pt")):
        return
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return  # fit() will refuse or restart it by its own rules
    if not isinstance(saved, dict):
        return
    changed = {k: v for k, v in config_mod.changes(saved, cfg.to_dict()).items() if k not in HOW_IT_RUNS}
    if changed:
        said = ", ".join(f"{k} {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise ReslabError(
            f"{run_dir} was trained with other settings ({said}); run the study with that run's settings, "
            "or choose another --out"
        )


EVERY_EPOCH = {"train.eval_every": "every epoch: its curves"}  # what each study's refuse_chosen adds


def refuse_chosen(overrides: list[str], chosen: dict[str, str]) -> None:
    """A study sets some keys itself (chosen: key -> which flag or what sets it); a --set of one of them would
    be replaced without a word, so it is an error."""
    given = config_mod.flat(config_mod.parse_overrides(overrides))
    for key, how in chosen.items():
        for k in given:
            if k == key or k.startswith(key + "."):
                raise ReslabError(f"--set {k}: the study chooses {key} ({how}); leave it out of --set")


def check_choices(flag: str, values, valid, what: str) -> None:
    """Each of a flag's `values` one of `valid` (None: checked elsewhere), none twice: a repeat would train
    nothing new but count its runs twice, as if they were more seeds. Raises ReslabError naming the first fault."""
    if valid is not None and (bad := [v for v in values if v not in valid]):
        raise ReslabError(f"{flag}: unknown {what} {bad[0]!r}; choose from {', '.join(map(str, valid))}")
    if len(set(values)) < len(values):
        raise ReslabError(f"{flag}: {', '.join(map(str, values))} names a {what} twice")


def with_changes(cfg: Config, **changes) -> Config:
    """A copy of cfg with dotted changes: with_changes(cfg, **{"model.name": "plain20"})."""
    values = cfg.to_dict()
    for key, value in changes.items():
        node = values
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return config_mod.from_dict(values)


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def error_curve(history: list[dict]) -> list[dict]:
    """Training and test error per epoch of a run's metrics."""
    return [
        {"epoch": e["epoch"], "train_error": 1 - e["train_acc"], "test_error": 1 - e["test_acc"]}
        for e in history
    ]


def error_stats(rows: list[dict]) -> dict:
    """Mean and spread over seeds of the final training and test errors of some runs."""
    train_m, train_s = mean_spread([r["final_train_error"] for r in rows])
    test_m, test_s = mean_spread([r["final_test_error"] for r in rows])
    return {
        "seeds": len(rows),
        "train_error": train_m,
        "train_error_std": train_s,
        "test_error": test_m,
        "test_error_std": test_s,
    }


def finish(out: Path, payload: dict, table, figure) -> dict:
    """Write results.json, table.md and figure.png of a study."""
    write_json(out / "results.json", payload)
    write_text(out / "table.md", table(payload))
    figure(payload, out / "figure.png")
    return payload


def write_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
