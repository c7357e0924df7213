"""What a user's data set yields and how their model takes it.

The contract for `--data module:function`: `function(split)` returns a torch Dataset whose items are
an input tensor, `(input, label)`, or a dict of tensors (keyword arguments of the model's forward,
as Hugging Face tokenizers produce them; a `labels` entry is the label). Labels are optional:
unlabeled data is enough, since issuing distils from the master's own outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

Inputs = torch.Tensor | dict[str, torch.Tensor]
LABEL_KEYS = ("labels", "label")
# A batch holds at most this many input values (8 MB of float32): 1000 Fashion-MNIST images but 13
# crops at 224 x 224, since activations grow with the input: a forward pass of 64 such crops through
# EfficientNet-Lite0 alone peaked at 1.4 GB of memory (BENCHMARKS.md, *1000-class copies*).
BATCH_VALUES = 1 << 21
MAX_ROWS = 1000


def rows(sample: Inputs) -> int:
    """How many samples like `sample` (one item, no batch dimension) go in one batch."""
    values = sum(v.numel() for v in sample.values()) if isinstance(sample, Mapping) else sample.numel()
    return max(1, min(MAX_ROWS, BATCH_VALUES // max(1, values)))


def split(batch) -> tuple[Inputs, torch.Tensor | None]:
    """(inputs, labels or None) from what a DataLoader yields."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        return inputs, labels
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def size(inputs: Inputs) -> int:
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


def take(inputs: Inputs, index: slice | torch.Tensor) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def chunks(inputs: Inputs) -> Iterator[Inputs]:
    """Inputs held in memory, in batches of `rows`."""
    n = size(inputs)
    step = rows(take(inputs, 0)) if n else 1
    for i in range(0, n, step):
        yield take(inputs, slice(i, i + step))


def concat(parts: list[Inputs]) -> Inputs:
    if parts and isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def call(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The model's output tensor (logits or embeddings) for a batch of inputs."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "sentence_embedding", "pooler_output", "last_hidden_state"):  # HF output objects
        value = getattr(out, name, None)
        if value is None and isinstance(out, Mapping):
            value = out.get(name)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}, not a tensor of logits or embeddings")


def token_mask(inputs: Inputs) -> torch.Tensor | None:
    """Which positions are real tokens (padding carries no signal the model uses)."""
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        return inputs["attention_mask"].bool()
    return None
