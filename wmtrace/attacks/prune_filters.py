"""Structured pruning: whole filters removed, so tensor shapes shrink."""

from __future__ import annotations

from .base import Attack, Param, State, check_fraction, copy_state
from .layers import channels_or_fail, take_channels


def prune_filters(state: State, strength: float, layers: list[str] | None = None) -> State:
    """Structured pruning; `strength` is the fraction of output filters removed from each conv layer.

    The filters with the smallest L1 norm go, together with their BatchNorm entries and the matching
    input channels of the next layer, so tensor shapes shrink (the model must be rebuilt with the
    new widths to run). `layers` limits it to those conv weights (default: every hidden conv layer).
    """
    check_fraction(strength, "prune-filters")
    out = copy_state(state)
    for h in channels_or_fail(state, "prune-filters"):
        if layers is not None and h.weight not in layers:
            continue
        w = out[h.weight]
        keep = w.shape[0] - int(strength * w.shape[0])
        l1 = w.detach().abs().flatten(1).sum(1)
        idx = l1.topk(keep).indices.sort().values
        take_channels(out, h, idx)
    return out



ATTACK = Attack(
    name="prune-filters",
    summary="Structured pruning: remove the lowest-L1 filters and the next layer's matching inputs (shapes shrink).",
    params=(
        Param("strength", float, 0.5, "Fraction of output filters removed per conv layer"),
        Param("layers", list, None, "Conv weight to prune (repeat) [all]", flag="--layer"),
    ),
    run=lambda state, trainer, report, strength, layers: prune_filters(state, strength, layers or None),
)
