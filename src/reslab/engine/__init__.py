"""The training engine: fit(), train_one_epoch(), evaluate(), checkpoints, the divergence guard."""

from .fit import Interrupted, fit, train_one_epoch
from .run import Run, prepare
from .steps import evaluate, predict_logits, train_step

__all__ = [
    "Interrupted",
    "Run",
    "evaluate",
    "fit",
    "predict_logits",
    "prepare",
    "train_one_epoch",
    "train_step",
]
