"""Start a run from another run's weights (`model.init`): fine-tuning on new classes or images, or more
training for a finished run under a new recipe.

Every tensor of the model (weights, biases, BatchNorm's running statistics) takes the source's value, the EMA's
when the source kept one (the weights it measured), except where the shapes say the task changed:

- the classifier, the model's last Linear layer, starts fresh when the number of classes differs;
- the first convolution adapts its filters when the number of input channels differs, as timm adapts
  pretrained stems: summed over the channels for a grayscale model from an RGB one, repeated and divided for an
  RGB model from a grayscale one, so that a gray image meets the same filters either way.

Any other difference (a layer missing, another width) means another architecture and is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ReslabError
from . import checkpoint


def adapt_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Filters (out, c, kh, kw) for `channels` input channels: summed to one, or one repeated and divided."""
    if channels == 1:
        return weight.sum(1, keepdim=True)
    if weight.shape[1] == 1:
        return weight.repeat(1, channels, 1, 1) / channels
    raise ReslabError(
        f"model.init: cannot adapt a first convolution from {weight.shape[1]} to {channels} input channels "
        "(only to or from 1)"
    )


def _names(model: nn.Module, kind: type) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def warm_start(model: nn.Module, source: str | Path) -> str:
    """Load the weights of `source` (a run directory or a checkpoint) into `model`, in place, as the module's
    docstring says. Returns one line on what came from where."""
    try:
        path = checkpoint.find(source)
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise ReslabError(f"model.init: {e}") from None
    weights = checkpoint.evaluated_weights(state)
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    what = f"{path} ({meta.get('model_name', 'a model')})"
    own = model.state_dict()
    if why := checkpoint.misfit(own, weights, shapes=False):  # shapes may differ at the head and the stem
        raise ReslabError(f"model.init: {what} is another architecture: {why}")
    linears, convs = _names(model, nn.Linear), _names(model, nn.Conv2d)
    head = {f"{linears[-1]}.weight", f"{linears[-1]}.bias"} if linears else set()
    stem = f"{convs[0]}.weight" if convs else None
    loaded, fresh, adapted = {}, [], []
    for key, mine in own.items():
        theirs = weights[key]
        if theirs.shape == mine.shape:
            loaded[key] = theirs
        elif key in head:
            fresh.append(key)
        elif key == stem and theirs.shape[0] == mine.shape[0] and theirs.shape[2:] == mine.shape[2:]:
            loaded[key] = adapt_channels(theirs, mine.shape[1])
            adapted.append(f"{key} ({theirs.shape[1]} -> {mine.shape[1]} input channels)")
        else:
            raise ReslabError(
                f"model.init: {what} is another architecture: {key} is {tuple(theirs.shape)} there, "
                f"{tuple(mine.shape)} here"
            )
    model.load_state_dict(loaded, strict=False)
    line = f"weights from {what}: {len(loaded)} of {len(own)} tensors"
    if adapted:
        line += "; adapted " + ", ".join(adapted)
    if fresh:
        classes = meta.get("classes")
        line += (
            f"; new classifier {', '.join(fresh)} ({len(classes) if isinstance(classes, list) else '?'} -> "
        )
        line += f"{own[fresh[0]].shape[0]} classes)"
    return line


__all__ = ["adapt_channels", "warm_start"]
