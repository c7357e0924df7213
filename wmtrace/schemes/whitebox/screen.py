"""A cheap screen of the tensors that could hold a carrier, run before `align._match`.

`align._match` (linear assignment of filters and input channels, alternating) decides which leaked
tensor holds a carrier, but it costs 2-3 s per non-matching candidate of a 1.1B Llama's k_proj shape
(256 x 2,048), where a renamed copy has 44 candidates per carrier. The screen scores each
candidate in milliseconds (tens of them at that shape) on three views, each blind to something a
leaker may do:

- `_as_stored`: filters against the master's, input channels as stored; filters in the master's
  order or each against its best master filter (renamed, filters permuted, rescaled, pruned,
  quantized, noised; blind to permuted input channels);
- `_kernels` (kernels of more than one weight): each filter's kernel Gram matrix, blind to the order
  and scale of input channels (permuted convolutions, BatchNorm folded in);
- `_channels` (kernels of one weight: Linear layers): filters paired by their sorted values, which
  no permutation of input channels changes, then each input channel against its best master channel
  over the paired filters (filters and input channels both permuted: exact, int8 or rescaled copies
  rank about 1.0, noised by 0.2 of the weights' spread or 50% pruned 0.45-0.5; blind beyond that).

Each view's score is set against chance: what random tensors of the candidate's shape get (`null`,
seeded Gaussian tensors, once per shape). `rank` is how far a candidate is above chance, as a
fraction of the way to a perfect copy, on its best view; below `MARGIN` it is clearly unlike the
carrier. `align.locate` tries candidates in the order of their rank and skips those below `MARGIN`
once one above it has matched well; while none has, they are matched as before the screen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A candidate passes the screen when one view puts it this fraction of the way from chance to a
# perfect copy. Measured (benchmarks/bench_screen.py, bench_stream.py --renamed): random decoys rank
# 0.00 +- 0.01 (at most 0.005 of 222 at the 1.1B's k_proj shape), other layers of the example CNN up
# to 0.26 (0.33 after an epoch of fine-tuning); the true carrier 0.44 or more under every attack there
# but pruning by 95% or more (0.07-0.29 on the CNN) and a Linear layer's inputs permuted and 80% pruned.
MARGIN = 0.3
# Filters compared on at most this many (evenly spaced): as stored and by kernels, and by `_channels`
# (the pairing is its cost: at 256 its score on a random tensor is about 0.22, a copy's up to 1).
SAMPLE_ROWS = 64
CHANNEL_ROWS = 256
# Input channels compared on at most this many (`_channels`).
SAMPLE_CHANNELS = 128
# Bins of a filter's sorted-values profile (`_profiles`).
PROFILE_BINS = 64
# Seeded Gaussian tensors per candidate shape whose median scores are the chance level (`null`). One
# is enough: over 12 draws a view's chance score varies by at most 0.014 (std, the example CNN's
# smallest candidate), 0.02 in rank, against a `MARGIN` of 0.3; the draws were 8.5 of the 10 ms a
# renamed example CNN copy took more than the same copy under its names (3 draws). The seed is one no
# test or benchmark draws its weights from (a master drawn from it would be its own chance level).
NULL_DRAWS = 1
NULL_SEED = 0x5C7EE7


def unit(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (all-zero rows left as they are)."""
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(n > 0, n, 1.0)


def cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|cosine| of every row of a (n x d) with every row of b (m x d); 0 where a row is all zero."""
    den = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None, :]
    return np.abs(np.where(den > 0, (a @ b.T) / np.where(den > 0, den, 1.0), 0.0))


def kernel_gram(a: np.ndarray) -> np.ndarray:
    """Each filter's kernel Gram matrix (sum over input channels of k k'), trace-normalized, its
    uniform part removed: blind to the order of input channels and to the filter's scale."""
    k = a.shape[2]
    g = np.matmul(a.transpose(0, 2, 1), a)
    tr = np.trace(g, axis1=1, axis2=2)[:, None, None]
    return (g / np.where(tr > 0, tr, 1.0) - np.eye(k) / k).reshape(len(a), -1)


def _rms(a: np.ndarray) -> np.ndarray:
    """Each input channel's (and kernel weight's) root mean square over the filters, 1 where it is 0."""
    rms = np.sqrt((a * a).mean(axis=0, keepdims=True))
    return np.where(rms > 0, rms, 1.0)


def _profiles(a: np.ndarray, bins: int = PROFILE_BINS, rms: np.ndarray | None = None) -> np.ndarray:
    """Each filter's sorted values, averaged in `bins` quantile bins and standardized over the filters:
    what sets a filter apart from the others, unchanged by any order of its input channels. Each input
    channel is first divided by its `_rms` (of all filters, also when `a` is a sample of them), so
    rescaled input channels (a norm's weight folded in, rescaling across ReLU) change nothing; then
    each filter is scaled to unit norm (BatchNorm folded in). Standardized on each side separately, so
    a change every filter shares (quantization, noise, a global scale) cancels."""
    v = np.sort(unit((a / (_rms(a) if rms is None else rms)).reshape(len(a), -1)), axis=1)
    bins = min(bins, v.shape[1])
    edges = np.linspace(0, v.shape[1], bins + 1).round().astype(int)
    sums = np.concatenate([np.zeros((len(v), 1)), np.cumsum(v, axis=1)], axis=1)
    f = (sums[:, edges[1:]] - sums[:, edges[:-1]]) / np.diff(edges)
    f = f - f.mean(0)
    return unit(f / (f.std(0) + 1e-12))


