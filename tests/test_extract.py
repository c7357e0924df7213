"""Extraction from what is left of a carrier: the least-squares fit of the mark's coefficients."""

import math

import numpy as np
import pytest

from wmtrace.schemes.whitebox import carriers as carriers_mod
from wmtrace.schemes.whitebox.align import Located
from wmtrace.schemes.whitebox.extract import soft_bits

BITS, ROWS, DIM = 32, 48, 144


def _marked(signed: bool, seed: int = 0):
    """A master carrier, a copy marked at margin m under an activation-like metric, the bits."""
    rng = np.random.default_rng(seed)
    carrier = carriers_mod.Carrier("w", (ROWS, DIM // 9, 3, 3), 0, BITS, signed=signed)
    x = rng.standard_normal((BITS, DIM))
    signs = rng.choice([-1.0, 1.0], (BITS, ROWS)) if signed else np.ones((BITS, ROWS))
    secret = carriers_mod.Secret(x, signs)
    a = rng.standard_normal((DIM, DIM)) * np.geomspace(1.0, 0.01, DIM)  # directions used unequally
    metric = a @ a.T
    metric += 0.1 * np.trace(metric) / DIM * np.eye(DIM)  # the ridge `init` adds
    master = 0.05 * rng.standard_normal((ROWS, DIM))
    bits = rng.integers(0, 2, BITS)
    m = 0.01
    change = carriers_mod.embedding_map(secret, metric).change((2.0 * bits - 1) * m * math.sqrt(DIM))
    return carrier, secret, metric, master, master + change, bits, m


def _soft(carrier, secret, metric, master, copy, m):
    return soft_bits(Located(carrier, "w", 1.0, copy), master, secret, m, metric)


@pytest.mark.parametrize("signed", [False, True])
def test_fit_reads_every_bit_from_an_intact_copy(signed):
    carrier, secret, metric, master, copy, bits, m = _marked(signed)
    soft = _soft(carrier, secret, metric, master, copy, m)
    assert np.allclose(soft, 2.0 * bits - 1, atol=0.05)


@pytest.mark.parametrize("signed", [False, True])
def test_fit_reads_the_bits_from_what_pruning_left(signed):
    carrier, secret, metric, master, copy, bits, m = _marked(signed, seed=1)
    rng = np.random.default_rng(5)
    pruned = np.where(rng.random(copy.shape) < 0.85, np.nan, copy)  # 85% of the weights gone
    pruned[:, :30] = np.nan  # whole input dimensions gone (structured pruning upstream)
    pruned[: ROWS // 3] = np.nan  # a third of the filters gone
    soft = _soft(carrier, secret, metric, master, pruned, m)
    assert np.array_equal(soft > 0, bits == 1)
    assert np.isnan(_soft(carrier, secret, metric, master, np.full_like(copy, np.nan), m)).all()


@pytest.mark.parametrize("signed", [False, True])
def test_one_filter_moved_far_away_does_not_drag_the_fit(signed):
    carrier, secret, metric, master, copy, bits, m = _marked(signed, seed=2)
    shifted = copy.copy()
    shifted[7] += 50.0 * np.abs(copy).max()  # weight shifting: one filter's mean moved far
    soft = _soft(carrier, secret, metric, master, shifted, m)
    assert np.array_equal(soft > 0, bits == 1)


def test_a_copy_that_never_carried_this_mark_gives_coin_flips():
    # Any change made without the key (fine-tuning an unmarked twin, another buyer's mark under
    # another key) reads as bits independent of the codeword.
    agree = []
    for seed in range(40):
        carrier, secret, metric, master, _, bits, m = _marked(True, seed=seed)
        drift = np.random.default_rng(100 + seed).standard_normal(master.shape) * 1e-3
        soft = _soft(carrier, secret, metric, master, master + drift, m)
        agree.append(np.mean((soft > 0) == (bits == 1)))
    assert 0.45 < np.mean(agree) < 0.55
