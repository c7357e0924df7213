"""Attacks through the endpoint: what a leaker's server does with queries and answers, not with weights.

A leaker who deploys a copy behind an API need not change its weights to blur a black-box mark: the
server can transform each input before the model sees it (resize, JPEG), answer less (labels only),
answer with several copies at once (collusion through the API), or refuse to answer queries that
look unusual. A serving attack family is one module of this package named `serve_NAME.py` that
declares

    SERVING = ServingAttack(name, summary, params, wrap, ...)

beside (never instead of) a weight attack's `ATTACK`; `catalog.SERVING_ATTACKS` finds it the same
way. `wrap(predict, data, **params)` returns a new `Predict`: a function from a float32 batch
(n, ...) in the model's input space to (n, classes) float logits (log-probabilities are logits: the
server turns them into probabilities, top-k or labels as it reveals). `predict` is a list of
predicts when the family `merges` (several copies served as one), and `data` is the attacker's own
natural inputs (a float32 array) when the family `needs_data`, else None. Parameters are declared
with `base.Param` and checked by `files.check`, exactly as a weight attack's.

By name, through the package: `attacks.serve(name, predicts, data, **params)` checks the parameters
against the declaration and wraps; `attacks.served(files, factory, name, params, data)` builds what a
leaker's server runs from files (each copy loaded by `file_predict`) and the reveal it forces. They
live in the package's `__init__` because they need the catalog, which imports this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import formats
from ..errors import BadInput
from ..modelio import import_object, load_into
from .base import Param

# (n, ...) float32 inputs -> (n, classes) float logits
Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ServingAttack:
    """A serving attack family's declaration: its parameters written once, and how it wraps a predict.

    `merges`: it serves several copies as one (`wrap` takes a list of predicts); `needs_data`: it
    calibrates on the attacker's own natural inputs; `reveal`: the reveal it forces on the server
    (None: the server's own).
    """

    name: str
    summary: str
    params: tuple[Param, ...]
    wrap: Callable[..., Predict]
    merges: bool = False
    needs_data: bool = False
    reveal: str | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def torch_predict(model: torch.nn.Module, batch: int = 512) -> Predict:
    """A torch module as a `Predict` (eval mode, no gradients, in batches)."""
    model = model.eval()

    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = [model(torch.from_numpy(x[i : i + batch])).float().numpy() for i in range(0, len(x), batch)]
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    return predict


def file_predict(path: str | os.PathLike, factory: str | None = None) -> Predict:
    """A copy on disk as a `Predict`: an `.onnx` file in onnxruntime, any other weight file (int8 +
    scale included) read by `formats.load_tensors` into the module `factory` builds."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: np.asarray(session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0])
    if not factory:
        raise BadInput(f"{path}: a factory (module:function) is needed to run it")
    model = import_object(factory)()
    state = {k: torch.from_numpy(np.array(v)) for k, v in formats.load_tensors(path).items()}
    load_into(model, state, f"{path}: weights do not fit {factory}")
    return torch_predict(model)


def apply(attack: ServingAttack, predicts: Sequence[Predict], data: np.ndarray | None,
          values: dict[str, Any]) -> Predict:
    """`predicts` wrapped by `attack` with its checked parameter `values` (`files.check`); a merging
    attack takes every predict, any other exactly one. `attacks.serve` is the entry point by name."""
    predicts = list(predicts)
    if attack.merges and len(predicts) < 2:
        raise BadInput(f"{attack.name} serves at least two copies")
    if not attack.merges and len(predicts) != 1:
        raise BadInput(f"{attack.name} serves one copy, not {len(predicts)}")
    if attack.needs_data and data is None:
        raise BadInput(f"{attack.name} needs the attacker's natural inputs to calibrate on")
    return attack.wrap(predicts if attack.merges else predicts[0], data, **values)
