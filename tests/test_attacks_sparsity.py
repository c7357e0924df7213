"""2:4 semi-structured sparsity: exactly the pattern sparse kernels need, on matrices only."""

import pytest
import torch

from wmtrace.attacks import sparsity
from wmtrace.errors import BadInput


def test_two_largest_of_every_four_are_kept():
    g = torch.Generator().manual_seed(0)
    state = {"layer.weight": torch.randn(8, 16, generator=g), "norm.weight": torch.randn(16, generator=g),
             "model.embed_tokens.weight": torch.randn(10, 16, generator=g)}
    out = sparsity.sparsify(state)
    w, groups = state["layer.weight"].reshape(-1, 4), out["layer.weight"].reshape(-1, 4)
    assert ((groups == 0).sum(1) == 2).all()
    kept = torch.where(groups != 0, w.abs(), torch.full_like(w, float("inf"))).min(1).values
    dropped = torch.where(groups == 0, w.abs(), torch.zeros_like(w)).max(1).values
    assert (kept >= dropped).all()  # the two largest in magnitude survive, unchanged
    assert torch.equal(groups[groups != 0], w[groups != 0])
    assert torch.equal(out["norm.weight"], state["norm.weight"])  # vectors and token tables stay dense
    assert torch.equal(out["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_keep_must_leave_something_and_drop_something():
    with pytest.raises(BadInput, match="keep"):
        sparsity.sparsify({"w": torch.ones(4, 4)}, keep=4, group=4)
