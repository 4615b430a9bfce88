"""Layer-by-layer shape table with parameter and FLOP counts (the notebook's shape printout, made a tool)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Row:
    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    flops: int  # forward FLOPs (2 per multiply-add) of convolutions and linear layers inside the row


def _leaf_flops(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        return 2 * output.numel() * k
    if isinstance(module, nn.Linear):
        return 2 * output.numel() * module.in_features
    return 0


@torch.no_grad()
def summary(model: nn.Module, input_shape: tuple[int, ...], print_table: bool = True) -> list[Row]:
    """Run one forward pass of zeros through `model` (in eval mode) and describe each top-level child."""
    children = list(model.named_children()) or [("model", model)]
    rows: dict[str, Row] = {}
    flops: dict[str, int] = {name: 0 for name, _ in children}
    hooks = []
    for top, child in children:

        def record(m, inputs, output, top=top, child=child):
            rows[top] = Row(
                top, type(child).__name__, tuple(output.shape), sum(p.numel() for p in child.parameters()), 0
            )

        hooks.append(child.register_forward_hook(record))
        for leaf in child.modules():

            def count(m, inputs, output, top=top):
                flops[top] += _leaf_flops(m, output)

            hooks.append(leaf.register_forward_hook(count))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        model(torch.zeros(input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    result = [rows[name] for name, _ in children if name in rows]
    for row in result:
        row.flops = flops[row.name]
    if print_table:
        print(format_table(result))
    return result


def format_table(rows: list[Row]) -> str:
    lines = [f"{'layer':<10} {'type':<18} {'output shape':<22} {'params':>12} {'MFLOPs':>10}"]
    for r in rows:
        shape = "(" + ", ".join(map(str, r.output_shape)) + ")"
        lines.append(f"{r.name:<10} {r.type:<18} {shape:<22} {r.params:>12,} {r.flops / 1e6:>10.1f}")
    total_p = sum(r.params for r in rows)
    total_f = sum(r.flops for r in rows)
    lines.append(f"{'total':<10} {'':<18} {'':<22} {total_p:>12,} {total_f / 1e6:>10.1f}")
    return "\n".join(lines)
