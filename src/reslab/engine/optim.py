"""Optimisers (no weight decay on BN parameters and biases unless asked) and an exponential moving average of weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import OptimConfig


class SGD:
    """torch.optim.SGD as it runs on the CPU (its default per-tensor loop): the same arithmetic bit for bit,
    the same param_groups and state_dict, without torch.optim. Every torch.optim optimiser imports
    torch._dynamo at its first method call: 1.5-2.3 s of each training process on a 2-core CPU (BENCHMARKS.md,
    "Machine C, session 15: start-up"). A checkpoint's optimiser state loads into either."""

    def __init__(self, groups: list[dict], lr: float, momentum: float = 0.0, nesterov: bool = False):
        # torch.optim.SGD's checks, with its messages
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": 0.0,
            "weight_decay": 0.0,
            "nesterov": nesterov,
            "maximize": False,
            "foreach": None,
            "differentiable": False,
            "fused": None,
        }
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            if g["maximize"]:
                raise ValueError("reslab's SGD does not maximize")
            decay, momentum, lr = g["weight_decay"], g["momentum"], g["lr"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=decay) if decay != 0 else p.grad
                if momentum != 0:
                    state = self.state.setdefault(p, {})
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(momentum).add_(d, alpha=1 - g["dampening"])
                    d = d.add(buf, alpha=momentum) if g["nesterov"] else buf
                p.add_(d, alpha=-lr)

    def state_dict(self) -> dict:
        """torch.optim's layout: parameters numbered in group order, state keyed by those numbers."""
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            numbers = [index.setdefault(id(p), len(index)) for p in g["params"]]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": numbers})
        return {"state": {index[id(p)]: s for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Settings and momentum buffers from `state_dict` (this class's or torch.optim.SGD's), as torch loads."""
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("loaded state dict does not match the optimizer's parameter groups")
        params = {}
        for group, old in zip(self.param_groups, saved):
            params.update(zip(old["params"], group["params"]))
            group.update(copy.deepcopy({k: v for k, v in old.items() if k != "params"}))
        self.state = {
            params[i]: {k: v.to(device=params[i].device, dtype=params[i].dtype) for k, v in s.items()}
            for i, s in state_dict["state"].items()
        }


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | SGD:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # 1-D tensors are BN scales/shifts and biases: decaying them only hurts (Goyal et al. 2017)
            (no_decay if p.ndim <= 1 else decay).append(p)
    norm_decay = cfg.weight_decay if cfg.decay_norm else 0.0  # two groups either way: checkpoints stay alike
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": norm_decay},
    ]
    # on a GPU one fused kernel updates every parameter; on the CPU torch's default loop (for SGD, the copy
    # above), whose numbers the measured results were made with
    fused = True if all(p.is_cuda for p in decay + no_decay) else None
    if cfg.name == "sgd" and not fused:
        return SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def state_bytes(model: nn.Module, cfg: OptimConfig, ema: bool, ranks: int = 1, epochs: int = 1) -> int:
    """The bytes a training run keeps beside its weights and activations: a gradient per trainable parameter,
    the optimiser's slots (SGD's momentum buffer, none without momentum; AdamW's two moments), with `ema` a copy of
    the weights and buffers, under DistributedDataParallel (`ranks` > 1) its gradient buckets, a second copy of
    the gradients, and the divergence guard's copy of each epoch's start: the weights and buffers, the EMA's, and
    from the second of `epochs` on the slots, which the optimiser fills at its first step."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    slots = 2 if cfg.name == "adamw" else int(cfg.momentum != 0)
    copies = 1 + slots + (ranks > 1) + slots * (epochs > 1)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return copies * trainable + (1 + 2 * ema) * weights


def load_optimizer_state(optimizer: torch.optim.Optimizer | SGD, state: dict) -> None:
    """Load a saved state (momentum buffers; AdamW's moments and step counts) but keep this optimiser's
    settings: the saved groups would replace them with the checkpoint's, so a resume with another
    optim.weight_decay, momentum or betas would say so and go on with the old ones. Its implementation (fused,
    foreach) stays too: a checkpoint written on a GPU carries `fused` in its groups and resumes on a CPU."""
    kept = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, kept):
        group.update(settings)


def optimizer_misfit(optimizer: torch.optim.Optimizer | SGD, saved: dict) -> str | None:
    """How a checkpoint's optimiser state (checkpoint.fault checked its layout) differs from what `optimizer`
    keeps, in a phrase for an error line; None where it fits: the same parameters, numbered alike in the same
    groups, and each saved tensor of a parameter (a momentum buffer, AdamW's moments) of its shape, or a
    scalar (AdamW's step)."""
    own = optimizer.state_dict()["param_groups"]
    if [g["params"] for g in saved["param_groups"]] != [g["params"] for g in own]:
        sizes = [len(g["params"]) for g in saved["param_groups"]]
        return (
            f"its optimizer's groups hold {sizes} parameters, this model's {[len(g['params']) for g in own]}"
        )
    shapes = [p.shape for g in optimizer.param_groups for p in g["params"]]
    for i, values in saved["state"].items():
        if not (isinstance(i, int) and 0 <= i < len(shapes)) or not isinstance(values, dict):
            return f"its optimizer's state names no parameter {i!r}"
        for key, v in values.items():
            if not isinstance(v, torch.Tensor) or v.dim() and v.shape != shapes[i]:
                what = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                return f"its optimizer's {key} of parameter {i} is {what}, the parameter {tuple(shapes[i])}"
    return None


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
