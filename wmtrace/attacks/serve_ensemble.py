"""Collusion through the API: the server answers with the average of several copies' softmax outputs.

Buyers who pool their copies need not merge weights (`collude`): a server can run every copy on
each query and answer with the mean of their probabilities. On a boundary query the copies disagree
where their codewords do, so the averaged answer there follows whichever copy is more confident,
and the label read is a mix of the colluders' bits: what the tracer must then do is accuse
colluders by score, or nobody, and never an innocent buyer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .serving import Predict, ServingAttack, softmax


def ensemble(predicts: Sequence[Predict]) -> Predict:
    """One predict answering log(mean of the copies' softmax outputs): log-probabilities, so a server
    revealing scores shows the averaged probabilities exactly."""
    predicts = list(predicts)

    def predict(x: np.ndarray) -> np.ndarray:
        p = np.mean([softmax(f(x)) for f in predicts], axis=0)
        with np.errstate(divide="ignore"):
            return np.log(np.maximum(p, np.finfo(np.float64).tiny)).astype(np.float32)

    return predict


SERVING = ServingAttack(
    name="ensemble",
    summary="Answer with the mean of several copies' softmax outputs (collusion through the API).",
    params=(),
    wrap=lambda predicts, data: ensemble(predicts),
    merges=True,
)
