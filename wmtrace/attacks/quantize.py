"""Lower precision: fp16, bf16, or int8 stored as it would ship (int8 plus a float32 scale)."""

from __future__ import annotations

import torch

from ..errors import BadInput
from .base import Attack, Param, State, copy_state, prunable

QUANT_MODES = ("fp16", "bf16", "int8", "int8-channel")
SCALE_SUFFIX = "_scale"  # int8 weights are stored as NAME (int8) + NAME_scale (float32)


def quantize(state: State, mode: str = "int8-channel") -> State:
    """Lower precision of every conv/linear weight; `mode` is the strength: fp16, bf16 (all float
    tensors cast), int8 (symmetric, one scale per tensor) or int8-channel (one scale per output
    channel). int8 weights are stored as they would ship: NAME as int8 plus NAME_scale (float32),
    which `formats.load_tensors` dequantizes; `dequantize` turns such a state back into floats."""
    if mode in ("fp16", "bf16"):
        dtype = torch.float16 if mode == "fp16" else torch.bfloat16
        return {k: (v.to(dtype) if v.is_floating_point() else v.clone()) for k, v in state.items()}
    if mode not in QUANT_MODES:
        raise BadInput(f"quantize: mode {mode!r}: use one of {', '.join(QUANT_MODES)}")
    out = copy_state(state)
    for n in prunable(state):
        w = state[n].detach().float()
        if mode == "int8":
            scale = w.abs().max().clamp_min(1e-12) / 127.0
            scale = scale.reshape(1)
            s = scale
        else:
            scale = w.abs().flatten(1).max(1).values.clamp_min(1e-12) / 127.0
            s = scale.reshape(-1, *([1] * (w.dim() - 1)))
        out[n] = torch.round(w / s).clamp(-127, 127).to(torch.int8)
        out[n + SCALE_SUFFIX] = scale.to(torch.float32)
    return out


def dequantize(state: State) -> State:
    """Float weights back from `quantize`'s int8 + scale storage (other tensors pass through)."""
    out = {}
    for k, v in state.items():
        if k.endswith(SCALE_SUFFIX) and k.removesuffix(SCALE_SUFFIX) in state:
            continue
        scale = state.get(k + SCALE_SUFFIX)
        if scale is not None and v.dtype == torch.int8:
            s = scale.reshape(-1, *([1] * (v.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
            out[k] = v.float() * s
        else:
            out[k] = v.float() if v.is_floating_point() else v.clone()
    return out



ATTACK = Attack(
    name="quantize",
    summary="Lower precision; int8 weights are stored as int8 plus a float32 NAME_scale tensor.",
    params=(Param("mode", str, "int8-channel", "fp16 | bf16 | int8 (per tensor) | int8-channel", choices=QUANT_MODES),),
    run=lambda state, trainer, report, mode: quantize(state, mode),
)
