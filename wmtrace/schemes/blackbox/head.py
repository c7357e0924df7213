"""The classifier's head: the last linear layer, whose input features and output logits the scheme uses.

The black-box mark is a closed-form edit of this one layer, so the model must end in it: its output
must be the model's output (logits), with nothing after it. `find_head` checks that by running the
model on real inputs rather than trusting module names.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import batches
from ...batches import Inputs
from ...errors import BadInput, InternalError


def find_head(model: nn.Module, probe: Inputs, name: str | None = None) -> str:
    """The name of the linear layer whose output is the model's output on `probe` (the last
    `nn.Linear` unless `name` is given); BadInput if the model does not end in one."""
    linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    if name is None:
        if not linears:
            raise BadInput("the black-box scheme needs a classifier ending in a linear layer; this model has none")
        name = linears[-1]
    elif name not in linears:
        raise BadInput(f"--head {name!r} is not a linear layer of the model")
    feats, logits = features(model, name, probe)
    layer = dict(model.named_modules())[name]
    with torch.no_grad():
        direct = layer(feats.to(layer.weight.dtype)).double()
    if logits.shape != direct.shape or not torch.allclose(logits, direct, rtol=1e-4, atol=1e-4):
        raise BadInput(f"the model's output is not the output of its last linear layer {name!r} (something follows "
                       "it, e.g. a softmax); the black-box scheme needs the logits")
    return name


def features(model: nn.Module, head: str, inputs: Inputs, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(head input features, model output) for `inputs`, in float64, computed in batches."""
    layer = dict(model.named_modules())[head]
    if model.training:  # train-mode BatchNorm would normalise by the queries' own statistics, and update them
        raise InternalError("head.features needs the model in eval mode")
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().flatten(1)))
    outs = []
    try:
        with torch.no_grad():
            for i in range(0, batches.size(inputs), batch):
                outs.append(batches.call(model, batches.take(inputs, slice(i, i + batch))))
    finally:
        hook.remove()
    return torch.cat(seen).double(), torch.cat(outs).double()
