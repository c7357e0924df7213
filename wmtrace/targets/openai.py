"""A sentence encoder behind an OpenAI-compatible embeddings endpoint (OpenAI, vLLM, Infinity, TEI,
LiteLLM...): `POST .../v1/embeddings {"input": [texts], "model": NAME}` -> `data[i].embedding`, each
tagged with the `index` of its text. Answers are put back in the order asked, whatever order the
server lists them in, and every vector must have the dimension of the first one seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import BadArgument, TargetFailed
from .base import Answers, Closing, Queries, finite
from .http import Transport, chunks


class EmbeddingsTarget(Closing):
    """An OpenAI-compatible encoder. Without `model`, the only model `GET .../v1/models` lists."""

    reveal = "embedding"

    def __init__(self, url: str, *, model: str | None, batch: int, transport: Transport) -> None:
        self.transport, self.batch, self.url = transport, batch, url
        self.name = transport.name
        self.queries = 0
        self.dim: int | None = None
        path, _, query = url.partition("?")
        models = self.transport.probe(path.rsplit("/embeddings", 1)[0] + "/models" + ("?" + query if query else ""))
        self.model = model or self._only_model(models)

    def _only_model(self, r: Any) -> str:
        try:
            ids = [m["id"] for m in r.json()["data"]] if r is not None else []
        except (ValueError, KeyError, TypeError):
            ids = []
        if len(ids) != 1:
            listed = f" (it serves {', '.join(map(str, ids[:5]))})" if ids else ""
            raise BadArgument("model", f"must name the model {self.name} should run{listed}")
        return str(ids[0])

    def answer(self, inputs: Queries) -> Answers:
        """Embeddings of `inputs` (texts), `batch` per request, in the order asked."""
        if isinstance(inputs, (str, np.ndarray)) or not all(isinstance(t, str) for t in inputs):
            raise BadArgument("inputs", f"must be a list of texts for {self.name}")
        texts = list(inputs)
        parts = self.transport.map(lambda s: self._ask(texts[s]), chunks(len(texts), self.batch))
        if not parts:
            return Answers(embeddings=np.zeros((0, self.dim or 0)))
        return Answers(embeddings=np.concatenate(parts))

    def _ask(self, texts: list[str]) -> np.ndarray:
        body = self.transport.post_json(self.url, {"input": texts, "model": self.model, "encoding_format": "float"})
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != len(texts):
            got = len(data) if isinstance(data, list) else "no"
            raise TargetFailed(f"{self.name}: {got} embeddings for {len(texts)} texts")
        out: list[Any] = [None] * len(texts)
        for pos, item in enumerate(data):
            i = item.get("index", pos) if isinstance(item, dict) else None
            vec = item.get("embedding") if isinstance(item, dict) else None
            if not isinstance(i, int) or not 0 <= i < len(texts) or out[i] is not None or not isinstance(vec, list):
                raise TargetFailed(f"{self.name}: answer lists embeddings without a valid index")
            try:
                out[i] = np.asarray(vec, dtype=np.float64)
            except (ValueError, TypeError):
                raise TargetFailed(f"{self.name}: an embedding is not a list of numbers") from None
        dims = {v.shape for v in out}
        with self.transport.lock:
            self.dim = self.dim or (out[0].shape[0] if out and out[0].ndim == 1 else None)
            expected = self.dim
        if len(dims) != 1 or dims != {(expected,)}:
            got = sorted(str(d[0]) if len(d) == 1 else str(list(d)) for d in dims)
            raise TargetFailed(f"{self.name}: embeddings of dimension {', '.join(got)}, expected {expected}")
        vectors = finite(np.stack(out), "embeddings", self.name)
        self.transport.count(self, len(texts))
        return vectors

    def close(self) -> None:
        self.transport.close()
