"""`query`: name the buyer behind a model from its answers alone. plan -> query -> read -> decode -> accuse.

For each master registered with the black-box scheme, the scheme plans its queries (boundary queries
first, then natural ones); they are sent in rounds and a verdict is tried after each round ("looks"
at 64, 128, 256, ... answers), stopping at the first that names someone. Every look is one more
chance of a false accusation, so the bound is split evenly over the looks planned (and over the
masters tried) before the first query is sent: the bound reported holds for the whole session.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .. import modelio, schemes
from ..errors import BadArgument, TargetFailed
from ..registry import Buyer, Master, Registry
from ..schemes import blackbox
from ..targets import Answers, Target
from .trace import COLLUDERS, DEFAULT_MAX_FALSE_POSITIVE, IDENTIFIED, NO_WATERMARK, UNKNOWN_MASTER, Issued, TraceResult
from .trace import _verdict as verdict

FIRST_LOOK = 64
# (answers received, answers planned) -> None
QueryProgress = Callable[[int, int], None]


def looks(planned: int, boundary: int, reveal: str, budget: int | None) -> list[int]:
    """The answer counts after which a verdict is tried: 64, 128, 256, ... up to what the budget and
    the reveal allow (labels and top-k read boundary queries only; full scores read natural ones too)."""
    limit = planned if reveal == "scores" else min(planned, boundary)
    if budget is not None:
        limit = min(limit, budget)
    points, n = [], FIRST_LOOK
    while n < limit:
        points.append(n)
        n *= 2
    return points + [limit] if limit > 0 else []


def query(
    target: Target,
    reg: Registry,
    master: str | None = None,
    max_false_positive: float = DEFAULT_MAX_FALSE_POSITIVE,
    budget: int | None = None,
    progress: QueryProgress | None = None,
) -> TraceResult:
    """Query `target` (`wmtrace.targets.open_target`) with each black-box master's plan; the same
    verdicts, bounds and exit codes as `trace`. `budget` caps the queries sent per master. One audit
    entry records the session."""
    result = query_target(target, reg, master, max_false_positive, budget, progress)
    buyer = result.buyer["id"] if result.buyer else None
    reg.log_query(target.name, target.reveal, target.queries, result.verdict, result.master, buyer,
                  [c["id"] for c in result.colluders])
    return result


def query_target(
    target: Target,
    reg: Registry,
    master: str | None = None,
    max_false_positive: float = DEFAULT_MAX_FALSE_POSITIVE,
    budget: int | None = None,
    progress: QueryProgress | None = None,
    pending: Sequence[Buyer] = (),
) -> TraceResult:
    """`query` without the audit entry; `pending` buyers count as issued (for self-checks)."""
    if not 0.0 < max_false_positive < 1.0:
        raise BadArgument("max_false_positive", f"{max_false_positive}: use a probability between 0 and 1")
    if budget is not None and budget < 1:
        raise BadArgument("budget", "must be at least 1")
    masters = [reg.master(master)] if master else reg.masters()
    masters = [m for m in masters if blackbox.NAME in m.config.schemes]
    if not masters:
        result = TraceResult(UNKNOWN_MASTER, target.name, reason="no registered master carries a black-box mark")
    else:
        share = max_false_positive / len(masters)
        result = None
        for m in masters:
            r = _query_master(target, reg, m, share, budget, progress, pending)
            if r.verdict in (IDENTIFIED, COLLUDERS):
                r.union_over(len(masters))
                result = r
                break
            result = result or r
    return result


def _query_master(target: Target, reg: Registry, m: Master, max_fp: float, budget: int | None,
                  progress: QueryProgress | None, pending: Sequence[Buyer]) -> TraceResult:
    key = reg.key(m.name)
    model, _ = modelio.build(m)
    scheme = schemes.get(blackbox.NAME)
    plan = scheme.plan(model, m.config.schemes[blackbox.NAME], key, reg.stored(m), natural=target.reveal == "scores")
    points = looks(len(plan.inputs), plan.reference.boundary, target.reveal, budget)
    share = max_fp / max(1, len(points))
    spec = m.config.code
    issued = Issued(reg, m.name, pending)
    parts: list[Answers] = []
    sent = 0
    result = TraceResult(NO_WATERMARK, target.name, master=m.name, bits=spec.bits, bits_missing=spec.bits)
    accused: TraceResult | None = None  # the latest look that accused by score: kept if none decodes later
    classes = plan.reference.logp.shape[1]
    for n in points:
        parts.append(_checked(target.answer(plan.inputs[sent:n]), n - sent, classes, target))
        sent = n
        if progress is not None:
            progress(sent, points[-1])
        soft = plan.read(Answers.concat(parts), target.reveal)
        result = TraceResult(NO_WATERMARK, target.name, master=m.name, bits=spec.bits,
                             bits_missing=int(np.count_nonzero(np.isnan(soft))))
        known = ~np.isnan(soft)
        if known.any() and float(np.nanmax(np.abs(soft))) < 1e-6:
            result.reason = "the answers equal the master's: this is the unmarked master"
            break
        verdict(result, soft, key, m.name, spec, issued, share)
        result.union_over(len(points))
        if result.verdict == IDENTIFIED:
            break
        if result.verdict == COLLUDERS:  # more answers may decode, or show more colluders
            accused = result
    result = accused if result.verdict != IDENTIFIED and accused is not None else result
    result.queries = sent
    return _named_by_score(result)


def _named_by_score(r: TraceResult) -> TraceResult:
    """One buyer accused by score and none other: that buyer is named, with the score's bound. (Decoding
    needs every symbol it cannot erase right; a session that reads few bits can still name by score.)"""
    if r.verdict == COLLUDERS and len(r.colluders) == 1:
        c = r.colluders[0]
        r.verdict, r.buyer, r.colluders = IDENTIFIED, {"id": c["id"], "name": c["name"]}, []
        r.false_positive_probability = c["false_accusation_bound"]
        r.reason = f"named by score ({c['score']:.2f}); the answers read did not decode"
    return r


def _checked(a: Answers, n: int, classes: int, target: Target) -> Answers:
    """The answers, or TargetFailed: as many as asked, over the master's classes (a top-k answer may
    name fewer; it is widened with NaN). Nothing is concluded from a target that answers otherwise."""
    if target.reveal == "embedding" or (a.labels is None and a.logp is None):
        raise TargetFailed(f"{target.name}: answers embeddings, but the black-box mark is read from a "
                           "classifier's labels or scores (--reveal scores, topk or top1)")
    if len(a) != n:
        raise TargetFailed(f"{target.name}: {len(a)} answers to {n} queries")
    if a.labels is not None and ((a.labels < 0) | (a.labels >= classes)).any():
        raise TargetFailed(f"{target.name}: a label outside the master's {classes} classes")
    if a.logp is not None:
        width = a.logp.shape[1]
        if width > classes or (width < classes and target.reveal != "topk"):
            raise TargetFailed(f"{target.name}: scores over {width} classes; the master has {classes}")
        if width < classes:
            a.logp = np.concatenate([a.logp, np.full((len(a.logp), classes - width), np.nan)], axis=1)
    return a
