"""Re-quantization to llama.cpp's GGUF types, as a leaker converting a copy for llama.cpp does.

Every matrix whose rows are whole blocks of the type is quantized and dequantized (what a GGUF file
of that type holds); vectors (norms, biases) stay float32, as llama.cpp keeps them. `wmtrace attack
requantize copy.gguf -o leak.gguf --type Q4_K` writes the GGUF file itself. Q4_K is written by
`formats.kquants` in one pass (llama.cpp searches its sub-block scales, with a little less error);
llama.cpp's Q4_K_M further keeps some matrices in Q6_K, which the `gguf` package cannot write: Q4_K
on every matrix is the harsher of the two.
"""

from __future__ import annotations

import torch

from ..formats import gguf
from .base import Attack, Param, State, copy_state, prunable

TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q4_K", "F16")


def requantize(state: State, qtype: str = "Q4_0", report: dict | None = None) -> State:
    """Every matrix of `state` stored as `qtype` and read back (float32); `report["gguf_types"]` says
    which type each tensor got, so a GGUF writer stores exactly these values."""
    out, types = copy_state(state), {}
    for name in prunable(state):
        w = state[name].detach().float().numpy()
        raw, written = gguf.quantize(w, qtype)
        out[name] = torch.from_numpy(gguf.dequantize(raw, written).reshape(w.shape))
        types[name] = written
    if report is not None:
        report["gguf_types"] = types
    return out


ATTACK = Attack(
    name="requantize",
    summary="Re-quantize every matrix to a llama.cpp GGUF type (written as GGUF when the output ends in .gguf).",
    params=(Param("qtype", str, "Q4_0", "GGUF type: " + " | ".join(TYPES), choices=TYPES, flag="--type"),),
    run=lambda state, trainer, report, qtype: requantize(state, qtype, report),
)
