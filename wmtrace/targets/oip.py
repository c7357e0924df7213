"""A classifier behind the Open Inference Protocol v2 REST API (KServe, Triton, MLServer, Seldon).

    POST {base}/v2/models/NAME[/versions/V]/infer
         {"inputs": [{"name": ..., "shape": [n, ...], "datatype": "FP32", "data": [...flat...]}]}
    ->   {"outputs": [{"name": ..., "shape": [...], "datatype": ..., "data": [...]}, ...]}

Which outputs carry the answer depends on what the deployment reveals (`base.REVEALS`): a float
[n, classes] output (scores, or an embedding), an integer [n, k] output of classes beside a float
[n, k] output of their probabilities (top-k), or an integer [n] / [n, 1] output (top-1). `output_name`
picks one by name (for top-k, "INDICES,SCORES" or the scores' name); otherwise the datatype and shape
decide. The input's name and datatype come from the model's metadata (GET on the model's URL), read
once when the target opens, which also proves the endpoint reachable before any query is spent.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..errors import BadArgument, TargetFailed
from .base import Answers, Closing, Queries, check_labels, finite, scores_answers, topk_answers
from .http import Transport, chunks

MODEL_URL = re.compile(r"^(?P<model>.*/v2/models/[^/]+(?:/versions/[^/]+)?)(?:/infer)?/?$")
FLOATS = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BF16": np.float32}
INTS = {f"{s}INT{b}": np.dtype(f"{s.lower()}int{b}") for s in ("", "U") for b in (8, 16, 32, 64)}
INPUT_TYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}


def _split(url: str) -> tuple[str, str]:
    """(the model's URL, its query string) from any of the model's URLs."""
    path, _, query = url.partition("?")
    m = MODEL_URL.match(path)
    if not m:
        raise BadArgument("target", "is not an Open Inference Protocol URL (.../v2/models/NAME[/infer])")
    return m["model"], ("?" + query if query else "")


class OipTarget(Closing):
    """An OIP v2 model queried in batches of `batch` inputs, `concurrency` requests in flight."""

    def __init__(self, url: str, *, reveal: str | None, input_name: str | None, output_name: str | None,
                 classes: int | None, batch: int, transport: Transport) -> None:
        model, query = _split(url)
        self.transport, self.batch, self.classes = transport, batch, classes
        self.name = transport.name = transport.name.removesuffix("/infer")  # the model, in every message
        self.infer_url = f"{model}/infer{query}"
        self.output_name = output_name
        self.queries = 0
        meta = self._metadata(f"{model}{query}")
        inputs = meta.get("inputs") if isinstance(meta.get("inputs"), list) else []
        first = inputs[0] if inputs and isinstance(inputs[0], dict) else {}
        self.input_name = input_name or str(first.get("name") or "input")
        self.input_type = str(first.get("datatype", "FP32")).upper()
        if self.input_type not in INPUT_TYPES:
            self.input_type = "FP32"
        self.reveal = reveal or _guess_reveal(meta.get("outputs"))

    def _metadata(self, url: str) -> dict:
        r = self.transport.probe(url)
        if r is None:
            return {}
        try:
            meta = r.json()
        except ValueError:
            return {}
        return meta if isinstance(meta, dict) else {}

    def answer(self, inputs: Queries) -> Answers:
        """Answers to `inputs` (float array, n first), asked `batch` at a time, in order."""
        if not isinstance(inputs, np.ndarray) or inputs.dtype.kind not in "fiu" or inputs.ndim < 1:
            raise BadArgument("inputs", f"must be a numeric array for {self.name}")
        x = np.ascontiguousarray(inputs, dtype=INPUT_TYPES[self.input_type])
        parts = self.transport.map(lambda s: self._ask(x[s]), chunks(len(x), self.batch))
        if self.reveal in ("scores", "embedding"):  # a server changing its mind between batches is lying
            widths = {(p.logp if p.logp is not None else p.embeddings).shape[1] for p in parts}
            if len(widths) > 1:
                raise TargetFailed(f"{self.name}: answers of different widths {sorted(widths)} between batches")
        return _concat(parts, self.reveal)

    def _ask(self, x: np.ndarray) -> Answers:
        body = {"inputs": [{"name": self.input_name, "shape": list(x.shape), "datatype": self.input_type,
                            "data": x.ravel().tolist()}]}
        outputs = _outputs(self.transport.post_json(self.infer_url, body), self.name)
        a = self._read(outputs, len(x))
        self.transport.count(self, len(x))
        return a

    def _read(self, outputs: dict[str, np.ndarray], n: int) -> Answers:
        for name, a in outputs.items():
            if a.ndim == 0 or a.shape[0] != n:
                raise TargetFailed(f"{self.name}: output {name!r} has shape {list(a.shape)} for {n} inputs")
        if self.reveal in ("scores", "embedding"):
            scores = self._pick(outputs, "f", (2,), "a float output of shape [n, classes]")
            if self.reveal == "embedding":
                return Answers(embeddings=finite(scores.astype(np.float64), "embeddings", self.name))
            a = scores_answers(scores, self.name)
            if self.classes is not None and a.logp.shape[1] != self.classes:
                raise TargetFailed(f"{self.name}: {a.logp.shape[1]} class scores, expected {self.classes}")
            return a
        if self.reveal == "top1":
            labels = self._pick(outputs, "iu", (1, 2), "an integer output of shape [n] or [n, 1]")
            if labels.ndim == 2 and labels.shape[1] != 1:
                raise TargetFailed(f"{self.name}: labels of shape {list(labels.shape)}, expected [n] or [n, 1]")
            return Answers(labels=check_labels(labels.reshape(-1), self.classes, "labels", self.name))
        return self._topk(outputs)

    def _topk(self, outputs: dict[str, np.ndarray]) -> Answers:
        names = (self.output_name or "").split(",")
        if len(names) == 2:
            wanted = {k: outputs[k] for k in names if k in outputs}
            if len(wanted) != 2:
                raise TargetFailed(f"{self.name}: no outputs {self.output_name!r} (outputs: {_list(outputs)})")
            idx, probs = wanted[names[0]], wanted[names[1]]
        else:
            probs = self._pick(outputs, "f", (2,), "a float output of shape [n, k]")
            rest = {k: v for k, v in outputs.items() if v.dtype.kind in "iu" and v.shape == probs.shape}
            if not rest:
                raise TargetFailed(f"{self.name}: no integer output of shape {list(probs.shape)} beside the "
                                   f"top-k scores (outputs: {_list(outputs)})")
            idx = next(iter(rest.values()))
        return topk_answers(idx, probs, self.classes, self.name)

    def _pick(self, outputs: dict[str, np.ndarray], kinds: str, ndims: tuple[int, ...], what: str) -> np.ndarray:
        if self.output_name and "," not in self.output_name:
            if self.output_name not in outputs:
                raise TargetFailed(f"{self.name}: no output {self.output_name!r} (outputs: {_list(outputs)})")
            a = outputs[self.output_name]
            if a.dtype.kind not in kinds or a.ndim not in ndims:
                raise TargetFailed(f"{self.name}: output {self.output_name!r} is not {what}")
            return a
        for a in outputs.values():
            if a.dtype.kind in kinds and a.ndim in ndims:
                return a
        raise TargetFailed(f"{self.name}: no {what} for reveal {self.reveal!r} (outputs: {_list(outputs)})")

    def close(self) -> None:
        self.transport.close()


def _list(outputs: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {a.dtype.name} {list(a.shape)}" for k, a in outputs.items()) or "none"


def _outputs(body: Any, name: str) -> dict[str, np.ndarray]:
    """The `outputs` of an inference response as named arrays, each checked against its shape."""
    raw = body.get("outputs") if isinstance(body, dict) else None
    if not isinstance(raw, list) or not raw:
        raise TargetFailed(f"{name}: answer has no outputs")
    found: dict[str, np.ndarray] = {}
    for o in raw:
        if not isinstance(o, dict) or not isinstance(o.get("shape"), list):
            raise TargetFailed(f"{name}: an output lacks its name, shape or data")
        dt = str(o.get("datatype", "")).upper()
        dtype = FLOATS.get(dt) or INTS.get(dt)
        if dtype is None:
            continue  # BYTES, BOOL: nothing a classifier's answer is read from
        shape = o["shape"]
        try:
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            data = np.asarray(o.get("data"), dtype=np.float64 if dtype in FLOATS.values() else np.int64)
            if data.size != int(np.prod(shape)):
                raise ValueError
        except (ValueError, TypeError, OverflowError):
            raise TargetFailed(f"{name}: output {o.get('name')!r} does not hold {shape} {dt} values") from None
        found[str(o.get("name", len(found)))] = data.reshape(shape)
    if not found:
        raise TargetFailed(f"{name}: answer has no numeric output")
    return found


def _guess_reveal(outputs: Any) -> str:
    """What the metadata's declared outputs reveal: an integer [n, k] beside a float [n, k] is top-k,
    a lone integer output top-1; anything else (or nothing declared) scores."""
    if not isinstance(outputs, list):
        return "scores"
    kinds = [("i" if str(o.get("datatype", "")).upper() in INTS else "f", len(o.get("shape") or []))
             for o in outputs if isinstance(o, dict)]
    if ("i", 2) in kinds and ("f", 2) in kinds:
        return "topk"
    if any(k == "i" for k, _ in kinds) and not any(k == "f" for k, _ in kinds):
        return "top1"
    return "scores"


def _concat(parts: list[Answers], reveal: str) -> Answers:
    """One `Answers` from the batches' answers in order (`Answers.concat`); none at all, for no input,
    still says what the reveal would have shown."""
    if not parts:
        return Answers(labels=np.zeros(0, np.int64), logp=None if reveal == "top1" else np.zeros((0, 0)),
                       embeddings=np.zeros((0, 0)) if reveal == "embedding" else None)
    return Answers.concat(parts)
