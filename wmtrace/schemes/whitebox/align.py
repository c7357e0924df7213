"""Find a master's carrier tensors in a leaked file and bring them back to the master's layout.

Names are not trusted (exporters rename), so a carrier is found by kernel shape and by how closely the
candidate's filters match the master's. A buyer copy descends from the master, so its filters stay
close: filters and input channels are matched with linear assignment, alternating between the two
(undoing permutations of the layer's channels and of the layer feeding it; rectangular, so dummy
channels stay unmatched and pruned ones become missing); `scales.rescale` then undoes BatchNorm folded
into the weights on ONNX export and rescaling across ReLU. A carrier no tensor matches (a layer that
fine-tuning re-learned) is still read where a tensor has its name and shape. Weights that are exactly
zero are treated as missing (pruned), never as values; so are NaN and infinite weights, which carry no
information (a leaker may blank part of a carrier with them). Every tensor of a carrier's shape is a
candidate; a cheap score (`_quick`) ranks them all and only the best `MAX_CANDIDATES` get the full
match, so decoys cost little each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .carriers import Carrier
from .scales import rescale

# Mean |cosine| between matched filters above which a tensor counts as this master's carrier.
# Buyer copies score > 0.9; independently trained models of the same architecture score far lower.
MATCH_THRESHOLD = 0.5
# A leaked tensor may have up to this factor fewer or more filters / input channels than the carrier.
MAX_RESHAPE = 4
# Mean |cosine| above which filters are taken as matched without re-assigning input channels.
IDENTITY_SCORE = 0.9
# Most alternations of filter and channel assignment from an order-free guess of the channels.
GUESS_ROUNDS = 8
# Candidate tensors per carrier given the full match (`_match`, about 20 ms each on the example's
# 64x64x3x3 carrier), after every tensor of a fitting shape is ranked by `_quick` (under 1 ms each).
# Without a cap, 200 random decoys of each carrier's shape took 36 s to trace (402 full matches per
# carrier); with it, 200 took 2.6 s and 2,000 about 5 s, most of it reading. 8 leaves room for
# the tensors of same-shaped layers of the same network, which score high on `_quick` as well
# (features.11 of the example also fits features.7's carrier), ahead of random decoys.
MAX_CANDIDATES = 8


@dataclass
class Located:
    carrier: Carrier
    source: str  # the tensor's name in the leaked file
    similarity: float  # mean |cosine| of matched filters, before alignment
    weight: np.ndarray  # aligned to the master: rows x dim, NaN where the leaked weight is gone
    # Taken by its name and shape alone: its filters no longer resemble the master's (similarity below
    # MATCH_THRESHOLD), as after fine-tuning that re-learns the layer, or in an unrelated model of the
    # same architecture. Its bits are still read: fair coins if the mark is gone, evidence if it is not.
    by_name: bool = False


def _orientations(shape: tuple[int, ...], carrier: Carrier) -> list[bool]:
    """Whether a tensor of `shape` may hold the carrier as is (False) and transposed (True, a Linear
    stored for MatMul); possibly with fewer or more filters and input channels (structured pruning,
    dummy channels). Needs the shape only, so tensors that cannot hold it are never read."""
    want = carrier.shape
    if len(shape) != len(want) or len(shape) < 2:
        return []
    out = []
    for transposed in (False, True) if len(shape) == 2 else (False,):
        s = tuple(shape[::-1]) if transposed else tuple(shape)
        if s[2:] != tuple(want[2:]):
            continue
        if not (want[0] / MAX_RESHAPE <= s[0] <= want[0] * MAX_RESHAPE):
            continue
        if not (want[1] / MAX_RESHAPE <= s[1] <= want[1] * MAX_RESHAPE):
            continue
        out.append(transposed)
    return out


def _views(t: np.ndarray, carrier: Carrier) -> list[np.ndarray]:
    """Ways the tensor may hold the carrier, as out x in x kernel arrays (see `_orientations`)."""
    out = []
    for transposed in _orientations(tuple(t.shape), carrier):
        c = np.ascontiguousarray(t.T) if transposed else t
        out.append(c.reshape(c.shape[0], c.shape[1], -1))
    return out


def _shapes(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Names and shapes, without reading anything when `tensors` reads lazily (`formats.TensorSource`)."""
    shapes = getattr(tensors, "shapes", None)
    if shapes is not None:
        return dict(shapes)
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _unit(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n > 0, n, 1.0)


def _assign(sim: np.ndarray) -> np.ndarray:
    """Best one-to-one assignment of leaked (rows of sim) to master (columns) items; -1 where a master
    item has no partner (fewer leaked items: structured pruning). Extra leaked items are left out."""
    r, c = linear_sum_assignment(-sim)
    where = np.full(sim.shape[1], -1, dtype=int)
    where[c] = r
    return where


