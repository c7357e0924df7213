"""Models the test servers serve, importable in the server's own process: each factory takes JSON
arguments and returns `(predict, inputs, outputs)`, where `predict` maps a numpy batch to named numpy
outputs and `inputs` / `outputs` are the OIP metadata the server declares.

    onnx_classifier   an ONNX file as it is
    buyer_classifier  a buyer's copy (safetensors + factory, or ONNX), or several, behind any serving
                      attack (`wmtrace.attacks.SERVING_ATTACKS`) (preprocess, top1, ensemble, screen)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Served = tuple[Callable[[np.ndarray], dict[str, np.ndarray]], list[dict], list[dict]]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _reveal(logits: np.ndarray, reveal: str, k: int, decimals: int | None) -> dict[str, np.ndarray]:
    """What a server revealing `reveal` answers for these logits (log-probabilities are logits)."""
    if reveal == "logits":
        return {"logits": logits.astype(np.float32)}
    p = _softmax(logits.astype(np.float64))
    if reveal == "scores":
        return {"scores": p.astype(np.float32)}
    if reveal == "top1":
        return {"label": p.argmax(1).astype(np.int64)}
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(p, order, 1)
    if decimals is not None:
        top = np.round(top, decimals)
    return {"topk_indices": order.astype(np.int64), "topk_scores": top.astype(np.float32)}


def _metadata(reveal: str, k: int, input_name: str, classes: int = 10) -> tuple[list[dict], list[dict]]:
    outputs = {"logits": [("logits", "FP32", [-1, classes])], "scores": [("scores", "FP32", [-1, classes])],
               "top1": [("label", "INT64", [-1])],
               "topk": [("topk_indices", "INT64", [-1, k]), ("topk_scores", "FP32", [-1, k])]}[reveal]
    return ([{"name": input_name, "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
            [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs])


def onnx_classifier(path: str, reveal: str = "scores", k: int = 3, decimals: int | None = None) -> Served:
    """An ONNX classifier as a deployment would expose it: "scores" serves softmax probabilities
    (FP32 [n, C]), "logits" the raw outputs, "topk" the k best classes ("topk_indices" INT64 and
    "topk_scores" FP32 [n, k], rounded to `decimals`), "top1" the label (INT64 [n])."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        return _reveal(session.run(None, {name: x.astype(np.float32)})[0], reveal, k, decimals)

    return (predict, *_metadata(reveal, k, name))


def natural_inputs(data: str, split: str = "test", limit: int = 1000) -> np.ndarray:
    """The attacker's own natural inputs (a `module:function(split)` data entry point) as float32."""
    from wmtrace import modelio

    return modelio.tensors(modelio.import_object(data)(split), limit)[0].numpy().astype(np.float32)


def buyer_classifier(files: list[str], factory: str | None = "wmtrace.example:build", reveal: str = "scores",
                     k: int = 3, decimals: int | None = None, attack: str | None = None, params: dict | None = None,
                     data: str | None = None, split: str = "test", limit: int = 1000) -> Served:
    """A leaker's deployment: the copies in `files` (safetensors run through `factory`, or ONNX) behind
    the serving attack `attack` with `params` (None: the copy as it is), revealing `reveal` unless the
    attack forces its own (top1). A serving attack that calibrates (screen) does so on `limit` inputs
    of the `data` entry point's `split`: the attacker's own data."""
    from wmtrace import attacks

    natural = natural_inputs(data, split, limit) if data else None
    fn, forced = attacks.served(files, factory, attack, params, natural)
    reveal = forced or reveal

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        return _reveal(np.asarray(fn(x.astype(np.float32)), dtype=np.float64), reveal, k, decimals)

    return (predict, *_metadata(reveal, k, "input"))
