"""Unit variants (He et al. 2016, Tables 1 and 2) on Fashion-MNIST: where BN, ReLU and the addition go, and
what a non-identity shortcut costs. One depth, one recipe, one run directory per variant and seed. Then lesions
(lesion.py) of every net: which unit orders and shortcuts make a net that, as an ensemble would, barely notices a
unit gone."""

from __future__ import annotations

from pathlib import Path

from .. import config
from ..config import Config
from ..data import load_dataset
from ..errors import ReslabError
from ..files import make_dir
from ..models import list_models, model_options
from . import lesion, lesion_report
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
from .degradation import RECIPE

# name -> (model options, the paper's CIFAR-10 test error of ResNet-110 in %, Table 2 or Table 1)
VARIANTS = {
    "original": ({"order": "original"}, 6.61),
    "bn-after-add": ({"order": "bn-after-add"}, 8.17),
    "relu-before-add": ({"order": "relu-before-add"}, 7.84),
    "relu-preact": ({"order": "relu-preact"}, 6.71),
    "full-preact": ({"order": "full-preact"}, 6.37),
    "1x1-conv-shortcut": ({"shortcut": "projection", "always_project": True}, 12.22),
    "constant-scaling-0.5": ({"shortcut_scale": 0.5}, 12.35),
}
FULL = ["train.epochs=30", "data.crop_padding=2", "data.flip=true"]
QUICK = ["data.limit=4000", "train.epochs=4"]


def depths() -> list[int]:
    """The depths N whose resnetN takes every variant's options: the CIFAR-style ResNets (an ImageNet-style one
    has no always_project, its shortcuts project wherever the shape changes)."""
    needed = {k for options, _ in VARIANTS.values() for k in options}
    names = [n for n in list_models() if n.startswith("resnet") and n[6:].isdigit()]
    return sorted(int(n[6:]) for n in names if needed <= set(model_options(n)))


def plan(
    quick: bool, seeds: int, overrides: list[str], depth: int, variants=tuple(VARIANTS)
) -> list[tuple[str, Config]]:
    varied = {
        f"model.options.{k}": "each variant sets it" for options, _ in VARIANTS.values() for k in options
    }
    refuse_chosen(
        overrides,
        {"model.name": "--depth", "seed": "--seeds", "name": "one per run", **EVERY_EPOCH, **varied},
    )
    check_choices("--units", variants, tuple(VARIANTS), "unit")
    if depth not in (valid := depths()):
        raise ReslabError(
            f"--depth {depth}: no CIFAR-style ResNet of that depth (one taking every variant's options); "
            f"choose from {valid}"
        )
    base = config.load(None, RECIPE + (QUICK if quick else FULL) + overrides)
    runs = []
    for variant in variants:
        options, _ = VARIANTS[variant]
        for seed in range(seeds):
            name = f"resnet{depth}-{variant}-s{seed}"
            cfg = with_changes(
                base,
                **{
                    "model.name": f"resnet{depth}",
                    "model.options": {**base.model.options, **options},  # the variant on the user's options
                    "seed": seed,
                    "name": name,
                },
            )
            runs.append((name, cfg))
    return runs


