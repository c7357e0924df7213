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
