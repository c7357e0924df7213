"""Name the buyer behind a leaked file: load -> locate -> align -> extract -> decode -> accuse."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from . import accuse, codes
from . import carriers as carriers_mod

try:
    from . import formats
except ImportError:
    formats = None
from .align import TRIM, Located, locate
from .carriers import Carrier, Secret
from .errors import BadInput
from .registry import Buyer, Master, Registry

IDENTIFIED = "identified"
COLLUDERS = "colluders"
NO_WATERMARK = "no watermark"
UNKNOWN_MASTER = "unknown master"
DEFAULT_MAX_FALSE_POSITIVE = 1e-6
# Relative ridge of the fit: numerical only. A ridge that shrinks (0.01) biases every coefficient and,
# through the Gram matrix, every bit: on a plain filter-mean carrier it flipped bits of an intact copy.
RIDGE = 1e-6


@dataclass
class TraceResult:
    verdict: str
    file: str
    master: str | None = None
    buyer: dict | None = None
    bit_errors: int | None = None
    bits: int | None = None
    bits_missing: int | None = None
    symbol_errors: int | None = None
    erasures: int | None = None
    false_positive_probability: float | None = None
    # Buyers accused by score when several copies were merged: id, name, score, false_accusation_bound.
    colluders: list[dict] = field(default_factory=list)
    carriers: list[dict] = field(default_factory=list)
    reason: str = ""

    @property
    def exit_code(self) -> int:
        return {IDENTIFIED: 0, COLLUDERS: 0, NO_WATERMARK: 1}.get(self.verdict, 2)

    def to_dict(self) -> dict:
        return asdict(self)


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


def moments_file(weights: str | os.PathLike) -> Path:
    """Where a registered master's placement metric lives, beside its weights."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".moments.safetensors")


def load_moments(m: Master) -> dict[str, np.ndarray]:
    """The master's stored placement metric per carrier name; empty when none was stored."""
    path = moments_file(m.weights)
    if not path.exists():
        return {}
    try:
        return {k: v.astype(np.float64) for k, v in load_file(str(path)).items()}
    except Exception as e:
        raise BadInput(f"{path}: stored placement metric of master {m.name!r} is unreadable ({e})") from e


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
    placed = carriers_mod.embedding_map(secret, metric)
    coef = _fit(np.where(known, delta, 0.0), known, placed.basis, secret.signs)
    return (placed.gram @ coef) / (math.sqrt(secret.x.shape[1]) * margin)