def run(
    out: Path,
    quick: bool = False,
    seeds: int = 1,
    overrides: list[str] | None = None,
    depth: int = 56,
    variants=tuple(VARIANTS),
    draws: int = 3,
    recalibrate: int = 0,
) -> dict | None:
    runs = plan(quick, seeds, overrides or [], depth, variants)  # before anything is written: it checks
    out = make_dir(Path(out))
    with Timer() as timer:
        results = run_grid(runs, out)
        if results is None:  # under torchrun, a rank above 0: rank 0 measures and writes
            return None
        rows = []
        for (name, _), r in zip(runs, results):
            variant = name[len(f"resnet{depth}-") : name.rindex("-s")]
            h = r["history"]
            rows.append(
                {
                    "variant": variant,
                    "seed": int(name.rsplit("-s", 1)[1]),
                    "final_train_error": 1 - h[-1]["train_acc"],
                    "final_test_error": 1 - h[-1]["test_acc"],
                    "curve": error_curve(h),
                }
            )
        # which units can go without the net noticing: every seed's net (a second seed tells a variant's way of
        # failing from one net's), named by its variant, with -sN after it for seeds above 0
        trained = {
            row["variant"] + (f"-s{row['seed']}" if row["seed"] else ""): out / "runs" / name
            for (name, _), row in zip(runs, rows)
        }
        nets, data_cfg = final_nets(trained), runs[0][1].data
        data = load_dataset(data_cfg) if nets else None
        lesioned = lesion.of_nets(
            nets,
            data,
            data_cfg,
            images=2000 if quick else None,
            samples=draws,
            run_dirs=trained,
            recalibrate=recalibrate,
        )
    aggregate = [
        {
            "variant": variant,
            **error_stats([r for r in rows if r["variant"] == variant]),
            "paper_cifar10_resnet110_error": VARIANTS[variant][1] / 100,
        }
        for variant in variants
    ]
    payload = {
        "study": "units",
        "depth": depth,
        "quick": quick,
        "runs": rows,
        "aggregate": aggregate,
        "config": runs[0][1].to_dict(),
        "machine": machine(),
        "seconds": timer.seconds,  # of this call, which skips the runs finished before it
        "train_seconds": sum(r["summary"]["train_seconds"] for r in results),  # every run's, whenever it ran
        "lesion": lesioned,
    }
    if lesioned["nets"]:
        lesion_report.figure(lesioned, out / "lesion.png", chance=1 - 1 / len(data.classes))
    return finish(out, payload, table, figure)


def table(payload: dict) -> str:
    seeds = max(a["seeds"] for a in payload["aggregate"])
    pm = " ± std" if seeds > 1 else ""
    lines = [
        f"| unit (ResNet-{payload['depth']}) | Fashion-MNIST test error{pm} | train error{pm} | paper: CIFAR-10, ResNet-110 |",
        "|---|---:|---:|---:|",
    ]
    for a in payload["aggregate"]:

        def cell(key: str, a: dict = a) -> str:
            spread = f" ± {100 * a[key + '_std']:.2f}" if seeds > 1 else ""
            return f"{100 * a[key]:.2f}%{spread}"

        lines.append(
            f"| {a['variant']} | {cell('test_error')} | {cell('train_error')} | {100 * a['paper_cifar10_resnet110_error']:.2f}% |"
        )
    lines.append("")
    lines.append(
        f"{seeds} seed(s) per variant; the paper's numbers are from Tables 1 and 2 of He et al. 2016."
    )
    if payload.get("lesion", {}).get("nets"):  # results before session 45 have none
        lines += [""] + lesion_report.table_lines(payload["lesion"])
    return "\n".join(lines) + "\n"


def figure(payload: dict, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    from ..plots import plt, save  # matplotlib on its Agg backend

    agg = payload["aggregate"]
    names = [a["variant"] for a in agg]
    fig, (ax_bar, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.2))
    y = range(len(agg))
    ax_bar.barh(
        list(y),
        [100 * a["test_error"] for a in agg],
        xerr=[100 * a["test_error_std"] for a in agg],
        color="tab:blue",
        alpha=0.8,
        label="Fashion-MNIST (ours)",
    )
    ax_bar.scatter(
        [100 * a["paper_cifar10_resnet110_error"] for a in agg],
        list(y),
        color="tab:red",
        marker="x",
        zorder=3,
        label="CIFAR-10, ResNet-110 (paper)",
    )
    ax_bar.set_yticks(list(y), names)
    ax_bar.invert_yaxis()
    ax_bar.set(xlabel="final test error (%)", title=f"unit variants, ResNet-{payload['depth']}")
    ax_bar.legend(fontsize=8)
    ax_bar.grid(axis="x", alpha=0.3)
    for r in payload["runs"]:
        if r["seed"] == 0:
            ax_curve.plot(
                [c["epoch"] for c in r["curve"]],
                [100 * c["test_error"] for c in r["curve"]],
                lw=1.8,
                label=r["variant"],
            )
    ax_curve.set(xlabel="epoch", ylabel="test error (%)", title="test error per epoch (seed 0)")
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=7)
    fig.tight_layout()
    save(fig, path)
