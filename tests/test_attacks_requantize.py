"""Re-quantization to GGUF types: each matrix holds exactly what a file of that type would, and doing
it twice changes nothing (the values are on the type's grid)."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from wmtrace.attacks import requantize  # noqa: E402
from wmtrace.formats import kquants  # noqa: E402


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q4_K", "F16"])
def test_values_are_the_types_and_stable(qtype):
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(64, 512, generator=g) * 0.02, "n.weight": torch.randn(512, generator=g)}
    report: dict = {}
    once = requantize.requantize(state, qtype, report)
    assert report["gguf_types"] == {"a.weight": qtype}
    assert torch.equal(once["n.weight"], state["n.weight"])
    err = float((once["a.weight"] - state["a.weight"]).pow(2).mean().sqrt() / state["a.weight"].std())
    bits = {"Q8_0": 8, "Q5_1": 5, "Q5_0": 5, "Q4_1": 4, "Q4_0": 4, "Q4_K": 4, "F16": 11}[qtype]
    assert 0 < err < 2.0 ** (2 - bits)  # a 4-bit type errs by about 8% of the weights' spread, not more
    twice = requantize.requantize(once, qtype)
    assert torch.equal(twice["a.weight"], once["a.weight"])


def test_q4_k_blocks_read_back_by_the_gguf_package():
    """Our Q4_K layout is llama.cpp's: the gguf package's own dequantizer reads it."""
    w = np.random.default_rng(1).standard_normal((4, 768)).astype(np.float32)
    raw = kquants.quantize_q4_k(w)
    assert raw.shape == (4, 3 * kquants.BLOCK_BYTES)
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K)
    assert np.sqrt(((back - w) ** 2).mean()) / w.std() < 0.1


def test_rows_that_are_not_whole_k_blocks_get_q5_0_as_llama_cpp_gives_them():
    report: dict = {}
    requantize.requantize({"a.weight": torch.randn(8, 576)}, "Q4_K", report)
    assert report["gguf_types"] == {"a.weight": "Q5_0"}
