"""How close a buyer copy behaves to its master: accuracy and top-1 agreement on held-out data."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predictions(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Top-1 classes in eval mode (BatchNorm uses running stats), batched to bound memory."""
    model.eval()
    return torch.cat([model(inputs[i : i + batch_size]).argmax(1) for i in range(0, len(inputs), batch_size)])


def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy against the labels."""
    return float((predictions(model, inputs, batch_size) == labels).float().mean())


def agreement(model_a: nn.Module, model_b: nn.Module, inputs: torch.Tensor, batch_size: int = 1000) -> float:
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
