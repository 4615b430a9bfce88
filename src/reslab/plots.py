"""Pictures of a run: learning curves (the confusion matrix and error grid live in reslab.report)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from .errors import ReslabError, first_line  # noqa: E402
from .files import write_file  # noqa: E402
from .history import tested  # noqa: E402


def save(fig, path: str | Path) -> None:
    """Write a figure atomically (a crash leaves the old picture or the new one, never half of one) and close it."""
    path = Path(path)
    try:  # a full disk: one line, like every other file reslab writes
        write_file(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png", dpi=110))
    except RuntimeError as e:  # a format matplotlib writes with a program this machine lacks (.pgf: LaTeX)
        raise ReslabError(f"cannot write {path}: {first_line(str(e))}") from None
    finally:
        plt.close(fig)


def check_format(path: Path, flag: str) -> None:
    """One line for a picture file whose suffix names a format matplotlib cannot write (no suffix: PNG)."""
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix and path.suffix[1:].lower() not in formats:
        raise ReslabError(
            f"{flag} {path.name}: matplotlib cannot write {path.suffix} pictures; name one of "
            f"{', '.join('.' + f for f in sorted(formats))}"
        )


def curves(history: list[dict], path: str | Path, title: str = "", train_note: str = "") -> None:
    """Loss and accuracy per epoch, training, test and (data.val) validation, side by side, then the training
    steps' gradient norm where the history has it. train_note says how the training loss differs from the test
    loss (e.g. label smoothing)."""
    epochs = [h["epoch"] for h in history]
    shown = tested(history)  # every epoch unless train.eval_every > 1
    tested_epochs = [h["epoch"] for h in shown]
    normed = [h for h in history if "grad_norm" in h]  # runs from before reslab kept it have none
    fig, axes = plt.subplots(1, 3 if normed else 2, figsize=(15 if normed else 10, 4))
    ax_loss, ax_acc = axes[:2]
    ax_loss.plot(
        epochs,
        [h["train_loss"] for h in history],
        "o-",
        label=f"train{f' ({train_note})' if train_note else ''}",
    )
    ax_loss.plot(tested_epochs, [h["test_loss"] for h in shown], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss (mean cross-entropy)", title="loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    ax_acc.plot(tested_epochs, [h["test_acc"] for h in shown], "s-", label="test")
    held_out = [h for h in shown if "val_acc" in h]  # data.val: the training images held out
    if held_out:
        val_epochs = [h["epoch"] for h in held_out]
        ax_loss.plot(val_epochs, [h["val_loss"] for h in held_out], "d--", label="validation")
        ax_acc.plot(val_epochs, [h["val_acc"] for h in held_out], "d--", label="validation")
    if shown:
        best = max(shown, key=lambda h: h["test_acc"])
        ax_acc.annotate(
            f"{best['test_acc']:.4f}",
            (best["epoch"], best["test_acc"]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
        )
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    if normed:
        ax_norm, normed_epochs = axes[2], [h["epoch"] for h in normed]
        ax_norm.plot(normed_epochs, [h["grad_norm"] for h in normed], "o-", label="mean of the steps")
        ax_norm.plot(normed_epochs, [h["grad_norm_max"] for h in normed], "^--", label="largest step")
        ax_norm.set(
            xlabel="epoch", ylabel="global L2 norm, before clipping", title="gradient norm", yscale="log"
        )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save(fig, path)


def band(histories: list[list[dict]], value) -> tuple[list[int], list[float], list[float], list[float]]:
    """(epochs, median, lowest, highest) over runs of `value(epoch's row)` (None where an epoch has none, e.g.
    untested): each epoch any run has a value for, over the runs that have one."""
    from statistics import median

    by_epoch: dict[int, list[float]] = {}
    for history in histories:
        for h in history:
            if (v := value(h)) is not None:
                by_epoch.setdefault(h["epoch"], []).append(v)
    epochs = sorted(by_epoch)
    return (
        epochs,
        [median(by_epoch[e]) for e in epochs],
        [min(by_epoch[e]) for e in epochs],
        [max(by_epoch[e]) for e in epochs],
    )


def compare(runs: dict[str, list[list[dict]]], path: str | Path) -> None:
    """Several runs side by side (`reslab runs --plot`): training loss and test error per epoch, a line each; a
    line of several runs (`--seeds`: a recipe's seeds) is their median, shaded from the lowest to the highest."""
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    for name, histories in runs.items():
        label = name if len(histories) == 1 else f"{name} (median of {len(histories)})"
        for ax, value in (
            (ax_loss, lambda h: h["train_loss"]),
            (ax_err, lambda h: 1 - h["test_acc"] if "test_acc" in h else None),
        ):
            epochs, mid, low, high = band(histories, value)
            (line,) = ax.plot(epochs, mid, ".-", label=label)
            if len(histories) > 1:
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, lw=0)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss", yscale="log")
    ax_err.set(xlabel="epoch", ylabel="test error (1 - accuracy)", title="test error", yscale="log")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3, which="both")
    ax_err.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def confusion_matrix(counts, classes: list[str], path: str | Path) -> None:
    """Row-normalised confusion matrix (true class per row), the counts written in each cell."""
    import numpy as np

    counts = np.asarray(counts)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * k, 0.8 + 0.55 * k))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set(
        xlabel="predicted class",
        ylabel="true class",
        title=f"confusion matrix ({counts.trace() / max(counts.sum(), 1):.2%} correct)",
    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    save(fig, path)


def error_grid(
    images, true: list[str], predicted: list[str], confidence: list[float], path: str | Path
) -> None:
    """The most confidently misclassified test images, each titled true -> predicted (confidence)."""
    n = len(true)
    cols = 6
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray" if images[i].ndim == 2 else None)
            ax.set_title(f"{true[i]}\n-> {predicted[i]} ({confidence[i]:.0%})", fontsize=7)
    fig.suptitle("most confident mistakes: true -> predicted (probability)", fontsize=9)
    fig.tight_layout()
    save(fig, path)
