"""The layer graph of a sequential CNN, inferred from its state dict alone.

Attacks that change channels (structured pruning, permutation, rescaling, dummy channels) need to
know which layer feeds which; they infer it from the tensor names and shapes, under one assumption
(see `hidden_layers`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import BadInput
from .base import State

BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class Hidden:
    """A conv layer whose output channels feed exactly one next layer, so they can be changed."""

    weight: str  # conv weight [out, in, kh, kw]
    bias: str | None
    bn: str | None  # BatchNorm prefix ("features.1."), None when the conv has none
    consumer: str  # next layer's weight: conv [o, out, kh, kw] or linear [o, out * block]
    block: int  # input features of the consumer per channel: 1 for a conv, H*W for a flattening linear


def _natural(name: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p]


def hidden_layers(state: State) -> list[Hidden]:
    """Conv layers with BatchNorm and the layer they feed, inferred from the state dict alone.

    Assumption (holds for sequential CNNs such as the example and VGG-like nets, not for residual
    or branching ones): tensor names in natural order (numbers compared as numbers, so `features.11`
    after `features.7`, whatever order the file stores them in) follow the forward order; a conv
    weight is followed by its bias, then by at most one BatchNorm over its channels, and its output
    feeds only the next weight tensor in that order, which is a conv taking exactly that many input
    channels, or a linear layer on the flattened (channel-major) output. Conv layers for which this
    does not fit are left alone.
    """
    names = sorted(state, key=_natural)
    weights = [i for i, n in enumerate(names) if state[n].is_floating_point() and state[n].dim() >= 2]
    found = []
    for pos, i in enumerate(weights[:-1]):
        name, w = names[i], state[names[i]]
        if w.dim() != 4:
            continue
        out_ch = w.shape[0]
        nxt = names[weights[pos + 1]]
        c = state[nxt]
        if c.dim() == 4 and c.shape[1] == out_ch:
            block = 1
        elif c.dim() == 2 and c.shape[1] % out_ch == 0:
            block = c.shape[1] // out_ch
        else:
            continue
        prefix = name.removesuffix("weight")
        bias = prefix + "bias" if prefix + "bias" in state and name.endswith("weight") else None
        bn = None
        for n in names[i + 1 : weights[pos + 1]]:
            if n.endswith("running_mean") and state[n].shape == (out_ch,):
                p = n.removesuffix("running_mean")
                if all(p + s in state for s in BN_PARAMS):
                    bn = p
                    break
        found.append(Hidden(name, bias, bn, nxt, block))
    return found


def take_channels(state: State, h: Hidden, idx: torch.Tensor) -> None:
    """Keep (and reorder) output channels `idx` of `h`, with its BatchNorm and the consumer's inputs."""
    state[h.weight] = state[h.weight][idx].clone()
    if h.bias:
        state[h.bias] = state[h.bias][idx].clone()
    if h.bn:
        for s in BN_PARAMS:
            state[h.bn + s] = state[h.bn + s][idx].clone()
    c = state[h.consumer]
    if c.dim() == 4:
        state[h.consumer] = c[:, idx].clone()
    else:
        state[h.consumer] = c.reshape(c.shape[0], -1, h.block)[:, idx].reshape(c.shape[0], -1).clone()


def scale_consumer(state: State, h: Hidden, factor: torch.Tensor) -> None:
    c = state[h.consumer]
    if c.dim() == 4:
        state[h.consumer] = c * factor.reshape(1, -1, 1, 1)
    else:
        state[h.consumer] = (c.reshape(c.shape[0], -1, h.block) * factor.reshape(1, -1, 1)).reshape(c.shape)


def channels_or_fail(state: State, what: str) -> list[Hidden]:
    layers = hidden_layers(state)
    if not layers:
        raise BadInput(f"{what}: found no conv layer feeding a next layer (see wmtrace.attacks.hidden_layers)")
    return layers


def widths(state: State) -> dict[str, int]:
    """Output channels of every conv layer: what a model factory needs to rebuild a reshaped model."""
    return {k: int(v.shape[0]) for k, v in state.items() if v.is_floating_point() and v.dim() == 4}
