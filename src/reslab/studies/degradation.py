"""The degradation problem (He et al. 2015, Fig. 1 and 6): deeper plain nets train worse; residual nets don't.

Trains plain-N and resnet-N (CIFAR-style 6n+2, option-A shortcuts, identical recipe) for each depth and
records training and test error per epoch, then the trained nets' layer responses (the paper's Fig. 7, in
responses.py), the gradients the backward pass carries through them (gradients.py), and their test error with
units deleted (lesion.py, Veit et al. 2016). `--quick` fits a 2-core CPU in about half an hour.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .. import config
from ..config import Config
from ..data import load_dataset
from ..errors import ReslabError
from ..files import make_dir
from ..models import list_models
from . import gradients, lesion, lesion_report, responses
from .common import (
    EVERY_EPOCH,
    Timer,
    check_choices,
    error_curve,
    error_stats,
    final_nets,
    finish,
    machine,
    refuse_chosen,
    run_grid,
    with_changes,
)

DEPTHS = (20, 32, 44, 56)
# the paper's CIFAR recipe, shortened: SGD 0.1, momentum 0.9, weight decay 1e-4, batch 128, lr / 10 at
# 50% and 75% of the run; a short warm-up so that the deepest plain nets start at all (as the paper's 110)
RECIPE = [
    "optim.name=sgd",
    "optim.lr=0.1",
    "optim.momentum=0.9",
    "optim.weight_decay=1e-4",
    "optim.schedule=step",
    "optim.warmup_epochs=0.5",
    "train.batch_size=128",
    "train.ema=0",
    "train.tta_flip=false",
]
FULL = ["train.epochs=30"]
QUICK = ["data.limit=6000", "train.epochs=5"]
NETS = ("plain", "resnet")


def plan(quick: bool, seeds: int, overrides: list[str], depths=DEPTHS, nets=NETS) -> list[tuple[str, Config]]:
    check(depths, nets)
    refuse_chosen(
        overrides, {"model": "--depths and --nets", "seed": "--seeds", "name": "one per run", **EVERY_EPOCH}
    )
    base = config.load(None, RECIPE + (QUICK if quick else FULL) + overrides)
    runs = []
    for net in nets:
        for depth in depths:
            for seed in range(seeds):
                model = f"{net}{depth}"
                cfg = with_changes(base, **{"model.name": model, "seed": seed, "name": f"{model}-s{seed}"})
                runs.append((cfg.name, cfg))
    return runs


def check(depths, nets) -> None:
    """Only the CIFAR-style 6n+2 nets that exist both plain and residual, each once; raises ReslabError."""
    check_choices("--nets", nets, NETS, "net")
    check_choices("--depths", depths, None, "depth")  # which depths exist: below
    names = list_models()
    valid = [int(n[5:]) for n in names if n[:5] == "plain" and f"resnet{n[5:]}" in names]
    valid = [d for d in valid if (d - 2) % 6 == 0]
    if bad := [d for d in depths if d not in valid]:
        raise ReslabError(
            f"--depths: no CIFAR-style plain/ResNet pair of depth {bad[0]}; choose from {valid}"
        )


def run(
    out: Path,
    quick: bool = False,
    seeds: int = 1,
    overrides: list[str] | None = None,
    depths=DEPTHS,
    nets=NETS,
    draws: int = 3,
    recalibrate: int = 0,
) -> dict | None:
    runs = plan(quick, seeds, overrides or [], depths, nets)  # before anything is written: it checks
    out = make_dir(Path(out))
    with Timer() as timer:
        results = run_grid(runs, out)
        if results is None:  # under torchrun, a rank above 0: rank 0 measures and writes
            return None
        # the seed-0 nets' final weights, read on the test images every run shares
        seed0 = {
            r["summary"]["model"]: out / "runs" / r["name"] for r in results if r["name"].endswith("-s0")
        }
        # loaded once for both measures: the nets, and the data every run trained on
        nets, data_cfg = final_nets(seed0), runs[0][1].data
        data = load_dataset(data_cfg) if nets else None
        found = responses.of_nets(nets, data, data_cfg)
        backward = gradients.of_nets(nets, data, data_cfg)
        # --quick reads the lesions on 2,000 test images: each error within about 0.7 point
        lesioned = lesion.of_nets(
            nets,
            data,
            data_cfg,
            images=2000 if quick else None,
            samples=draws,
            run_dirs=seed0,
            recalibrate=recalibrate,
        )
    rows = []
    for r in results:
        s, h = r["summary"], r["history"]
        depth = int("".join(c for c in s["model"] if c.isdigit()))
        rows.append(
            {
                "model": s["model"],
                "depth": depth,
                "residual": s["model"].startswith("resnet"),
                "seed": int(r["name"].rsplit("-s", 1)[1]),
                "final_train_error": 1 - h[-1]["train_acc"],
                "final_test_error": 1 - h[-1]["test_acc"],
                "curve": error_curve(h),
                "train_seconds": s["train_seconds"],
            }
        )
    payload = {
        "study": "degradation",
        "quick": quick,
        "runs": rows,
        "aggregate": aggregate(rows),
        "config": runs[0][1].to_dict(),
        "machine": machine(),
        "seconds": timer.seconds,  # of this call (training, responses, gradients); it skips runs finished before
        "train_seconds": sum(r["summary"]["train_seconds"] for r in results),  # every run's, whenever it ran
        "responses": found,
        "gradients": backward,
        "lesion": lesioned,
    }
    if found["nets"]:
        responses.figure(found, out / "responses.png", untrained(rows, found["classes"]))
    if backward["init"]:
        gradients.figure(backward, out / "gradients.png")
    if lesioned["nets"]:
        lesion_report.figure(lesioned, out / "lesion.png", chance=1 - 1 / found["classes"])
    return finish(out, payload, table, figure)


def untrained(rows: list[dict], classes: int) -> tuple[str, ...]:
    """The nets whose seed-0 test error lies closer to chance (1 - 1/classes) than to 0: they did not train, and
    the paper's plots of layer responses leave such nets out."""
    chance = 1 - 1 / classes
    return tuple(r["model"] for r in rows if r["seed"] == 0 and r["final_test_error"] > chance / 2)


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["model"], []).append(r)
    return [
        {"model": model, "depth": rs[0]["depth"], "residual": rs[0]["residual"], **error_stats(rs)}
        for model, rs in groups.items()
    ]


