"""The training engine: fit(), train_one_epoch(), evaluate(), checkpoints, the divergence guard."""

from .fit import Interrupted, Run, evaluate, fit, prepare, train_one_epoch

__all__ = ["Interrupted", "Run", "evaluate", "fit", "prepare", "train_one_epoch"]
