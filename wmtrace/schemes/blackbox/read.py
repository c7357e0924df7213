"""Soft bits from a target's answers, by what it reveals.

  top1    query i answered b_i reads +1, a_i reads -1, anything else is missing (NaN)
  topk    query i reads (logp_b - logp_a) / margin when both classes are shown
  scores  least squares over every answered query, boundary and natural: the copy's centred
          log-probabilities minus the master's are L(x) s (`edit.Basis.linear`), so s is read from
          all classes of all answers at once; a surrogate distilled from a copy carries the tilt part
          of L on natural inputs, which is why the query plan ends with natural queries.

Each reading is unmasked with the keyed signs, so for a model that carries no mark of this master
every sign is a fair coin whatever the model answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...targets import Answers
from .edit import Basis


@dataclass
class Reference:
    """The master at every planned query, computed once per query session."""

    basis: Basis
    order: np.ndarray  # query slot -> codeword bit, for the boundary queries
    logp: torch.Tensor  # (n, C) master's log-probabilities at every planned query
    linear: torch.Tensor  # (n, C, K) L(x) at every planned query (centred over classes)
    boundary: int  # the first `boundary` planned queries are boundary queries, in `order`


def soft_bits(ref: Reference, answers: Answers, reveal: str) -> np.ndarray:
    """One soft value per codeword bit (NaN where nothing was read) from answers to the first
    `len(answers)` planned queries."""
    n = len(answers)
    k = ref.basis.bits
    if reveal == "scores" and answers.logp is not None and not np.isnan(answers.logp).any():
        s = _least_squares(ref, torch.from_numpy(answers.logp[:n]).double())
        return (s * ref.basis.mask).numpy()
    per_query = np.full(min(n, ref.boundary), np.nan)
    slots = np.arange(len(per_query))
    pairs = ref.basis.pairs.numpy()[ref.order[slots]]
    if answers.logp is not None:  # top-k (or scores with gaps): the pair's margin where both are shown
        lp = answers.logp[slots]
        per_query = (lp[slots, pairs[:, 1]] - lp[slots, pairs[:, 0]]) / ref.basis.margin
    elif answers.labels is not None:
        labels = answers.labels[slots]
        per_query = np.where(labels == pairs[:, 1], 1.0, np.where(labels == pairs[:, 0], -1.0, np.nan))
    soft = np.full(k, np.nan)
    soft[ref.order[slots]] = per_query
    return soft * ref.basis.mask.numpy()


# Fit a class-to-class map of the master's own answers beside s (`_least_squares`)? Off: on students
# distilled from soft answers it lowered the buyer's score (by up to 0.86) in 41 of 49 sessions, and
# raised it only where it stayed below the threshold anyway (BENCHMARKS.md, black-box distillation).
NUISANCE = False


def _least_squares(ref: Reference, logp: torch.Tensor, nuisance: bool | None = None) -> torch.Tensor:
    """s minimising || centred(logp - master logp) - L s - B centred(master logp) || over the answered
    queries, B a free C x C map (with `nuisance`, else B = 0). B would absorb what a surrogate gets
    systematically wrong about the master's function (a student's answers are a shrunk or sharpened
    copy of its teacher's); measured, it cost more than it gained (`NUISANCE`). A small ridge lets a
    short session (fewer equations than unknowns) still give its best estimate."""
    nuisance = NUISANCE if nuisance is None else nuisance
    n, k = len(logp), ref.basis.bits
    dz = logp - ref.logp[:n]
    dz = dz - dz.mean(1, keepdim=True)
    cols = [ref.linear[:n].reshape(-1, k)]
    if nuisance:
        base = ref.logp[:n] - ref.logp[:n].mean(1, keepdim=True)  # (n, C)
        c = base.shape[1]
        eye = torch.eye(c, dtype=torch.float64)
        b = torch.einsum("ci,nj->ncij", eye, base).reshape(n, c, c * c)
        cols.append((b - b.mean(1, keepdim=True)).reshape(-1, c * c))
    lin = torch.cat(cols, 1)
    lhs = lin.T @ lin
    ridge = 1e-6 * float(lhs.diagonal().mean()) + 1e-12
    sol = torch.linalg.solve(lhs + ridge * torch.eye(len(lhs), dtype=torch.float64), lin.T @ dz.reshape(-1))
    return sol[:k]
