"""`trace`: name the buyer behind a leak. load -> locate -> extract -> decode -> accuse -> report.

Each scheme a master was registered with locates its evidence in the leak and extracts soft bits
(`wmtrace.schemes`); the soft bits are combined and decoded against the master's buyers here.
Several masters may match: the best-located is tried first, and the bound is split among them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import formats, schemes
from ..coding import accuse, codebook, codes
from ..errors import BadArgument
from ..registry import Buyer, Master, Registry

IDENTIFIED = "identified"
COLLUDERS = "colluders"
NO_WATERMARK = "no watermark"
UNKNOWN_MASTER = "unknown master"
DEFAULT_MAX_FALSE_POSITIVE = 1e-6
class Issued:
    """The buyers a verdict may name: their IDs, read without a record per buyer (building 100,000 records
    took 1.2 of a 2.0 s trace, BENCHMARKS.md *Trace at registry scale*), and the records of those named.
    `pending` buyers (a copy's self-check before it is recorded) count as issued."""

    def __init__(self, registry: Registry, master: str, pending: Sequence[Buyer] = ()):
        self.registry, self.master = registry, master
        self.pending = {b.id: b for b in pending if b.master == master}
        ids = registry.issued_ids(master)
        self.ids = np.union1d(ids, list(self.pending)) if self.pending else ids

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, buyer_id: int | None) -> bool:
        if buyer_id is None:
            return False
        i = int(np.searchsorted(self.ids, buyer_id))
        return i < len(self.ids) and int(self.ids[i]) == buyer_id

    def __getitem__(self, buyer_id: int) -> Buyer:
        b = self.pending.get(buyer_id) or self.registry.buyer(self.master, buyer_id)
        if b is None:
            raise KeyError(buyer_id)
        return b

    def codewords(self, key: bytes, spec: codes.CodeSpec) -> np.ndarray:
        """Their codewords, in `ids` order, from the master's cached table (`coding.codebook`)."""
        return codebook.codewords(key, self.master, self.ids, spec,
                                  self.registry.cache_path(f"{self.master}.codebook"))


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
    queries: int | None = None  # answers read (`query` only)
    # The highest score of any issued buyer's codeword, and the score the bound asks for: how far a mark
    # too weak to accuse anyone is from being evidence (None where no bits were read).
    best_score: float | None = None
    score_threshold: float | None = None

    @property
    def exit_code(self) -> int:
        return {IDENTIFIED: 0, COLLUDERS: 0, NO_WATERMARK: 1}.get(self.verdict, 2)

    def to_dict(self) -> dict:
        return asdict(self)

    def union_over(self, chances: int) -> None:
        """Report the bounds for `chances` tries, each held to 1/chances of the budget (masters tried,
        rounds of a query session): the union bound, so the figure holds for the whole procedure."""
        if self.verdict in (IDENTIFIED, COLLUDERS):
            self.false_positive_probability = min(1.0, self.false_positive_probability * chances)
            for c in self.colluders:
                c["false_accusation_bound"] = min(1.0, c["false_accusation_bound"] * chances)


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
        raise BadArgument("max_false_positive", f"{max_false_positive}: use a probability between 0 and 1")
    masters = [registry.master(master)] if master else registry.masters()
    if not masters:
        return TraceResult(UNKNOWN_MASTER, file, reason=f"registry {registry.location} has no master")

    # Locate: masters whose carriers match best are tried first; the first that decodes claims the
    # file (two masters can be near-identical, e.g. the same weights registered twice).
    candidates = []
    for m in masters:
        located = {name: schemes.get(name).locate(tensors, m, cfg) for name, cfg in m.config.schemes.items()}
        located = {name: loc for name, loc in located.items() if loc is not None}
        if located:
            candidates.append((max(loc.score for loc in located.values()), m, located))
    candidates.sort(key=lambda c: -c[0])
    # Each master tried is one more chance of a false accusation: split the bound among them.
    share = max_false_positive / max(1, len(candidates))
    results = [
        _trace_master(m, located, registry, file, share, pending) for _, m, located in candidates
    ]
    for r in results:
        if r.verdict in (IDENTIFIED, COLLUDERS):
            r.union_over(len(candidates))
            return r
    if results:
        return results[0]
    return TraceResult(NO_WATERMARK, file, reason="no registered master's carrier layers were found in this file")


