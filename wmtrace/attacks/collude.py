"""Collusion: several buyers merge their copies into one model before leaking it."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BadInput
from .base import Attack, Param

COLLUDE_HOW = ("average", "layers", "majority")


def _layer(name: str) -> str:
    """The module a tensor belongs to: `features.3.weight` -> `features.3`."""
    return name.rpartition(".")[0] or name


def collude(states: list[dict[str, torch.Tensor]], how: str = "average") -> dict[str, torch.Tensor]:
    """Merge several buyers' copies into one model, as colluding buyers would before leaking.

    average: the mean of every floating-point tensor; majority: the per-weight median over the
    copies; layers: each layer (all tensors of one module) taken whole from one copy in turn, so
    a conv and its BatchNorm stay together. Tensors that are not floating point come from the
    first copy.
    """
    if how not in COLLUDE_HOW:
        raise BadInput(f"unknown collusion {how!r} (choose from {', '.join(COLLUDE_HOW)})")
    if len(states) < 2:
        raise BadInput("collusion needs at least two copies")
    first = states[0]
    for i, s in enumerate(states[1:], start=2):
        if s.keys() != first.keys():
            diff = sorted(set(s) ^ set(first))[0]
            raise BadInput(f"copy {i} does not hold the same tensors as copy 1 (e.g. {diff!r})")
        for k, v in s.items():
            if v.shape != first[k].shape:
                raise BadInput(f"copy {i}: tensor {k!r} has shape {tuple(v.shape)}, copy 1 {tuple(first[k].shape)}")
    out: dict[str, torch.Tensor] = {}
    layers = list(dict.fromkeys(_layer(k) for k in first))
    for k, v in first.items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif how == "layers":
            out[k] = states[layers.index(_layer(k)) % len(states)][k].clone()
        else:
            stack = torch.stack([s[k].detach().to(torch.float64) for s in states])
            merged = stack.mean(0) if how == "average" else torch.from_numpy(np.median(stack.numpy(), axis=0))
            out[k] = merged.to(v.dtype)
    return out



ATTACK = Attack(
    name="collude",
    summary="Merge several buyers' copies into one model, as colluding buyers would.",
    params=(Param("how", str, "average", "average | layers | majority (per-weight median)", choices=COLLUDE_HOW),),
    run=lambda states, trainer, report, how: collude(states, how),
    merges=True,
)
