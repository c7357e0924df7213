"""Answers reduced to the top-1 label: the server returns only the class, never a score.

This is nothing but the reveal mode "top1" (`wmtrace.targets.REVEALS`) imposed by the leaker: the
model is unchanged and the server drops the scores. The declaration exists so benchmarks and the
test server apply it like any other serving attack; it maps to `reveal="top1"` and its predict is
the copy's own. The black-box mark is made to be read from labels alone (`schemes/blackbox/read.py`),
so this attack is expected to cost the tracer only the natural queries, which labels do not read.
"""

from __future__ import annotations

from .serving import ServingAttack

SERVING = ServingAttack(
    name="top1",
    summary="Answer with the top-1 label only (the reveal mode top1; the model is unchanged).",
    params=(),
    wrap=lambda predict, data: predict,
    reveal="top1",
)
