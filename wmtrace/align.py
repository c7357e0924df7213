"""Find a master's carrier tensors in a leaked file and bring them back to the master's layout.

Names are not trusted (exporters rename), so a carrier is found by shape and by how closely the
candidate's filters match the master's. A buyer copy descends from the master, so its filters
stay close: matching is done per filter with linear assignment (undoing channel permutations),
and each filter gets its own scale (undoing BatchNorm folded into the weights on ONNX export,
or any positive/negative per-channel rescaling). Weights that are exactly zero are treated as
missing (pruned), never as values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .carriers import Carrier

# Mean |cosine| between matched filters above which a tensor counts as this master's carrier.
# Buyer copies score > 0.9; independently trained models of the same architecture score far lower.
MATCH_THRESHOLD = 0.5


@dataclass
class Located:
    carrier: Carrier
    source: str  # the tensor's name in the leaked file
    similarity: float  # mean |cosine| of matched filters, before alignment
    weight: np.ndarray  # aligned to the master: rows x dim, NaN where the leaked weight is gone


def _rows(t: np.ndarray, carrier: Carrier) -> list[np.ndarray]:
    """Ways the tensor may hold the carrier: as is, or transposed (Linear stored for MatMul)."""
    out = []
    if t.shape == carrier.shape:
        out.append(t.reshape(carrier.rows, -1))
    if t.ndim == 2 and t.T.shape == carrier.shape:
        out.append(np.ascontiguousarray(t.T))
    return out


def _unit(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n > 0, n, 1.0)


def _match(rows: np.ndarray, master: np.ndarray) -> tuple[np.ndarray, float]:
    """Permutation of `rows` onto the master's filters, and the mean |cosine| it achieves."""
    sim = np.abs(_unit(rows) @ _unit(master).T)  # leaked x master
    r, c = linear_sum_assignment(-sim)
    perm = np.empty(len(c), dtype=int)
    perm[c] = r
    return perm, float(sim[r, c].mean())


def nanmean_rows(a: np.ndarray) -> np.ndarray:
    """Mean over rows ignoring NaN; NaN where a column has no value left (no warning)."""
    known = ~np.isnan(a)
    count = known.sum(0)
    total = np.where(known, a, 0.0).sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _rescale(rows: np.ndarray, master: np.ndarray, iters: int = 4) -> np.ndarray:
    """Undo per-filter scaling: rows ~ s_l * (master_l + d) with a shared shift d (the mark).

    Alternating least squares on s and d, so the scale estimate is not biased by the mark itself.
    Missing (NaN) entries take no part.
    """
    known = ~np.isnan(rows)
    r0 = np.where(known, rows, 0.0)
    d = np.zeros(master.shape[1])
    out = rows
    for _ in range(iters):
        ref = np.where(known, master + d, 0.0)
        denom = (ref * ref).sum(1)
        s = np.where(denom > 0, (r0 * ref).sum(1) / np.where(denom > 0, denom, 1.0), 0.0)
        ok = np.abs(s) > 1e-12
        out = np.full_like(rows, np.nan)
        out[ok] = rows[ok] / s[ok, None]
        d = np.nan_to_num(nanmean_rows(out - master)) if ok.any() else d
    return out


def locate(
    tensors: dict[str, np.ndarray], master: dict[str, np.ndarray], carriers: list[Carrier]
) -> list[Located | None]:
    """Best-matching leaked tensor per carrier (None when nothing matches), aligned to the master."""
    found: list[Located | None] = []
    taken: set[str] = set()
    for c in carriers:
        ref = master[c.name].reshape(c.rows, -1).astype(np.float64)
        best: tuple[float, str, np.ndarray, np.ndarray] | None = None
        for name, t in tensors.items():
            if name in taken or t.size != ref.size:
                continue
            for rows in _rows(t, c):
                rows = rows.astype(np.float64)
                perm, score = _match(rows, ref)
                if best is None or score > best[0]:
                    best = (score, name, rows, perm)
        if best is None or best[0] < MATCH_THRESHOLD:
            found.append(None)
            continue
        score, name, rows, perm = best
        taken.add(name)
        rows = rows[perm]
        rows = np.where(rows == 0.0, np.nan, rows)
        found.append(Located(c, name, score, _rescale(rows, ref)))
    return found