def _gather(t: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """t (out' x in' x k) in the master's layout (out x in x k); NaN for unmatched rows and columns."""
    out = np.full((len(rows), len(cols), t.shape[2]), np.nan)
    r_ok, c_ok = rows >= 0, cols >= 0
    out[np.ix_(r_ok, c_ok)] = t[np.ix_(rows[r_ok], cols[c_ok])]
    return out


def _row_sim(t: np.ndarray, cols: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|cosine| between leaked filters (input channels mapped by `cols`) and master filters, over the
    weights the leaked filter still has: pruned (zero) weights say nothing about which filter it was."""
    g = np.nan_to_num(_gather(t, np.arange(t.shape[0]), cols)).reshape(t.shape[0], -1)
    m = ref.reshape(ref.shape[0], -1)
    norm_m = np.sqrt((g != 0).astype(np.float64) @ (m * m).T)  # master's norm on each leaked filter's support
    norm_g = np.linalg.norm(g, axis=1, keepdims=True)
    den = norm_g * norm_m
    return np.abs(np.where(den > 0, (g @ m.T) / np.where(den > 0, den, 1.0), 0.0))


def _col_sim(t: np.ndarray, rows: np.ndarray, cols: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine between leaked input channels and master ones, over matched filters (each filter's
    sign made to agree with its master filter first: BatchNorm folding may negate a filter)."""
    ok = rows >= 0
    g = np.nan_to_num(_gather(t, rows, cols))[ok]
    sign = np.where((g * ref[ok]).sum((1, 2)) < 0, -1.0, 1.0)
    a = np.transpose(t[rows[ok]] * sign[:, None, None], (1, 0, 2)).reshape(t.shape[1], -1)
    b = np.transpose(ref[ok], (1, 0, 2)).reshape(ref.shape[1], -1)
    return _unit(a) @ _unit(b).T


def _col_init(t: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Input-channel assignment that ignores how filters are ordered or scaled: each channel's
    kernel Gram matrix over unit-norm filters (or, for 1x1 kernels, its sorted magnitudes)."""

    def feats(a: np.ndarray, n: int) -> np.ndarray:
        u = _unit(a.reshape(a.shape[0], -1)).reshape(a.shape)
        if a.shape[2] > 1:
            return np.einsum("rjk,rjl->jkl", u, u).reshape(a.shape[1], -1)
        v = np.sort(np.abs(u[:, :, 0]), axis=0)  # rows x channels
        idx = np.linspace(0, v.shape[0] - 1, n).round().astype(int)
        return v[idx].T

    n = min(t.shape[0], ref.shape[0])
    fa, fb = feats(t, n), feats(ref, n)
    fa, fb = fa - fa.mean(1, keepdims=True), fb - fb.mean(1, keepdims=True)
    return _assign(_unit(fa) @ _unit(fb).T)


def _match(t: np.ndarray, ref: np.ndarray, rounds: int = 3) -> tuple[np.ndarray, np.ndarray, float]:
    """Filters and input channels of `t` matched to the master's, and the mean |cosine| of matched
    filters. Alternates: filters given channels, channels given filters. Starts from channels as
    they are (when the count fits; accepted at once when that already matches) and otherwise from
    an order-free guess, which is refined for as long as the match improves: a guess that is right
    for most channels already scores high, and stopping there left a structurally pruned carrier
    with its input channels half wrong (about half its bits lost, in half the copies tried)."""
    starts = [np.arange(ref.shape[1])] if t.shape[1] == ref.shape[1] else []
    best = None
    for k in range(2):
        guessed = k >= len(starts)
        cols = _col_init(t, ref) if guessed else starts[0]
        current = None
        for _ in range(GUESS_ROUNDS if guessed else rounds):
            sim = _row_sim(t, cols, ref)
            rows = _assign(sim)
            score = float(sim[rows[rows >= 0], np.flatnonzero(rows >= 0)].mean())
            if current is not None and score <= current[2] + 1e-9:
                break  # no longer improving
            current = (rows, cols, score)
            if not guessed and score > IDENTITY_SCORE:
                break
            cols = _assign(_col_sim(t, rows, cols, ref))
        if best is None or current[2] > best[2]:
            best = current
        if guessed or best[2] > IDENTITY_SCORE:
            break
    return best


def _finite(a: np.ndarray) -> np.ndarray:
    """float64, with NaN and infinite weights as 0: missing, like pruned weights (never a value)."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a), a, 0.0)


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|cosine| of every row of a (n x d) with every row of b (m x d); 0 where a row is all zero."""
    den = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None, :]
    return np.abs(np.where(den > 0, (a @ b.T) / np.where(den > 0, den, 1.0), 0.0))


def _kernel_gram(a: np.ndarray) -> np.ndarray:
    """Each filter's kernel Gram matrix (sum over input channels of k k'), trace-normalized, its
    uniform part removed: blind to the order of input channels and to the filter's scale."""
    k = a.shape[2]
    g = np.matmul(a.transpose(0, 2, 1), a)
    tr = np.trace(g, axis1=1, axis2=2)[:, None, None]
    return (g / np.where(tr > 0, tr, 1.0) - np.eye(k) / k).reshape(len(a), -1)


def _quick(t: np.ndarray, ref: np.ndarray, ref_gram: np.ndarray | None) -> float:
    """A cheap stand-in for `_match`'s score, to rank candidates: the best of
    - filters in the master's order (a plain copy, renamed or not);
    - each filter against its best master filter, input channels as stored (filters permuted);
    - for kernels of more than one weight, each filter's `_kernel_gram` against its best master
      filter's (`ref_gram`): blind to how input channels are ordered and filters scaled (permuted
      channels, BatchNorm folded), and random decoys score about 0.4 on it, a permuted copy 0.99.
    A tensor with more filters than the master (dummy filters added) is scored on its best-matching
    filters only, as many as the master has. Rows are subsampled to at most 64, so a candidate costs
    well under a millisecond."""
    rows = np.linspace(0, t.shape[0] - 1, min(t.shape[0], 64)).round().astype(int)
    sub = t[rows]
    keep = max(1, round(len(rows) * min(1.0, ref.shape[0] / t.shape[0])))

    def best(sim: np.ndarray) -> float:
        return float(np.sort(sim.max(1))[-keep:].mean())

    scores = [0.0]
    if t.shape[1] == ref.shape[1]:
        flat, m = sub.reshape(len(rows), -1), ref.reshape(len(ref), -1)
        if t.shape[0] == ref.shape[0]:
            a, b = flat, m[rows]
            den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            scores.append(float(np.mean(np.abs(np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 0)))))
        scores.append(best(_cos_rows(flat, m)))
    if ref_gram is not None:
        scores.append(best(_cos_rows(_kernel_gram(sub), ref_gram)))
    return max(scores)


def _same_place(
    tensors: Mapping[str, np.ndarray], shapes: dict[str, tuple], c: Carrier, ref: np.ndarray, taken: set[str]
) -> tuple[float, str, np.ndarray, np.ndarray, np.ndarray] | None:
    """The tensor that still has the carrier's name and shape, filters in the master's order, with its
    mean |cosine| to the master's filters. Names are not trusted: this only spares the search over
    every same-shaped tensor (dozens in a transformer) when the match is unmistakable."""
    if c.name in taken or tuple(shapes.get(c.name, ())) != tuple(c.shape):
        return None
    view = _finite(tensors[c.name]).reshape(ref.shape)
    a, b = view.reshape(len(view), -1), ref.reshape(len(ref), -1)
    b = np.where(a != 0, b, 0.0)  # pruned weights say nothing
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    score = float(np.mean(np.abs(np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 0.0))))
    identity = np.arange(len(view)), np.arange(view.shape[1])
    return score, c.name, view, *identity


