"""How close a buyer copy behaves to its master on held-out data: for classifiers accuracy and top-1
agreement, for encoders the cosine similarity of embeddings and nearest-neighbour retrieval agreement,
for language models (`output="tokens"`) next-token top-1 agreement and perplexity."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import batches


@torch.no_grad()
def outputs(model: nn.Module, inputs: batches.Inputs, batch_size: int | None = None) -> torch.Tensor:
    """The model's outputs in eval mode (BatchNorm uses running stats), batched to bound memory."""
    model.eval()
    n = batches.size(inputs)
    batch_size = batch_size or batches.rows(batches.take(inputs, 0))
    return torch.cat([batches.call(model, batches.take(inputs, slice(i, i + batch_size))).float()
                      for i in range(0, n, batch_size)])


def next_tokens(logits: torch.Tensor, x: batches.Inputs) -> torch.Tensor:
    """What a language model's fidelity needs of a batch's logits (batch x positions x vocabulary):
    at every real position that has a next token, the predicted token and the log-probability of the
    text's actual next token (positions x 2). Keeping the logits would cost 49,152 floats a position."""
    ids, mask = x["input_ids"], x.get("attention_mask")
    logp = logits[:, :-1].float().log_softmax(-1)
    keep = mask[:, 1:].bool() if mask is not None else torch.ones_like(ids[:, 1:], dtype=torch.bool)
    pair = torch.stack([logp.argmax(-1).to(logp.dtype), logp.gather(-1, ids[:, 1:, None]).squeeze(-1)], -1)
    return pair[keep]


def token_fidelity(ours: torch.Tensor, master: torch.Tensor) -> tuple[float, float]:
    """(next-token top-1 agreement, the copy's perplexity over the master's) from `next_tokens` rows."""
    agreement = float((ours[:, 0] == master[:, 0]).float().mean())
    return agreement, float(torch.exp(master[:, 1].mean() - ours[:, 1].mean()))


@torch.no_grad()
def stream_outputs(model: nn.Module, data: Iterable[tuple[batches.Inputs, torch.Tensor | None]],
                   output: str = "logits") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Outputs (and labels, None without) over batches streamed from a data set (`modelio.stream`):
    only the outputs are kept, never the inputs; a language model's reduced by `next_tokens`."""
    model.eval()
    outs, labels = [], []
    for x, y in data:
        out = batches.call(model, x)
        outs.append(next_tokens(out, x) if output == "tokens" else out.float())
        if y is not None:
            labels.append(y)
    if not outs:
        raise ValueError("no data")
    return torch.cat(outs), (torch.cat(labels) if labels else None)


def predictions(model: nn.Module, inputs: batches.Inputs, batch_size: int | None = None) -> torch.Tensor:
    """Top-1 classes."""
    return outputs(model, inputs, batch_size).argmax(1)


def nearest(embeddings: torch.Tensor) -> torch.Tensor:
    """Each item's nearest other item by cosine similarity: retrieval over the held-out set (an output
    image is one vector of its pixels)."""
    e = F.normalize(embeddings.float().flatten(1), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def embedding_fidelity(ours: torch.Tensor, master: torch.Tensor) -> tuple[float, float]:
    """(mean cosine similarity to the master's embeddings, top-1 retrieval agreement with the master)."""
    cosine = float(F.cosine_similarity(ours.float().flatten(1), master.float().flatten(1), dim=-1).mean())
    return cosine, float((nearest(ours) == nearest(master)).float().mean())


def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None) -> float:
    """Top-1 accuracy against the labels."""
    return float((predictions(model, inputs, batch_size) == labels).float().mean())


def agreement(model_a: nn.Module, model_b: nn.Module, inputs: torch.Tensor, batch_size: int | None = None) -> float:
    """Fraction of inputs on which both models predict the same class."""
    a, b = predictions(model_a, inputs, batch_size), predictions(model_b, inputs, batch_size)
    return float((a == b).float().mean())


def onnx_agreement(path: str, model: nn.Module, inputs: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 agreement between an ONNX file run by onnxruntime and a torch model: the exported
    file must behave like the model it came from."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ours = np.concatenate(
        [session.run(None, {name: inputs[i : i + batch_size].numpy()})[0].argmax(1)
         for i in range(0, len(inputs), batch_size)]
    )
    return float((torch.from_numpy(ours) == predictions(model, inputs, batch_size)).float().mean())
