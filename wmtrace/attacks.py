"""What a leaker does to a copy before leaking it, shipped so users can measure their own models."""

from __future__ import annotations

import torch


def prunable(state: dict[str, torch.Tensor]) -> list[str]:
    """Weights a pruning tool would touch: conv and linear weights, not norms or biases."""
    return [k for k, v in state.items() if v.is_floating_point() and v.dim() >= 2]


def prune_global(state: dict[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
    """Global unstructured magnitude pruning: zero the `amount` fraction of smallest weights
    across all prunable tensors together (as torch.nn.utils.prune.global_unstructured does)."""
    if not 0.0 <= amount < 1.0:
        raise ValueError("pruning amount must be in [0, 1)")
    names = prunable(state)
    flat = torch.cat([state[n].detach().abs().flatten().float() for n in names])
    k = int(amount * flat.numel())
    out = {n: v.clone() for n, v in state.items()}
    if k == 0:
        return out
    threshold = flat.kthvalue(k).values
    for n in names:
        out[n] = torch.where(state[n].abs() <= threshold, torch.zeros_like(state[n]), state[n])
    return out
