"""Models the test servers serve, importable in the server's own process: each factory takes JSON
arguments and returns `(predict, inputs, outputs)`, where `predict` maps a numpy batch to named numpy
outputs and `inputs` / `outputs` are the OIP metadata the server declares."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Served = tuple[Callable[[np.ndarray], dict[str, np.ndarray]], list[dict], list[dict]]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def onnx_classifier(path: str, reveal: str = "scores", k: int = 3, decimals: int | None = None) -> Served:
    """An ONNX classifier as a deployment would expose it: "scores" serves softmax probabilities
    (FP32 [n, C]), "logits" the raw outputs, "topk" the k best classes ("topk_indices" INT64 and
    "topk_scores" FP32 [n, k], rounded to `decimals`), "top1" the label (INT64 [n])."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        logits = session.run(None, {name: x.astype(np.float32)})[0]
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

    outputs = {"logits": [("logits", "FP32", [-1, 10])], "scores": [("scores", "FP32", [-1, 10])],
               "top1": [("label", "INT64", [-1])],
               "topk": [("topk_indices", "INT64", [-1, k]), ("topk_scores", "FP32", [-1, k])]}[reveal]
    return (predict, [{"name": name, "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
            [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs])
