"""Marks on a quantized master's own grid: a GGUF copy must keep its master's type and stay marked.

A Q4_1 master's weights sit exactly on their blocks' grids (scale d and minimum m per 32 weights:
d * q + m). Written back as Q4_1, a mark much smaller than a step (d) rounds to the master's own
values: nearest rounding erases it. So such a copy moves whole steps instead: each weight of a marked
tensor becomes master + k * d with k the mark's change in steps rounded at random (up with
probability equal to its fractional part), keyed by the buyer's seed; the copy's expected change is
the mark itself and every block keeps the master's scale and minimum. A mark comparable to a step
moves the blocks' extremes, so the type's own rounding re-draws the grid and keeps the mark with less
noise than random rounding adds. `snap` takes whichever of the two keeps more of the mark per unit of
change beside it. Measured on a Q4_1 q_proj (tests/tiny_llama.py), the share of the mark kept and the
error beside it, relative to the mark: at 0.01 of the weights' RMS, random 0.93 (error 4.5) against
nearest 0.07 (1.2); at 0.03, 0.91 (2.4) against 0.09 (1.2); at 0.1, 0.91 (1.1) against 0.96 (0.8);
at 0.3, 0.90 (0.5) against 1.00 (0.3). Either way the copy is stored in the master's type exactly as
measured (quantizing it again gives it back), so its margin, self-check and fidelity are the file's.
"""

from __future__ import annotations

import numpy as np

from . import gguf

# Types written with a scale per block as the first two bytes (float16), the grid step (for Q4_1 and
# Q5_1 with a minimum after it). The K-quants hold scales per sub-block, quantized themselves.
STEPPED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def on_grid(qtype: str) -> bool:
    """Whether copies of a tensor of this type are snapped to its grid (else written as they are)."""
    return qtype in STEPPED


def _blocks(a: np.ndarray, size: int) -> np.ndarray:
    return a.reshape(-1, size)


def snap(master: np.ndarray, marked: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """`marked` stored as `qtype` the way that keeps more of its change from `master` (both float32,
    same shape, `master` on the type's grid): rounded at random onto the master's grid, or the type's
    own rounding; unchanged for types without a step grid."""
    if not on_grid(qtype):
        return marked
    gg = gguf._gguf()
    q = gg.GGMLQuantizationType[qtype]
    master = np.ascontiguousarray(master, dtype=np.float32)
    marked = np.ascontiguousarray(marked, dtype=np.float32)
    if master.shape[-1] % gg.GGML_QUANT_SIZES[q][0]:
        return marked
    nearest = gg.quants.dequantize(gg.quants.quantize(marked, q), q).reshape(master.shape)
    random = _random_steps(master, marked, q, rng)
    delta = (marked - master).ravel().astype(np.float64)
    power = float(delta @ delta)
    if power == 0.0:
        return master.copy()

    def kept_per_noise(out: np.ndarray) -> float:
        change = (out - master).ravel().astype(np.float64)
        kept = float(change @ delta) / power
        return kept / max(float(np.linalg.norm(change - kept * delta)), 1e-30)

    return random if kept_per_noise(random) > kept_per_noise(nearest) else nearest


def _random_steps(master: np.ndarray, marked: np.ndarray, q, rng: np.random.Generator) -> np.ndarray:
    """Whole steps of each block's grid from the master, rounded at random; blocks keep their scale."""
    gg = gguf._gguf()
    size = gg.GGML_QUANT_SIZES[q][0]
    raw = gg.quants.quantize(master, q)  # the master's own blocks: it sits on their grid
    head = _header(raw, q)
    step = head[:, :2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
    mb, xb = _blocks(master, size), _blocks(marked, size)
    d = np.where(step == 0, np.inf, np.abs(step))  # a block of zeros has no grid: nothing moves there
    delta = (xb - mb) / d
    k = np.floor(delta)
    k += rng.random(k.shape) < (delta - k)
    out = np.where(np.isfinite(k * d), mb + k * d, mb)
    lo, hi = mb.min(1, keepdims=True), mb.max(1, keepdims=True)
    # The block's extremes set its scale: they never move, and nothing moves past them.
    out = np.where((mb == lo) | (mb == hi), mb, np.clip(out, lo, hi))
    # Stored as the type, the copy's blocks must keep the master's scale (and minimum): then its values
    # are the master's grid points, exactly as a GGUF file holds them. A block that would not keeps the
    # master's values.
    raw_out = gg.quants.quantize(out.reshape(master.shape), q)
    ok = (_header(raw_out, q) == head).all(1, keepdims=True)
    out = _blocks(gg.quants.dequantize(raw_out, q), size)
    return np.where(ok, out, mb).reshape(master.shape)


def _header(raw: np.ndarray, q) -> np.ndarray:
    """Each block's scale bytes (and minimum's, for the types with one): (blocks, 2 or 4) uint8."""
    gg = gguf._gguf()
    width = 4 if q.name in ("Q4_1", "Q5_1") else 2
    return raw.reshape(-1, gg.GGML_QUANT_SIZES[q][1])[:, :width]
