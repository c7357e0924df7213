"""Marks on a quantized master's own grid: a GGUF copy must keep its master's type and stay marked.

A Q4_1 master's weights sit exactly on their blocks' grids (scale d and minimum m per 32 weights:
d * q + m). Written back as Q4_1, a mark much smaller than a step (d) rounds to the master's own
values: nearest rounding erases it. So such a copy moves whole steps instead, where the mark is
largest in steps and in its direction, until the change's projection on the mark equals the mark's
own; every block keeps the master's scale and minimum, so quantizing the copy again gives it back bit
for bit (checked per block: a block that would not keeps the master's values), and the copy is
measured, self-checked and traced exactly as the file holds it. A mark comparable to a step moves the
blocks' extremes, and the type's own rounding then re-draws their grids and keeps it; `snap` takes
whichever costs less change per share of the mark kept.

Measured on SmolLM2's layer-13 q_proj (Q4_1, a step is 0.27 of the weights' RMS) with random marks
(share of the mark kept; change made over the mark's size; weights moved): at 0.01 of the RMS, steps
keep 1.00 (2.9x; 2.4%) where nearest rounding keeps 0.06; at 0.05, 1.00 (1.6x; 12%) against 0.43;
at 0.1, 1.00 (1.3x; 26%) against 0.93 (1.2x, re-rounding 99.8% of the weights); at 0.3 nearest
rounding wins, 1.00 (1.0x) against 0.67.
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


def snap(master: np.ndarray, marked: np.ndarray, qtype: str) -> np.ndarray:
    """`marked` stored as `qtype` the way that realizes its change from `master` at less cost (both
    float32, same shape, `master` on the type's grid): whole steps of the master's grid where the
    mark is largest, or the type's own rounding; unchanged for types without a step grid."""
    if not on_grid(qtype):
        return marked
    gg = gguf._gguf()
    q = gg.GGMLQuantizationType[qtype]
    master = np.ascontiguousarray(master, dtype=np.float32)
    marked = np.ascontiguousarray(marked, dtype=np.float32)
    if master.shape[-1] % gg.GGML_QUANT_SIZES[q][0]:
        return marked
    delta = (marked - master).ravel().astype(np.float64)
    power = float(delta @ delta)
    if power == 0.0:
        return master.copy()

    def cost(out: np.ndarray) -> float:
        """Change made per share of the mark kept (the mark's own cost is 1)."""
        change = (out - master).ravel().astype(np.float64)
        kept = float(change @ delta) / power
        return float(np.linalg.norm(change)) / np.sqrt(power) / kept if kept > 0 else np.inf

    nearest = gg.quants.dequantize(gg.quants.quantize(marked, q), q).reshape(master.shape)
    steps = _steps(master, marked, q)
    return steps if cost(steps) <= cost(nearest) else nearest


def _steps(master: np.ndarray, marked: np.ndarray, q) -> np.ndarray:
    """One step of each block's grid on the weights whose mark is largest in steps, in the mark's
    direction, until the change's projection on the mark equals the mark's own; blocks keep their scale."""
    gg = gguf._gguf()
    size = gg.GGML_QUANT_SIZES[q][0]
    raw = gg.quants.quantize(master, q)  # the master's own blocks: it sits on their grid
    head = _header(raw, q)
    step = np.abs(head[:, :2].copy().view(np.float16).astype(np.float32))  # (blocks, 1)
    mb, delta = _blocks(master, size), _blocks(marked, size) - _blocks(master, size)
    lo, hi = mb.min(1, keepdims=True), mb.max(1, keepdims=True)
    moved = mb + np.sign(delta) * step
    # The block's extremes set its scale: they never move, and nothing moves past them.
    free = (mb != lo) & (mb != hi) & (moved >= lo) & (moved <= hi) & (step > 0) & (delta != 0)
    gain = np.where(free, np.abs(delta) * step, 0.0).ravel().astype(np.float64)  # projection on the mark
    order = np.argsort(-np.where(free, np.abs(delta) / np.where(step > 0, step, 1), 0).ravel(), kind="stable")
    need = float((delta.astype(np.float64) ** 2).sum())
    count = min(int(np.searchsorted(np.cumsum(gain[order]), need)) + 1, int(free.sum()))
    hop = np.zeros(mb.size, dtype=bool)
    hop[order[:count]] = True
    out = np.where(hop.reshape(mb.shape), moved, mb)
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
