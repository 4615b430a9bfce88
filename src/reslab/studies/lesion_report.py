"""The tables and figures of lesion results (studies/lesion.py): each net's errors with units deleted, one at a
time and k at random, and how much each unit changes the stream."""

from __future__ import annotations

import re
from pathlib import Path
from statistics import fmean, stdev


def summary(values: list[float]) -> dict:
    """Some draws' figures as the lesion scripts keep them: their number, mean and standard error (None where
    there are too few)."""
    n = len(values)
    return {
        "n": n,
        "mean": fmean(values) if values else None,
        "stderr": _sem(values) if n > 1 else None,
    }


def _sem(errors: list[float]) -> float:
    """The standard error of the draws' mean error (0 for a single draw)."""
    return stdev(errors) / len(errors) ** 0.5 if len(errors) > 1 else 0.0


def _mean_cell(errors: list[float]) -> str:
    """A table cell: the mean of the draws' errors, with its standard error where there are several."""
    return f"{fmean(errors):.3f}" + (f" ± {_sem(errors):.3f}" if len(errors) > 1 else "")


def _middle(values: list[float]) -> float:
    """The table's median: the middle value, the upper of the two middle ones for an even count."""
    return sorted(values)[len(values) // 2]


def _statistics(found: dict) -> str:
    """Which BatchNorm statistics the lesioned nets were read with, for the table and the figure's title."""
    if found.get("recalibrate"):  # results before session 52 have none
        return (
            f"BatchNorm statistics re-estimated on {found['recalibrate']} training images after each deletion"
        )
    return "BatchNorm statistics as trained"


def table_lines(found: dict) -> list[str]:
    ks = sorted({r["k"] for net in found["nets"].values() for r in net["random"]})
    draws = "/".join(sorted({str(len(r["errors"])) for net in found["nets"].values() for r in net["random"]}))
    lines = [
        "| net | deletable units | intact | one deleted: median | worst | "
        + " | ".join(f"{k} deleted" for k in ks)
        + " | change: median | largest change |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(ks) + "---:|---:|",
    ]
    for name, net in found["nets"].items():
        by_k = {r["k"]: _mean_cell(r["errors"]) for r in net["random"]}
        cells = [f"{net['intact']:.3f}", f"{_middle(net['single']):.3f}", f"{max(net['single']):.3f}"]
        cells += [by_k.get(k, "-") for k in ks]
        change = net["change"]
        largest = max(range(len(change)), key=change.__getitem__)
        cells += [f"{_middle(change):.3f}", f"{change[largest]:.3f} ({net['units'][largest]})"]
        lines.append(f"| {name} | {len(net['units'])} | {' | '.join(cells)} |")
    lines += [
        "",
        "Lesions (Veit et al. 2016): test error with units deleted at test time (a residual branch set to 0, a",
        "plain unit replaced by the identity; the units that change shape stay), eval mode, on the first",
        f"{found['images']} test images; {_statistics(found)}.",
        f"k deleted: the mean over {draws or 'the'} random draws of k units, with its standard error. Change: how",
        "much a unit changes the stream, rms(unit(x) - deleted(x)) / rms(deleted(x)); |F(x)| / |x| in full",
        "pre-activation. A net named without -sN is seed 0's. lesion.png plots each unit's error against its place",
        "and against its change, and each k's error.",
    ]
    return lines


def figure(found: dict, path: Path, chance: float) -> None:
    """Left: the test error with each deletable unit deleted alone, input side first, the intact error as a
    thin line. Middle: the same errors against how much each unit changes the stream (stream_measures, log
    scale). Right: the mean error against the number of units deleted at random, with its standard error over
    the draws. Plain dashed, residual solid; the nets of one configuration's seeds (names ending -sN) share its
    colour and legend entry."""
    from matplotlib.ticker import FormatStrFormatter

    from ..plots import plt, save  # matplotlib on its Agg backend
    from .responses import label

    fig, axes = plt.subplots(1, 3, figsize=(16, 4), sharey=True)
    colours: dict[str, str] = {}
    for name, r in found["nets"].items():
        family = re.sub(r"-s\d+$", "", name)
        first = family not in colours
        colour = colours.setdefault(family, f"C{len(colours)}")
        kw = {
            "marker": "o",
            "ms": 3,
            "color": colour,
            "ls": "--" if name.startswith("plain") else "-",
            "label": label(family) if first else None,
        }
        axes[0].plot(range(1, len(r["single"]) + 1), [100 * e for e in r["single"]], **kw)
        axes[0].axhline(100 * r["intact"], color=colour, lw=0.8, ls=":")
        axes[1].scatter(r["change"], [100 * e for e in r["single"]], s=12, color=colour, label=kw["label"])
        ks = [0, 1] + [d["k"] for d in r["random"]]
        means = [r["intact"], fmean(r["single"])] + [fmean(d["errors"]) for d in r["random"]]
        sems = [0.0, 0.0] + [_sem(d["errors"]) for d in r["random"]]  # one deleted: every unit, no draws
        axes[2].errorbar(ks, [100 * m for m in means], [100 * s for s in sems], capsize=2, **kw)
    for ax in axes:
        ax.axhline(100 * chance, color="grey", lw=0.8, ls="-.", label="chance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set(xlabel="unit deleted (input side first)", ylabel="test error (%)", title="one unit deleted")
    axes[1].set(xscale="log", xlabel="the unit's change to the stream, rms(unit - deleted) / rms(deleted)")
    for axis in (axes[1].xaxis.set_major_formatter, axes[1].xaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # 0.3, not 3 x 10^-1
    axes[1].set_title("one unit deleted, by its change")
    axes[2].set(xlabel="units deleted at random", title="several deleted (mean of draws, standard error)")
    fig.suptitle(_statistics(found), fontsize=10)
    fig.tight_layout()
    save(fig, path)


__all__ = ["figure", "summary", "table_lines"]
