"""Find a master's carrier tensors in a leaked file and bring them back to the master's layout.

Names are not trusted (exporters rename), so a carrier is found by kernel shape and by how closely the
candidate's filters match the master's. A buyer copy descends from the master, so its filters stay
close: filters and input channels are matched with linear assignment, alternating between the two
(undoing permutations of the layer's channels and of the layer feeding it; rectangular, so dummy
channels stay unmatched and pruned ones become missing); `scales.rescale` then undoes BatchNorm folded
into the weights on ONNX export and rescaling across ReLU. A carrier no tensor matches (a layer that
fine-tuning re-learned) is still read where a tensor has its name and shape. Weights that are exactly
zero are treated as missing (pruned), never as values; so are NaN and infinite weights, which carry no
information (a leaker may blank part of a carrier with them).

Every tensor of a carrier's shape is a candidate. The full match costs 2-3 s per candidate of a 1.1B
Llama's k_proj shape, so a cheap screen that permutations do not fool (`screen.rank`) ranks them all
first; they get the full match in that order, at most `MAX_CANDIDATES`, and once one the screen
passes has matched at `STOP_SCORE` or better, those the screen finds clearly unlike the carrier are
skipped (a renamed 1.1B copy: 28.3 s -> 3.2 s in one run, 16 full matches -> 2). Until something
matches that well, rejected candidates are still matched, as before the screen: a copy the screen
cannot see is slower to find, not lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from . import screen
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
# 64x64x3x3 carrier, 2-3 s on a 1.1B Llama's 256 x 2,048 k_proj), after every tensor of a fitting
# shape is ranked by `screen.rank` (a few ms each; tens of ms at 256 x 2,048). Without a cap, 200
# random decoys of each carrier's shape took 36 s to trace (402 full matches per carrier); with it,
# 200 took 2.6 s. 8 leaves room for the tensors of same-shaped layers of the same network (features.11
# of the example also fits features.7's carrier) when the screen cannot tell (nothing matches clearly).
MAX_CANDIDATES = 8
# A full match at least this good, from a candidate the screen also passes, ends the search once every
# candidate left is one the screen finds clearly unlike the carrier. In benchmarks/bench_screen.py
# (example CNN, 60 copies under 20 attacks, renamed among random decoys) wrong tensors' full matches
# reach 0.89 (another layer pruned by 98%: sparse filters match anything), none of them passing the
# screen; the 3 that pass (other layers after an epoch of fine-tuning) match at most 0.28. The true
# carrier's are 0.87-0.89 after noise at 0.4 of the weights' spread or permutation, which stop here.
STOP_SCORE = 0.8


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
    return screen.unit(a) @ screen.unit(b).T


def _col_init(t: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Input-channel assignment that ignores how filters are ordered or scaled: each channel's
    kernel Gram matrix over unit-norm filters (or, for 1x1 kernels, its sorted magnitudes)."""

    def feats(a: np.ndarray, n: int) -> np.ndarray:
        u = screen.unit(a.reshape(a.shape[0], -1)).reshape(a.shape)
        if a.shape[2] > 1:
            return np.einsum("rjk,rjl->jkl", u, u).reshape(a.shape[1], -1)
        v = np.sort(np.abs(u[:, :, 0]), axis=0)  # rows x channels
        idx = np.linspace(0, v.shape[0] - 1, n).round().astype(int)
        return v[idx].T

    n = min(t.shape[0], ref.shape[0])
    fa, fb = feats(t, n), feats(ref, n)
    fa, fb = fa - fa.mean(1, keepdims=True), fb - fb.mean(1, keepdims=True)
    return _assign(screen.unit(fa) @ screen.unit(fb).T)


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


def _search(
    tensors: Mapping[str, np.ndarray], shapes: dict[str, tuple], c: Carrier, ref: np.ndarray, taken: set[str],
    best: tuple[float, str, np.ndarray, np.ndarray, np.ndarray] | None,
) -> tuple[float, str, np.ndarray, np.ndarray, np.ndarray] | None:
    """The best full match (`_match`) among the tensors that could hold carrier `c`, tried in the
    screen's order (`screen.rank`), at most `MAX_CANDIDATES`. Once a candidate the screen passes has
    matched at `STOP_SCORE` or better, those the screen finds clearly unlike the carrier (rank below
    `screen.MARGIN`, all after the passing ones) are not tried: that is what makes a renamed copy
    cheap (a 1.1B Llama's: 28.3 s -> 3.2 s, benchmarks/bench_stream.py --renamed). Until then they
    are, in the same order, as before the screen, so a copy the screen cannot see (a Linear layer's
    inputs permuted and 80% pruned; anything pruned by 98%) is still found by the full match."""
    sk = screen.sketch(ref)
    ranked = []  # (rank, name, view index): only ranks are kept, views are read again
    for name, shape in shapes.items():
        if name in taken or not _orientations(shape, c):
            continue
        for i, view in enumerate(_views(_finite(tensors[name]), c)):
            ranked.append((screen.rank(view, sk), name, i))
    ranked.sort(key=lambda r: -r[0])
    clear = False  # a candidate the screen passes matched at STOP_SCORE or better
    for rank, name, i in ranked[:MAX_CANDIDATES]:
        if clear and rank < screen.MARGIN:
            break  # this and every later candidate are clearly unlike the carrier
        view = _views(_finite(tensors[name]), c)[i]
        rows, cols, score = _match(view, ref)
        clear = clear or (rank >= screen.MARGIN and score >= STOP_SCORE)
        if best is None or score > best[0]:
            best = (score, name, view, rows, cols)
    return best


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
            best = _search(tensors, shapes, c, ref, taken, best)
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
