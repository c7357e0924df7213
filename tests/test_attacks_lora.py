"""LoRA: the merged model computes what the adapted one did, and only the targeted layers change."""

import pytest
import torch
from torch import nn

from wmtrace.attacks import lora
from wmtrace.errors import BadInput


def test_merging_keeps_the_adapted_function():
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(16, 8)
    layer = lora.LoRALinear(base, rank=4, alpha=8.0, g=g)
    with torch.no_grad():
        layer.b.copy_(torch.randn(8, 4, generator=g))  # as if trained: B starts at zero
    x = torch.randn(5, 16, generator=g)
    adapted = layer(x).detach()
    merged = layer.merged()
    assert torch.allclose(merged(x), adapted, atol=1e-5)


def test_only_named_projections_get_adapters():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(4, 4))
    model.add_module("mlp", nn.Linear(4, 4))
    names = lora._wrap(model, ["q_proj"], 2, 4.0, torch.Generator().manual_seed(0))
    assert names == ["q_proj"] and isinstance(model.q_proj, lora.LoRALinear) and isinstance(model.mlp, nn.Linear)
    with pytest.raises(BadInput, match="no Linear layer"):
        lora._wrap(nn.Sequential(nn.Linear(2, 2)), ["q_proj"], 2, 4.0, torch.Generator())