def table(payload: dict) -> str:
    lines = [
        "| depth | plain train error | plain test error | ResNet train error | ResNet test error |",
        "|---:|---:|---:|---:|---:|",
    ]
    agg = {(a["depth"], a["residual"]): a for a in payload["aggregate"]}

    def cell(a: dict | None, key: str) -> str:
        if a is None:
            return "-"
        spread = f" ± {a[key + '_std']:.3f}" if a["seeds"] > 1 else ""
        return f"{a[key]:.3f}{spread}"

    for depth in sorted({d for d, _ in agg}):
        p, r = agg.get((depth, False)), agg.get((depth, True))
        lines.append(
            f"| {depth} | {cell(p, 'train_error')} | {cell(p, 'test_error')} | {cell(r, 'train_error')} | {cell(r, 'test_error')} |"
        )
    seeds = max(a["seeds"] for a in payload["aggregate"])
    lines.append("")
    lines.append(
        f"Final-epoch errors, mean{' ± std' if seeds > 1 else ''} over {seeds} seed(s); training error is"
    )
    lines.append("measured over the last epoch's batches in train mode, as in the paper's curves.")
    if payload.get("responses", {}).get("nets"):
        lines += [
            "",
            "| net (seed 0) | 3x3 layers | mean std of response | stem | units' first layers | units' last layers "
            "| units' last layers, per channel |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        per_channel = payload["responses"].get("per_channel", {})  # results before it have only "nets"
        for name, stds in payload["responses"]["nets"].items():
            means = [statistics.fmean(part) for part in (stds, stds[1::2], stds[2::2])]
            last = f"{statistics.fmean(per_channel[name][2::2]):.3f}" if name in per_channel else "-"
            lines.append(
                f"| {name} | {len(stds)} | {means[0]:.3f} | {stds[0]:.3f} | {means[1]:.3f} | {means[2]:.3f} "
                f"| {last} |"
            )
        lines += [
            "",
            "Layer responses (He et al. 2015, Fig. 7): the std of each 3x3 layer's output after BN, before the",
            f"ReLU or the addition, over the {payload['responses']['images']} test images; responses.png plots them.",
            "In a ResNet a unit's last layer is its residual function's output, the response the shortcut adds to.",
            "The last column takes each channel's std and averages them: it leaves out the BN's per-channel shifts.",
        ]
    if payload.get("gradients", {}).get("init"):
        lines += [
            "",
            "| net (seed 0) | gradient RMS at initialisation: first 3x3 layer | last | first / last "
            "| after training: first | last | first / last | weight norm, trained / fresh: first | median |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        growth = payload["gradients"].get("growth", {})  # results before it have only the gradients
        for name, init in payload["gradients"]["init"].items():
            cells = [
                f"{g[0]:.3g} | {g[-1]:.3g} | {g[0] / g[-1]:.3g}"
                for g in (init, payload["gradients"]["trained"][name])
            ]
            w = growth.get(name)
            cells.append(f"{w[0]:.3g} | {statistics.median(w):.3g}" if w else "- | -")
            lines.append(f"| {name} | {' | '.join(cells)} |")
        lines += [
            "",
            "Backward signals: the RMS of the summed loss's gradient at each 3x3 layer's output, in training mode,",
            f"over {payload['gradients']['images']} test images; a fresh net (seed 0) and the trained one.",
            "gradients.png plots every layer. The last two columns: each 3x3 layer's weight norm after training",
            "over its norm at initialisation (BN makes a layer's function independent of that scale, and its",
            "learning k^2 times slower when its weights grew k-fold).",
        ]
    if payload.get("lesion", {}).get("nets"):  # results before session 44 have none
        lines += [""] + lesion_report.table_lines(payload["lesion"])
    return "\n".join(lines) + "\n"


def figure(payload: dict, path: Path) -> None:
    """Like the paper's Fig. 6: plain nets left, ResNets right; thin dashed training error, bold test error."""
    rows = payload["runs"]
    from matplotlib.ticker import MaxNLocator

    from ..plots import plt, save  # matplotlib on its Agg backend

    depths = sorted({r["depth"] for r in rows})
    colours = dict(
        zip(depths, plt.cm.viridis([i / max(1, len(depths) - 1) * 0.85 for i in range(len(depths))]))
    )
    panels = [residual for residual in (False, True) if any(r["residual"] == residual for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, residual in zip(axes[0], panels):
        for r in rows:
            if r["residual"] != residual or r["seed"] != 0:
                continue
            epochs = [c["epoch"] for c in r["curve"]]
            colour = colours[r["depth"]]
            label = f"{'ResNet' if residual else 'plain'}-{r['depth']}"
            ax.plot(epochs, [100 * c["train_error"] for c in r["curve"]], "--", lw=1, color=colour)
            ax.plot(
                epochs, [100 * c["test_error"] for c in r["curve"]], "-", lw=2.2, color=colour, label=label
            )
        ax.set(xlabel="epoch", title="residual networks" if residual else "plain networks")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(title="bold: test, dashed: train", fontsize=8, title_fontsize=8)
    axes[0][0].set_ylabel("error (%)")
    fig.tight_layout()
    save(fig, path)
