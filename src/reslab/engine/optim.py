"""Optimisers (no weight decay on BN parameters and biases) and an exponential moving average of weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import OptimConfig


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # 1-D tensors are BN scales/shifts and biases: decaying them only hurts (Goyal et al. 2017)
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


class EMA:
    """Exponential moving average of a model's parameters (buffers copied), evaluated instead of the model.
    The decay warms up as min(decay, (1 + step) / (10 + step)), as in TensorFlow's and timm's: without it the
    average of a 0.999 run still holds 37% of the random initial weights after 1,000 steps, and evaluates at
    chance for the first epochs."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimiser step `step` (0-based, counted over the whole run)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)
        buffers = list(self.model.buffers())
        if buffers:  # BN statistics, copied in one call
            torch._foreach_copy_(buffers, list(model.buffers()))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