def _fit(delta: np.ndarray, known: np.ndarray, basis: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Coefficients with delta[i] ~ basis @ (signs[:, i] * coef) on the known weights, by least
    squares; refitted once without the `TRIM` fraction of filters that fit worst."""
    bits = basis.shape[1]
    proj = delta @ basis  # rows x bits: basis' delta_i over the known weights (unknown ones are 0)
    gram = basis.T @ basis
    use = known.any(1)
    coef = np.zeros(bits)
    for _ in range(2):
        a = _normal(known, basis, gram, signs, use)
        a += RIDGE * max(np.trace(a), 1e-30) / bits * np.eye(bits)
        coef = np.linalg.solve(a, (proj[use] * signs[:, use].T).sum(0))
        if use.sum() < 5:
            break
        resid = np.where(known, delta - (signs.T * coef) @ basis.T, 0.0)
        err = (resid**2).sum(1) / np.maximum(known.sum(1), 1)
        use = known.any(1) & (err <= np.quantile(err[known.any(1)], 1.0 - TRIM))
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
    config: dict,
    metrics: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    spec = codes.CodeSpec(**config["code"])
    soft = np.full(spec.bits, np.nan)
    for loc, cfg in zip(found, config["carriers"], strict=True):
        if loc is None:
            continue
        c = loc.carrier
        metric = (metrics or {}).get(c.name)
        soft[c.start : c.start + c.bits] = soft_bits(loc, master[c.name], c.secret(key), cfg["margin"], metric)
    return soft


def trace_tensors(
    tensors: Mapping[str, np.ndarray],
    registry: Registry,
    file: str = "",
    master: str | None = None,
    max_false_positive: float = DEFAULT_MAX_FALSE_POSITIVE,
    pending: list[Buyer] = (),
) -> TraceResult:
    """Trace weights in memory, or read lazily (`formats.open_tensors`); `pending` buyers count as
    issued (for self-checks)."""
    if not 0.0 < max_false_positive < 1.0:
        raise BadInput(f"--max-false-positive {max_false_positive}: use a probability between 0 and 1")
    masters = [registry.master(master)] if master else registry.masters()
    if not masters:
        return TraceResult(UNKNOWN_MASTER, file, reason=f"registry {registry.root} has no master")

    # Locate: masters whose carriers match best are tried first; the first that decodes claims the
    # file (two masters can be near-identical, e.g. the same weights registered twice).
    candidates = []
    for m in masters:
        carriers = [Carrier.from_dict(d) for d in m.config["carriers"]]
        arrays = master_arrays(m, [c.name for c in carriers])
        found = locate(tensors, arrays, carriers)
        score = sum(f.similarity for f in found if f is not None) / len(found)
        candidates.append((score, m, found, arrays))
    candidates = sorted((c for c in candidates if any(f is not None for f in c[2])), key=lambda c: -c[0])
    # Each master tried is one more chance of a false accusation: split the bound among them.
    share = max_false_positive / max(1, len(candidates))
    results = [
        _trace_master(m, found, arrays, registry, file, share, pending) for _, m, found, arrays in candidates
    ]
    for r in results:
        if r.verdict in (IDENTIFIED, COLLUDERS):
            r.false_positive_probability = min(1.0, r.false_positive_probability * len(candidates))
            for c in r.colluders:
                c["false_accusation_bound"] = min(1.0, c["false_accusation_bound"] * len(candidates))
            return r
    if results:
        return results[0]
    return TraceResult(NO_WATERMARK, file, reason="no registered master's carrier layers were found in this file")


def _trace_master(
    m: Master,
    found: list[Located | None],
    arrays: dict[str, np.ndarray],
    registry: Registry,
    file: str,
    max_false_positive: float,
    pending: list[Buyer],
) -> TraceResult:
    """Extract, decode and accuse against one master whose carriers were located in the file."""
    located = [f for f in found if f is not None]
    summary = [
        {"carrier": f.carrier.name, "found_as": f.source, "similarity": round(f.similarity, 4)} for f in located
    ]
    key = registry.key(m.name)
    soft = extract(found, arrays, key, m.config, load_moments(m))
    spec = codes.CodeSpec(**m.config["code"])
    missing = int(np.count_nonzero(np.isnan(soft)))
    result = TraceResult(NO_WATERMARK, file, master=m.name, bits=spec.bits, bits_missing=missing, carriers=summary)
    known = ~np.isnan(soft)
    if known.any() and float(np.nanmax(np.abs(soft))) < 1e-6:
        result.reason = "carrier weights equal the master's: this is the unmarked master"
        return result

    issued = {b.id: b for b in [*registry.buyers(m.name), *pending] if b.master == m.name}

    def check(data: bytes) -> int | None:
        buyer_id = codes.verify(key, m.name, data)
        return buyer_id if buyer_id in issued else None

    decoded = codes.decode(soft, spec, check, max(1, len(issued)), max_false_positive)
    ids = sorted(issued)
    words = codes.codewords(key, m.name, ids, spec)
    accused = accuse.accuse(soft, words, spec, max_false_positive)
    if decoded is not None and {ids[a.index] for a in accused} <= {decoded.buyer_id}:
        b = issued[decoded.buyer_id]
        result.verdict = IDENTIFIED
        result.buyer = {"id": b.id, "name": b.name}
        result.bit_errors = decoded.bit_errors
        result.symbol_errors = decoded.symbol_errors
        result.erasures = decoded.erasures
        result.false_positive_probability = decoded.false_positive_probability
        return result
    if decoded is None and not accused:
        result.reason = "no registered buyer's codeword decodes from the extracted bits or scores above the threshold"
        return result
    # Several buyers' marks, or one too weak to decode: accuse by score.
    result.verdict = COLLUDERS
    for a in accused:
        b = issued[ids[a.index]]
        result.colluders.append(
            {"id": b.id, "name": b.name, "score": round(a.score, 3), "false_accusation_bound": a.false_accusation_bound}
        )
    if decoded is not None and all(c["id"] != decoded.buyer_id for c in result.colluders):
        b = issued[decoded.buyer_id]
        z = float(accuse.scores(soft, words[ids.index(b.id)][None], spec)[0])
        bound = decoded.false_positive_probability
        result.colluders.append({"id": b.id, "name": b.name, "score": round(z, 3), "false_accusation_bound": bound})
    result.false_positive_probability = max(c["false_accusation_bound"] for c in result.colluders)
    result.reason = (
        f"{len(result.colluders)} buyers' codewords agree with the extracted bits: copies merged"
        if len(result.colluders) > 1
        else "one buyer's codeword agrees with the extracted bits, too weakly to decode"
    )
    return result


def trace(
    path: str | os.PathLike,
    registry: Registry,
    master: str | None = None,
    max_false_positive: float = DEFAULT_MAX_FALSE_POSITIVE,
) -> TraceResult:
    """Trace a leaked .safetensors / .onnx / checkpoint (file or folder) against the registry."""
    tensors = formats.open_tensors(path)  # read lazily: only tensors shaped like a carrier are loaded
    result = trace_tensors(tensors, registry, str(path), master, max_false_positive)
    buyer = result.buyer["id"] if result.buyer else None
    registry.log_trace(str(path), result.verdict, result.master, buyer, [c["id"] for c in result.colluders])
    return result
