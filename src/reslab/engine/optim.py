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
    # on a GPU one fused kernel updates every parameter; on the CPU the default loop, whose numbers the
    # measured results were made with
    fused = True if all(p.is_cuda for p in decay + no_decay) else None
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved state but keep this optimiser's implementation (fused, foreach): a checkpoint written on
    a GPU carries `fused` in its groups and resumes on a CPU too."""
    kept = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, kept):
        group.update(flags)


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
