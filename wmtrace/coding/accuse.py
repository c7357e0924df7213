"""Accusation by score: name the buyers whose codewords the leaked soft bits agree with.

Decoding names one buyer when one codeword dominates the extracted bits. When several buyers merge
their copies (averaging weights, mixing layers, a per-weight median), the bits where their codewords
differ cancel out and decoding names nobody, but every colluder's codeword still correlates with
what is left. Each registered buyer gets the normalised correlation

    z_j = sum_t y_t c_jt / ||y||      (c_jt = +-1 codeword bits, y_t the soft bits, known bits only)

which is invariant to the scale of the soft bits. For an innocent buyer, whose codeword bits are
fair coins independent of y, sum_t y_t c_jt is a weighted Rademacher sum, so by Hoeffding
P(z_j >= z) <= exp(-z^2 / 2); the union over N registered buyers gives the bound reported with each
accusation, N exp(-z^2 / 2), and the threshold sqrt(2 ln(N / bound)).

Which bits are fair coins: the 4 ID symbols are not (consecutive IDs share their leading bytes, so
every buyer's codeword agrees there), so they are left out; the 4 tag symbols are HMAC output, and
each Reed-Solomon parity symbol is the tag times a non-zero column of the code (plus a function of
the ID), so uniform whatever the ID (any 4 symbols jointly uniform: the code is MDS). For a model
that carries no buyer's mark the bound needs no assumption on codewords at all: its soft bits are
independent symmetric Gaussians under the secret projection key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import codes


@dataclass(frozen=True)
class Accused:
    index: int  # row in the codeword matrix given to `accuse`
    score: float  # normalised correlation z
    false_accusation_bound: float  # P(any innocent among the scored buyers scores >= z)


def scored_bits(spec: codes.CodeSpec) -> np.ndarray:
    """Mask of the codeword bits that are fair coins for an innocent buyer: tag and parity, not ID."""
    mask = np.ones(spec.bits, dtype=bool)
    mask[: 8 * codes.ID_BYTES] = False
    return mask


def scores(soft: np.ndarray, words: np.ndarray, spec: codes.CodeSpec) -> np.ndarray:
    """z for every codeword row of `words` (uint8 symbols, as `codes.codewords` gives them).

    Vectorised by byte: for each scored symbol position a 256-entry table of the signed sum of
    soft bits a byte value stands for, so scoring N buyers is one table gather per symbol.
    """
    soft = np.asarray(soft, dtype=np.float64)
    if soft.shape != (spec.bits,):
        raise ValueError(f"expected {spec.bits} soft bits, got {soft.shape}")
    y = np.where(np.isnan(soft) | ~scored_bits(spec), 0.0, soft).reshape(spec.symbols, 8)
    norm = float(np.sqrt((y * y).sum()))
    if words.shape[0] == 0 or norm == 0.0 or not math.isfinite(norm):
        return np.zeros(words.shape[0])
    # table[j, v] = sum_b y[j, b] * (+1 if bit b of v is set else -1), bit 0 the MSB as np.unpackbits
    signs = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float64) * 2.0 - 1.0
    table = y @ signs.T  # symbols x 256
    symbols = np.flatnonzero(np.abs(y).sum(1) > 0)
    total = np.zeros(words.shape[0])
    for j in symbols:
        total += table[j, words[:, j]]
    return total / norm


def bound(z: float | np.ndarray, buyers: int) -> float | np.ndarray:
    """Probability that any of `buyers` innocents scores at least z (Hoeffding + union bound)."""
    z = np.asarray(z, dtype=np.float64)
    p = np.where(z > 0, buyers * np.exp(-0.5 * np.square(np.maximum(z, 0.0))), 1.0)
    p = np.minimum(p, 1.0)
    return float(p) if p.ndim == 0 else p


def threshold(buyers: int, max_false_positive: float) -> float:
    """Smallest score whose bound is at most `max_false_positive` among `buyers` registered buyers."""
    return math.sqrt(2.0 * math.log(max(buyers, 1) / max_false_positive))


def accuse(
    soft: np.ndarray, words: np.ndarray, spec: codes.CodeSpec, max_false_positive: float = 1e-6
) -> list[Accused]:
    """Buyers whose score clears the threshold, best first; P(any innocent listed) <= max_false_positive."""
    return accuse_scores(scores(soft, words, spec), max_false_positive)


def accuse_scores(z: np.ndarray, max_false_positive: float = 1e-6) -> list[Accused]:
    """`accuse` from every registered buyer's score (`scores`), for a caller that keeps the scores."""
    n = len(z)
    t = threshold(n, max_false_positive)
    hits = np.flatnonzero(z >= t)
    hits = hits[np.argsort(-z[hits], kind="stable")]
    return [Accused(int(i), float(z[i]), float(bound(z[i], n))) for i in hits]


def combine(softs: list[np.ndarray]) -> np.ndarray:
    """One soft value per codeword bit from several schemes' extractions (each in margins, NaN where it
    read nothing): their mean over the schemes that read the bit, NaN where none did."""
    stacked = np.stack(softs)
    known = ~np.isnan(stacked)
    total = np.where(known, stacked, 0.0).sum(0)
    count = known.sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
