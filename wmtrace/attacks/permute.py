"""Function-preserving obfuscation of a sequential CNN: channels permuted, rescaled, padded with dummies."""

from __future__ import annotations

import math

import torch

from ..errors import BadInput
from .base import Attack, Param, State, copy_state, seed_param
from .layers import Hidden, channels_or_fail, scale_consumer, take_channels


def permute(state: State, strength: float = 1.0, seed: int = 0, rescale: bool = True) -> State:
    """Function-preserving obfuscation of every hidden conv layer; outputs stay the same.

    - channels permuted (conv filters, BatchNorm entries, next layer's input channels);
    - rescaled (when `rescale`): each conv filter by a in [1/2, 2] with BatchNorm's running statistics
      adjusted exactly (eps included), and each BatchNorm output by b in [1/2, 2] (gamma and beta) with
      the next layer's inputs scaled by 1/b, positive scaling passing unchanged through ReLU and max-pool;
    - `strength` dummy channels per existing one are added (rounded down; 0.25 adds a quarter):
      random filters whose inputs to the next layer are zero, so they contribute nothing.
    """
    if strength < 0:
        raise BadInput(f"permute: strength {strength} (dummy channels per channel) must be >= 0")
    g = torch.Generator().manual_seed(seed)
    out = copy_state(state)
    for h in channels_or_fail(state, "permute"):
        w = out[h.weight]
        n = w.shape[0]
        extra = int(strength * n)
        if extra:
            _add_dummies(out, h, extra, g)
        n_all = n + extra
        if rescale:
            a = torch.exp((torch.rand(n_all, generator=g) * 2 - 1) * math.log(2.0)).to(w.dtype)
            b = torch.exp((torch.rand(n_all, generator=g) * 2 - 1) * math.log(2.0)).to(w.dtype)
            out[h.weight] = out[h.weight] * a.reshape(-1, *([1] * (w.dim() - 1)))
            if h.bias:
                out[h.bias] = out[h.bias] * a
            if h.bn:
                eps = 1e-5  # BatchNorm's default; var' + eps = a^2 (var + eps) keeps the normalisation exact
                out[h.bn + "running_mean"] = out[h.bn + "running_mean"] * a
                out[h.bn + "running_var"] = a * a * (out[h.bn + "running_var"] + eps) - eps
                out[h.bn + "weight"] = out[h.bn + "weight"] * b
                out[h.bn + "bias"] = out[h.bn + "bias"] * b
                scale_consumer(out, h, 1.0 / b)
            else:  # no BatchNorm: the conv's own scale passes through ReLU
                scale_consumer(out, h, 1.0 / a)
        take_channels(out, h, torch.randperm(n_all, generator=g))
    return out


def _add_dummies(state: State, h: Hidden, k: int, g: torch.Generator) -> None:
    w = state[h.weight]
    std = float(w.float().std())
    state[h.weight] = torch.cat([w, (torch.randn((k, *w.shape[1:]), generator=g) * std).to(w.dtype)])
    if h.bias:
        state[h.bias] = torch.cat([state[h.bias], torch.zeros(k, dtype=w.dtype)])
    if h.bn:
        p = h.bn
        state[p + "weight"] = torch.cat([state[p + "weight"], torch.rand(k, generator=g).to(w.dtype) + 0.5])
        state[p + "bias"] = torch.cat([state[p + "bias"], torch.randn(k, generator=g).to(w.dtype) * 0.1])
        state[p + "running_mean"] = torch.cat([state[p + "running_mean"], torch.zeros(k, dtype=w.dtype)])
        var = float(state[p + "running_var"].mean())
        state[p + "running_var"] = torch.cat([state[p + "running_var"], torch.full((k,), var, dtype=w.dtype)])
    c = state[h.consumer]
    if c.dim() == 4:
        state[h.consumer] = torch.cat([c, torch.zeros(c.shape[0], k, *c.shape[2:], dtype=c.dtype)], 1)
    else:
        state[h.consumer] = torch.cat([c, torch.zeros(c.shape[0], k * h.block, dtype=c.dtype)], 1)



ATTACK = Attack(
    name="permute",
    summary="Function-preserving: permute, rescale and pad hidden channels with dummies (outputs unchanged).",
    params=(
        Param("strength", float, 0.25, "Dummy channels added per existing channel"),
        Param("rescale", bool, True, "Also rescale channels across BatchNorm and ReLU"),
        seed_param(),
    ),
    run=lambda state, trainer, report, strength, rescale, seed: permute(state, strength, seed, rescale),
)