def locate(
    tensors: Mapping[str, np.ndarray], master: Mapping[str, np.ndarray], carriers: list[Carrier]
) -> list[Located | None]:
    """Best-matching leaked tensor per carrier, aligned to the master; when no tensor matches, the one
    with the carrier's name and shape (`Located.by_name`), else None.

    Only tensors whose shape could hold the carrier are read, one at a time, and only the best so
    far is kept: a lazily read file (`formats.open_tensors`) is never held in memory whole.
    """
    shapes = _shapes(tensors)
    found: list[Located | None] = []
    taken: set[str] = set()
    for c in carriers:
        ref = master[c.name].astype(np.float64).reshape(c.shape[0], c.shape[1], -1)
        same = _same_place(tensors, shapes, c, ref, taken)
        best: tuple[float, str, np.ndarray, np.ndarray, np.ndarray] | None = same
        if best is None or best[0] <= IDENTITY_SCORE:  # else the carrier's name, in its order: no search
            ranked = []  # (quick score, name, view index): only scores are kept, views are read again
            ref_gram = _kernel_gram(ref) if ref.shape[2] > 1 else None
            for name, shape in shapes.items():
                if name in taken or not _orientations(shape, c):
                    continue
                for i, view in enumerate(_views(_finite(tensors[name]), c)):
                    ranked.append((_quick(view, ref, ref_gram), name, i))
            ranked.sort(key=lambda r: -r[0])
            for _, name, i in ranked[:MAX_CANDIDATES]:
                view = _views(_finite(tensors[name]), c)[i]
                rows, cols, score = _match(view, ref)
                if best is None or score > best[0]:
                    best = (score, name, view, rows, cols)
        by_name = best is None or best[0] < MATCH_THRESHOLD
        if by_name and same is None:
            found.append(None)
            continue
        score, name, view, rows, cols = same if by_name else best
        taken.add(name)
        aligned = _gather(view, rows, cols)
        aligned = np.where(aligned == 0.0, np.nan, aligned)
        found.append(Located(c, name, score, rescale(aligned, ref), by_name))
    return found
