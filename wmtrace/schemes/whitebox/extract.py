"""Read a buyer's bits from located carriers: the least-squares fit of the placed change.

Issuing moved filter i of a carrier by basis @ (signs[:, i] * coef); given the leaked carrier aligned to
the master's layout (`align`), the fit recovers coef from every weight still there and the bits follow.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from safetensors import safe_open

from ...errors import BadInput
from ...registry import Master
from .align import Located
from .carriers import Secret, embedding_map
from .scales import TRIM

# Relative ridge of the fit: numerical only. A ridge that shrinks (0.01) biases every coefficient and,
# through the Gram matrix, every bit: on a plain filter-mean carrier it flipped bits of an intact copy.
RIDGE = 1e-6
# The most a filter may weigh in the fit's second pass, in units of the median filter (`_fit`).
MAX_WEIGHT = 10.0


def master_arrays(m: Master, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The registered master's weights; only `names` (its carriers, say) when given, read by name
    so that a large master is never loaded whole. Stored dtypes are kept where numpy has them
    (bfloat16 and float8 become float32)."""
    try:
        with safe_open(str(m.weights), framework="pt") as f:
            return {n: _numpy(f.get_tensor(n)) for n in (f.keys() if names is None else names)}
    except Exception as e:
        raise BadInput(f"{m.weights}: registered weights of master {m.name!r} are unreadable ({e})") from e


def _numpy(t: torch.Tensor) -> np.ndarray:
    """As `safetensors.numpy` would give it; numpy has no bfloat16 or float8, so those become float32."""
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        return t.to(torch.float32).numpy()
    return t.numpy()


def soft_bits(
    found: Located, master_weight: np.ndarray, secret: Secret, margin: float, metric: np.ndarray | None = None
) -> np.ndarray:
    """Each bit's statistic of the aligned difference to the master, in margins; NaN when nothing is left.

    Issuing moved filter i by basis @ (signs[:, i] * coef), basis = metric^-1 x' (x' for minimal-norm
    placement), so coef is fitted by least squares over every weight still there (pruned weights,
    removed filters and input channels take no part) and the statistics follow from it. The fit
    looks only along the directions the mark was placed in, mostly ones the data rarely visits,
    where fine-tuning moves the weights least: after 2 epochs at the master's peak learning rate it
    left 0 of 256 bits wrong where the plain projection of the difference left 5 (BENCHMARKS.md).
    """
    rows = found.carrier.rows
    delta = found.weight - master_weight.reshape(rows, -1).astype(np.float64)
    known = ~np.isnan(delta)
    if not known.any():
        return np.full(secret.x.shape[0], np.nan)
    placed = embedding_map(secret, metric)
    coef = _fit(np.where(known, delta, 0.0), known, placed.basis, secret.signs)
    return (placed.gram @ coef) / (math.sqrt(secret.x.shape[1]) * margin)


def _fit(delta: np.ndarray, known: np.ndarray, basis: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Coefficients with delta[i] ~ basis @ (signs[:, i] * coef) on the known weights, by least
    squares; refitted once without the `TRIM` fraction of filters that fit worst, each remaining filter
    weighted by the inverse of its residual variance. Fine-tuning moves some filters far more than
    others; weighing them by how well they fit raised the leaker's score after 2 and 4 epochs at
    lr 0.2 from 8.4 to 9.7 and from 4.3 to 6.4 (the bound needs 5.5), with no change on intact, pruned
    or noisy copies (BENCHMARKS.md, fine-tuning). The weights never look at a codeword: the bound holds."""
    bits = basis.shape[1]
    use = known.any(1)
    weight = np.ones((len(delta), 1))
    coef = np.zeros(bits)
    for first in (True, False):
        d, s = delta * weight, signs * weight.T  # row i scaled by sqrt(w_i): weighted least squares
        a = _normal(known, basis, basis.T @ basis, s, use)
        a += RIDGE * max(np.trace(a), 1e-30) / bits * np.eye(bits)
        coef = np.linalg.solve(a, ((d @ basis)[use] * s[:, use].T).sum(0))
        if not first or use.sum() < 5:
            break
        resid = np.where(known, delta - (signs.T * coef) @ basis.T, 0.0)
        err = (resid**2).sum(1) / np.maximum(known.sum(1), 1)
        use = known.any(1) & (err <= np.quantile(err[known.any(1)], 1.0 - TRIM))
        # No filter counts more than MAX_WEIGHT typical ones: one that fits by chance (a few weights
        # left after pruning) must not carry the fit alone.
        weight = np.sqrt(np.minimum(np.median(err[use]) / np.maximum(err, 1e-30), MAX_WEIGHT))[:, None]
    return coef


def _normal(known: np.ndarray, basis: np.ndarray, gram: np.ndarray, signs: np.ndarray, use: np.ndarray) -> np.ndarray:
    """The fit's normal matrix, sum over used filters i of (s_i s_i') * (B' diag(known_i) B), built
    from whichever are fewer, the weights known or those missing: a quantized copy misses a few
    weights in every filter, a pruned one most of them. `gram` is basis' basis."""
    full = use & known.all(1)
    a = gram * (signs[:, full] @ signs[:, full].T)
    part = np.flatnonzero(use & ~known.all(1))
    if part.size:
        missing = ~known[part]
        if missing.sum() <= missing.size // 2:
            a += gram * (signs[:, part] @ signs[:, part].T) - _outer_sum(missing, part, basis, signs)
        else:
            a += _outer_sum(~missing, part, basis, signs)
    return a


def _outer_sum(mask: np.ndarray, rows: np.ndarray, basis: np.ndarray, signs: np.ndarray,
               block: int = 1 << 15) -> np.ndarray:
    """Sum of u u' over the (filter, weight) pairs in `mask`, u = signs[:, filter] * basis[weight]."""
    r, d = np.nonzero(mask)
    out = np.zeros((basis.shape[1], basis.shape[1]))
    for k in range(0, len(r), block):
        u = signs.T[rows[r[k : k + block]]] * basis[d[k : k + block]]
        out += u.T @ u
    return out




def extract(
    found: list[Located | None],
    master: dict[str, np.ndarray],
    key: bytes,
    cfg,  # scheme.Config (not imported: scheme imports this module)
    bits: int,
    metrics: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Soft bits of the whole codeword (`bits` long), NaN where a carrier was not found or is gone."""
    soft = np.full(bits, np.nan)
    for loc, margin in zip(found, cfg.margins, strict=True):
        if loc is None:
            continue
        c = loc.carrier
        metric = (metrics or {}).get(c.name)
        soft[c.start : c.start + c.bits] = soft_bits(loc, master[c.name], c.secret(key), margin, metric)
    return soft
