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


def activation_bytes(model: nn.Module, image: tuple[int, ...]) -> tuple[int, int]:
    """(the bytes of the activations autograd keeps for the backward pass, the most any one convolution takes in
    and gives out) for one image of shape `image` in a forward in training mode, fp32: floors under a training
    step's memory and an evaluation's. The forward pass changes BatchNorm's running statistics: pass a copy. On
    the meta device it counts shapes alone, without memory."""
    # by storage, the same Python object for every view of it: a tensor counts once; held, so no id is reused
    weights = {id(s): s for s in (t.untyped_storage() for t in (*model.parameters(), *model.buffers()))}
    kept: dict[int, torch.UntypedStorage] = {}
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if id(storage) not in weights and t.dim() > 1:  # not BatchNorm's statistics, one per channel
            kept[id(storage)] = storage
        # not t itself: an output saved with its own grad_fn is a cycle through C++ that Python's collector cannot
        # see, and the graph and the model under it would never be freed (221 MB for resnet152's copy)
        return t.detach()

    def record(m, inputs, output):
        nonlocal largest
        largest = max(largest, inputs[0].nbytes + output.nbytes)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            # two images: BatchNorm in training mode refuses one value per channel (a 1x1 map)
            model(torch.zeros((2, *image), device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return sum(s.nbytes() for s in kept.values()) // 2, largest // 2
