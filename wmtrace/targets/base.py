"""What a black-box target is: something that answers inputs, whose weights are never read.

A target is an HTTP endpoint (Open Inference Protocol v2 for classifiers, OpenAI-compatible
`/v1/embeddings` for encoders) or a local file run as a black box (onnxruntime or torch). The
black-box scheme sends it queries and reads its `Answers`; what the target reveals decides what can
be read:

    scores   every class's score (probabilities or logits): `logp` is complete
    topk     the k best classes with their (possibly rounded) probabilities: `logp` NaN elsewhere
    top1     the predicted label only: `logp` is None
    embedding  one vector per input (encoders): `embeddings`
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

REVEALS = ("scores", "topk", "top1", "embedding")

# What a query is: a float32 array (n, ...) in the model's input space for tensor models, or texts.
Queries = np.ndarray | Sequence[str]


@dataclass
class Answers:
    """A target's answers to n queries, in the order asked."""

    labels: np.ndarray | None = None  # (n,) int64 top-1 class; classifiers
    logp: np.ndarray | None = None  # (n, classes) float64 log-probabilities, NaN where not revealed
    embeddings: np.ndarray | None = None  # (n, dim) float64; encoders

    @staticmethod
    def concat(parts: list[Answers]) -> Answers:
        """One `Answers` from the answers to consecutive batches, in order; top-k widths (which can differ
        between batches) padded with NaN to the widest."""

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            if not arrays or any(a is None for a in arrays):
                return None
            if name == "logp":
                width = max(a.shape[1] for a in arrays)
                arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=np.nan) for a in arrays]
            return np.concatenate(arrays)

        return Answers(labels=cat("labels"), logp=cat("logp"), embeddings=cat("embeddings"))

    def __len__(self) -> int:
        for a in (self.labels, self.logp, self.embeddings):
            if a is not None:
                return len(a)
        return 0


class Target(Protocol):
    """A model answering queries. `name` is what reports and the audit log show (a URL without
    credentials, or a path); `reveal` is one of `REVEALS`; `queries` counts inputs sent so far."""

    name: str
    reveal: str
    queries: int

    def answer(self, inputs: Queries) -> Answers:
        """Answers to `inputs`; raises `errors.TargetFailed` on failure or nonsense."""
        ...

    def close(self) -> None: ...


# Shared by HTTP and local targets, so both turn what a model reveals into the same `Answers`.


class Closing:
    """`with open_target(...) as t:` closes the target (its connections, its threads) on the way out."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # type: ignore[attr-defined]


def finite(a: np.ndarray, what: str, name: str) -> np.ndarray:
    """`a` unchanged, or `TargetFailed`: NaN or inf in an answer is a broken or lying model, and
    nothing may be concluded from it."""
    from ..errors import TargetFailed

    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise TargetFailed(f"{name}: {what} holds NaN or inf")
    return a


def check_labels(labels: np.ndarray, classes: int | None, what: str, name: str) -> np.ndarray:
    """Class indices as int64, each in [0, classes): a label outside is not an answer."""
    from ..errors import TargetFailed

    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TargetFailed(f"{name}: {what} are not integers ({labels.dtype})")
    bad = (labels < 0) | (labels >= classes if classes is not None else False)
    if bad.any():
        bound = f" (classes: {classes})" if classes is not None else ""
        raise TargetFailed(f"{name}: {what} out of range: {int(labels[bad].flat[0])}{bound}")
    return labels.astype(np.int64)


def scores_answers(scores: np.ndarray, name: str) -> Answers:
    """Every class's score: probabilities if each row lies in [0, 1] and sums to 1 (within 1e-3),
    else logits. Either way `logp` are log-probabilities; a probability of exactly 0 (rounded away
    by the server) is NaN, unknown, as in top-k answers."""
    s = finite(np.asarray(scores, dtype=np.float64), "scores", name)
    if s.ndim != 2 or s.shape[1] < 2:
        from ..errors import TargetFailed

        raise TargetFailed(f"{name}: scores of shape {list(s.shape)}, expected [n, classes]")
    probs = len(s) > 0 and bool(((s >= 0) & (s <= 1)).all() and (np.abs(s.sum(1) - 1) <= 1e-3).all())
    if probs:
        with np.errstate(divide="ignore"):
            logp = np.where(s > 0, np.log(np.where(s > 0, s, 1.0)), np.nan)
    else:
        shifted = s - s.max(1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return Answers(labels=s.argmax(1).astype(np.int64), logp=logp)


def topk_answers(indices: np.ndarray, probs: np.ndarray, classes: int | None, name: str) -> Answers:
    """The k best classes and their (possibly rounded) probabilities. `logp` is NaN except at those
    classes; a probability rounded to 0 stays NaN. Its width is `classes`, or, unknown, one past the
    largest index seen. The label is the index given the highest probability (the first on ties)."""
    from ..errors import TargetFailed

    probs = finite(np.asarray(probs, dtype=np.float64), "top-k scores", name)
    indices = np.asarray(indices)
    if indices.ndim != 2 or probs.shape != indices.shape:
        raise TargetFailed(f"{name}: top-k indices {list(indices.shape)} and scores {list(probs.shape)} "
                           "do not match as [n, k]")
    indices = check_labels(indices, classes, "top-k indices", name)
    if ((probs < 0) | (probs > 1 + 1e-6)).any():
        raise TargetFailed(f"{name}: top-k scores are not probabilities (outside [0, 1])")
    if indices.shape[1] > 1 and (np.diff(np.sort(indices, 1), axis=1) == 0).any():
        raise TargetFailed(f"{name}: a class appears twice in one top-k answer")
    n, k = indices.shape
    width = classes if classes is not None else (int(indices.max()) + 1 if indices.size else k)
    logp = np.full((n, width), np.nan)
    with np.errstate(divide="ignore"):
        logp[np.arange(n)[:, None], indices] = np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0)), np.nan)
    labels = indices[np.arange(n), probs.argmax(1)] if k else np.zeros(n, np.int64)
    return Answers(labels=labels, logp=logp)


def simulate(logits: np.ndarray, reveal: str, k: int, decimals: int | None, name: str) -> Answers:
    """What a server revealing `reveal` would answer, from a model's full outputs: how local files
    stand in for deployed endpoints (and how tests predict what a server must return)."""
    out = finite(np.asarray(logits, dtype=np.float64), "model outputs", name)
    if reveal == "embedding":
        return Answers(embeddings=out.reshape(len(out), -1))
    full = scores_answers(out, name)
    if reveal == "scores":
        return full
    if reveal == "top1":
        return Answers(labels=full.labels)
    p = np.exp(full.logp)
    order = np.argsort(-p, axis=1, kind="stable")[:, : min(k, p.shape[1])]
    top = np.take_along_axis(p, order, 1)
    if decimals is not None:
        top = np.round(top, decimals)
    return topk_answers(order, top, p.shape[1], name)
