"""2:4 semi-structured sparsity: of every 4 consecutive weights along a row, the 2 smallest in
magnitude are zeroed, the pattern sparse tensor cores (and `torch.sparse.to_sparse_semi_structured`)
run at twice the speed. Applied to every Linear or convolution weight whose rows are whole groups;
token tables are left dense, as sparsity tools leave them.
"""

from __future__ import annotations

import torch

from ..errors import BadInput
from .base import Attack, Param, State, copy_state, prunable


def sparsify(state: State, keep: int = 2, group: int = 4) -> State:
    """Keep the `keep` largest of every `group` consecutive weights of each row; zero the rest."""
    if not 0 < keep < group:
        raise BadInput(f"sparsity: keep {keep} of {group} must be between 1 and {group - 1}")
    out = copy_state(state)
    for name in prunable(state):
        w = state[name].detach()
        if "embed" in name.lower() or w.shape[-1] % group:
            continue
        g = w.reshape(-1, group)
        drop = g.abs().argsort(dim=1)[:, : group - keep]
        out[name] = g.scatter(1, drop, torch.zeros_like(g)).reshape(w.shape)
    return out


ATTACK = Attack(
    name="sparsity",
    summary="N:M semi-structured sparsity (2:4 by default) on every matrix whose rows are whole groups.",
    params=(Param("keep", int, 2, "Weights kept per group"), Param("group", int, 4, "Group size along a row")),
    run=lambda state, trainer, report, keep, group: sparsify(state, keep, group),
)