def _trace_master(
    m: Master,
    located: dict[str, schemes.Located],
    registry: Registry,
    file: str,
    max_false_positive: float,
    pending: list[Buyer],
) -> TraceResult:
    """Extract every located scheme's soft bits, combine them, then decode and accuse for one master."""
    key = registry.key(m.name)
    spec = m.config.code
    stored = registry.stored(m)
    soft = accuse.combine([
        schemes.get(name).extract(loc, m, m.config.schemes[name], key, spec.bits, stored)
        for name, loc in located.items()
    ])
    summary = [row for loc in located.values() for row in loc.report]
    missing = int(np.count_nonzero(np.isnan(soft)))
    result = TraceResult(NO_WATERMARK, file, master=m.name, bits=spec.bits, bits_missing=missing, carriers=summary)
    known = ~np.isnan(soft)
    if known.any() and float(np.nanmax(np.abs(soft))) < 1e-6:
        result.reason = "carrier weights equal the master's: this is the unmarked master"
        return result
    _verdict(result, soft, key, m.name, spec, Issued(registry, m.name, pending), max_false_positive)
    return result


def _verdict(result: TraceResult, soft: np.ndarray, key: bytes, master: str, spec: codes.CodeSpec,
             issued: Issued, max_false_positive: float) -> None:
    """Decode, then accuse by score: one buyer by decoding alone is `identified`; anything else that
    clears the bound is `colluders`; nothing is `no watermark`."""

    def check(data: bytes) -> int | None:
        buyer_id = codes.verify(key, master, data)
        return buyer_id if buyer_id in issued else None

    decoded = codes.decode(soft, spec, check, max(1, len(issued)), max_false_positive)
    ids = [int(i) for i in issued.ids]
    words = issued.codewords(key, spec)
    z = accuse.scores(soft, words, spec)
    accused = accuse.accuse_scores(z, max_false_positive)
    result.best_score = round(float(z.max()), 3) if len(z) else None
    result.score_threshold = round(accuse.threshold(len(ids), max_false_positive), 3)
    if decoded is not None and {ids[a.index] for a in accused} <= {decoded.buyer_id}:
        b = issued[decoded.buyer_id]
        result.verdict = IDENTIFIED
        result.buyer = {"id": b.id, "name": b.name}
        result.bit_errors = decoded.bit_errors
        result.symbol_errors = decoded.symbol_errors
        result.erasures = decoded.erasures
        result.false_positive_probability = decoded.false_positive_probability
        return
    if decoded is None and not accused:
        result.reason = _too_weak(result, soft, words[int(np.argmax(z))] if len(z) else None)
        return
    # Several buyers' marks, or one too weak to decode: accuse by score.
    result.verdict = COLLUDERS
    for a in accused:
        b = issued[ids[a.index]]
        result.colluders.append(
            {"id": b.id, "name": b.name, "score": round(a.score, 3), "false_accusation_bound": a.false_accusation_bound}
        )
    if decoded is not None and all(c["id"] != decoded.buyer_id for c in result.colluders):
        b = issued[decoded.buyer_id]
        bound = decoded.false_positive_probability
        result.colluders.append({"id": b.id, "name": b.name, "score": round(float(z[ids.index(b.id)]), 3),
                                 "false_accusation_bound": bound})
    result.false_positive_probability = max(c["false_accusation_bound"] for c in result.colluders)
    result.reason = (
        f"{len(result.colluders)} buyers' codewords agree with the extracted bits: copies merged"
        if len(result.colluders) > 1
        else "one buyer's codeword agrees with the extracted bits, too weakly to decode"
    )


def _too_weak(result: TraceResult, soft: np.ndarray, nearest: np.ndarray | None) -> str:
    """Why nobody is named although bits were read: the evidence is there but too weak, and how weak
    (the best-scoring codeword's disagreements and score; its buyer is not named: that is no evidence)."""
    known = ~np.isnan(soft)
    where = _where(result.carriers)
    if nearest is None or result.best_score is None:
        return f"{where}, but no buyer is registered to compare the {int(known.sum())} bits read with"
    bits = np.unpackbits(nearest.astype(np.uint8))
    errors = int(np.count_nonzero((soft[known] > 0) != bits[known].astype(bool)))
    return (f"{where}, but no buyer's mark is strong enough to name anyone: the nearest codeword differs in "
            f"{errors} of the {int(known.sum())} bits read (decoding corrects far fewer), and its score is "
            f"{result.best_score:.2f} where the bound needs {result.score_threshold:.2f}")


def _where(carriers: list[dict]) -> str:
    by_name = [c for c in carriers if c.get("found_by") == "name"]
    if not carriers:  # `query`: answers, no weights
        return "the answers were read"
    if not by_name:
        return "the master's carriers are present"
    sims = [c["similarity"] for c in by_name]
    return (f"the master's carriers are present by name and shape ({len(by_name)} of {len(carriers)}; their "
            f"filters' similarity to the master {min(sims):.2f}-{max(sims):.2f}: retrained, or another "
            "model of the same architecture)")


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
    if result.master is not None and (revoked := registry.revocations(result.master)):
        for named in ([result.buyer] if result.buyer else []) + result.colluders:
            if named["id"] in revoked:
                named["revoked"] = revoked[named["id"]]  # still accountable for the copy they were sold
    return result
