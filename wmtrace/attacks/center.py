"""Centring Linear layers: free where a LayerNorm follows, which is why such layers never carry a mark."""

from __future__ import annotations

from ..errors import BadInput
from .base import Attack, Param, State, copy_state


def center(state: State, layers: list[str]) -> State:
    """Subtract the mean row from each named Linear weight (and the mean from its bias).

    Function-preserving where the layer's outputs go (through a residual sum) into a LayerNorm, as
    every transformer block's output projections do: the same value added to every output is what
    LayerNorm subtracts. A mark living in the mean over rows of such a layer is wiped at no cost,
    which is why carrier selection leaves these layers out (`carriers.used_weights`).
    """
    if not layers:
        raise BadInput("center: name the Linear weights to centre (--layer)")
    out = copy_state(state)
    for name in layers:
        w = state.get(name)
        if w is None or w.dim() != 2:
            raise BadInput(f"center: {name!r} is not a Linear weight of this model")
        out[name] = w - w.mean(0, keepdim=True)
        bias = name.removesuffix("weight") + "bias"
        if bias in state:
            out[bias] = state[bias] - state[bias].mean()
    return out



ATTACK = Attack(
    name="center",
    summary="Subtract the mean row of Linear layers (function-preserving where a LayerNorm follows).",
    params=(Param("layers", list, None, "Linear weight to centre (repeat)", flag="--layer", required=True),),
    run=lambda state, trainer, report, layers: center(state, layers or []),
)
