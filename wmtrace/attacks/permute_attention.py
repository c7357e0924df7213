"""Function-preserving obfuscation of BERT-style self-attention: heads reordered, q/k permuted and rescaled."""

from __future__ import annotations

import torch

from ..errors import BadInput
from .base import Attack, Param, State, copy_state, seed_param


def permute_attention(state: State, heads: int, strength: float = 1.0, seed: int = 0) -> State:
    """Function-preserving obfuscation of self-attention (BERT names: `attention.self.query`, `key`,
    `value`, `attention.output.dense`): heads reordered (rows of q, k, v in blocks, the output
    projection's columns with them), the dimensions within each head permuted alike in q and k, and
    each q dimension scaled by a positive factor that k's undoes, so every attention score is
    unchanged. `strength` is the log-std of those factors (0: permutations only)."""
    if strength < 0:
        raise BadInput(f"permute-attention: strength {strength} must be >= 0")
    if heads < 1:
        raise BadInput("permute-attention: give the number of attention heads (--heads)")
    g = torch.Generator().manual_seed(seed)
    out = copy_state(state)
    suffix = "query.weight"
    blocks = [k[: -len(suffix)] for k in state if k.endswith("attention.self." + suffix)]
    if not blocks:
        raise BadInput("permute-attention: no BERT-style self-attention (attention.self.query.weight) in this model")
    for p in blocks:
        o = p.removesuffix("self.") + "output.dense.weight"
        d = state[p + suffix].shape[0]
        if d % heads or o not in state:
            raise BadInput(f"permute-attention: {p}query has {d} rows, not {heads} heads of equal size")
        size = d // heads
        order = torch.randperm(heads, generator=g)
        within = torch.stack([torch.randperm(size, generator=g) for _ in range(heads)])
        qk = (order[:, None] * size + within[order]).reshape(-1)
        v = (order[:, None] * size + torch.arange(size)).reshape(-1)
        scale = torch.exp(strength * torch.randn(d, generator=g))
        for name, idx, factor in (("query", qk, scale), ("key", qk, 1.0 / scale), ("value", v, None)):
            for leaf in ("weight", "bias"):
                t = state.get(f"{p}{name}.{leaf}")
                if t is None:
                    continue
                t = t[idx]
                if factor is not None:
                    t = t * (factor[:, None] if leaf == "weight" else factor).to(t.dtype)
                out[f"{p}{name}.{leaf}"] = t
        out[o] = state[o][:, v]
    return out



ATTACK = Attack(
    name="permute-attention",
    summary="Function-preserving, BERT-style attention: reorder heads, permute and rescale q/k dimensions.",
    params=(
        Param("heads", int, None, "Attention heads per layer (the model's num_attention_heads)", required=True),
        Param("strength", float, 1.0, "Log-std of the q/k rescaling factors (0: permute only)"),
        seed_param(),
    ),
    run=lambda state, trainer, report, heads, strength, seed: permute_attention(state, heads or 0, strength, seed),
)