def _spread(n: int, cap: int) -> np.ndarray:
    return np.linspace(0, n - 1, min(n, cap)).round().astype(int)


@dataclass
class Sketch:
    """The master's carrier as the screen sees it, computed once per carrier."""

    ref: np.ndarray  # out x in x kernel
    gram: np.ndarray | None  # kernel_gram(ref), for kernels of more than one weight
    profiles: np.ndarray | None  # _profiles(ref), for kernels of one weight (`_channels`)
    units: np.ndarray  # ref with unit-norm filters
    nulls: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)  # per candidate shape


def sketch(ref: np.ndarray) -> Sketch:
    units = unit(ref.reshape(len(ref), -1)).reshape(ref.shape)
    if ref.shape[2] > 1:
        return Sketch(ref, kernel_gram(ref), None, units)
    return Sketch(ref, None, _profiles(ref), units)


def _as_stored(t: np.ndarray, sk: Sketch) -> float:
    """Filters (at most `SAMPLE_ROWS`) against the master's, input channels as stored: in the master's
    order, or each against its best master filter. A tensor with more filters than the master (dummy
    filters added) is scored on its best-matching filters only, as many as the master has."""
    ref = sk.ref
    if t.shape[1] != ref.shape[1]:
        return 0.0
    rows = _spread(t.shape[0], SAMPLE_ROWS)
    flat, m = t[rows].reshape(len(rows), -1), ref.reshape(len(ref), -1)
    keep = max(1, round(len(rows) * min(1.0, ref.shape[0] / t.shape[0])))
    best = float(np.sort(cos_rows(flat, m).max(1))[-keep:].mean())
    if t.shape[0] == ref.shape[0]:
        a, b = flat, m[rows]
        den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        ordered = np.abs(np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 0.0))
        best = max(best, float(ordered.mean()))
    return best


def _kernels(t: np.ndarray, sk: Sketch) -> float:
    """Each filter's kernel Gram matrix against its best master filter's (at most `SAMPLE_ROWS`)."""
    if sk.gram is None:
        return 0.0
    rows = _spread(t.shape[0], SAMPLE_ROWS)
    keep = max(1, round(len(rows) * min(1.0, sk.ref.shape[0] / t.shape[0])))
    return float(np.sort(cos_rows(kernel_gram(t[rows]), sk.gram).max(1))[-keep:].mean())


def _channels(t: np.ndarray, sk: Sketch) -> float:
    """Filters (at most `CHANNEL_ROWS`) paired with the master's by their `_profiles` (nearest), then
    each input channel (at most `SAMPLE_CHANNELS`) against its best master channel over the paired
    filters: high only when the pairing is right for many filters, which a permutation of input
    channels does not change. Only for kernels of one weight (Linear layers): `_kernels` sees larger
    kernels better (the example CNN's carriers in a plain copy rank about 0.4 here, 0.93-0.95 there)."""
    if sk.profiles is None:
        return 0.0
    rows = _spread(t.shape[0], CHANNEL_ROWS)
    sub = t[rows]
    mine = _profiles(sub, sk.profiles.shape[1], _rms(t))
    ref = sk.profiles if mine.shape[1] == sk.profiles.shape[1] else _profiles(sk.ref, mine.shape[1])
    pair = (mine @ ref.T).argmax(1)
    cols = _spread(t.shape[1], SAMPLE_CHANNELS)
    units = unit(sub.reshape(len(sub), -1)).reshape(sub.shape)
    a = units[:, cols, :].transpose(1, 0, 2).reshape(len(cols), -1)
    b = sk.units[pair].transpose(1, 0, 2).reshape(sk.ref.shape[1], -1)
    return float(cos_rows(a, b).max(1).mean())


VIEWS = (_as_stored, _kernels, _channels)


def _raw(t: np.ndarray, sk: Sketch) -> np.ndarray:
    return np.array([view(t, sk) for view in VIEWS])


def null(shape: tuple[int, ...], sk: Sketch) -> np.ndarray:
    """Each view's median score on `NULL_DRAWS` seeded Gaussian tensors of `shape`: chance level."""
    if shape not in sk.nulls:
        rng = np.random.default_rng(NULL_SEED)
        sk.nulls[shape] = np.median([_raw(rng.standard_normal(shape), sk) for _ in range(NULL_DRAWS)], axis=0)
    return sk.nulls[shape]


def rank(t: np.ndarray, sk: Sketch) -> float:
    """How far `t` (out x in x kernel) is above chance on its best view, as a fraction of the way from
    chance to a perfect copy; below `MARGIN`: clearly unlike the carrier. The costliest view
    (`_channels`) is left out when another already passes."""
    base = null(tuple(t.shape), sk)
    best = -1.0
    for i, view in enumerate(VIEWS):
        if best >= MARGIN and view is _channels:
            break
        if base[i] >= 1.0 - 1e-9:
            continue  # a view chance already satisfies (tiny tensors) says nothing
        best = max(best, float((view(t, sk) - base[i]) / (1.0 - base[i])))
    return best
