"""Black-box targets: models wmtrace queries without reading their weights (see `base`).

    open_target("http://host:8080/v2/models/cnn", reveal="topk")   Open Inference Protocol v2 (`oip`)
    open_target("http://host:7997/v1/embeddings", model="minilm")  OpenAI-compatible embeddings (`openai`)
    open_target("leak.onnx", reveal="top1")                        a file run by onnxruntime (`local`)
    open_target("leak.safetensors", factory="wmtrace.example:build")  a file run in torch (`local`)

Every target counts the inputs it answered (`queries`), raises `errors.TargetFailed` in one line when
the model cannot be asked or answers nonsense, and is closed with `close()` (or `with`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadArgument
from .base import REVEALS, Answers, Queries, Target
from .http import Transport
from .local import ModuleTarget, OnnxTarget, TorchTarget, open_local
from .oip import OipTarget
from .openai import EmbeddingsTarget

__all__ = ["REVEALS", "Answers", "EmbeddingsTarget", "ModuleTarget", "OipTarget", "OnnxTarget", "Queries", "Target",
           "TorchTarget", "open_target"]


def _check(reveal: str | None, k: int, decimals: int | None, timeout: float, retries: int, concurrency: int,
           batch: int, classes: int | None) -> None:
    if reveal is not None and reveal not in REVEALS:
        raise BadArgument("reveal", f"must be one of {', '.join(REVEALS)}")
    for param, value, low in (("k", k, 1), ("retries", retries, 0), ("concurrency", concurrency, 1),
                              ("batch", batch, 1), ("decimals", decimals, 0), ("classes", classes, 2)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise BadArgument(param, f"must be {low} or more")
    if not timeout > 0:
        raise BadArgument("timeout", "must be more than 0 seconds")


def open_target(spec: str, *, reveal: str | None = None, k: int = 5, decimals: int | None = None,
                model: str | None = None, input_name: str | None = None, output_name: str | None = None,
                timeout: float = 10.0, retries: int = 3, concurrency: int = 4, batch: int = 64,
                factory: str | None = None, classes: int | None = None) -> Target:
    """The target `spec` names: an OIP v2 model URL, an OpenAI-compatible `/v1/embeddings` URL, or a
    model file. `reveal` is what the target shows (`REVEALS`; default: what an endpoint declares, else
    scores); `k` and `decimals` shape what a local file reveals; `classes`, when known, bounds labels
    and fixes the width of top-k `logp`. HTTP targets are contacted once here, so an unreachable one
    fails before any query is spent."""
    _check(reveal, k, decimals, timeout, retries, concurrency, batch, classes)
    if spec.startswith(("http://", "https://")):
        path = spec.partition("?")[0].rstrip("/")
        if "/v2/models/" not in path and not path.endswith("/embeddings"):
            raise BadArgument("target", "must be an OIP v2 URL (.../v2/models/NAME) or an OpenAI-compatible "
                                        ".../v1/embeddings URL")
        transport = Transport(spec, timeout=timeout, retries=retries, concurrency=concurrency)
        try:
            if path.endswith("/embeddings"):
                if reveal not in (None, "embedding"):
                    raise BadArgument("reveal", "must be embedding for an embeddings endpoint")
                return EmbeddingsTarget(spec, model=model, batch=batch, transport=transport)
            return OipTarget(spec, reveal=reveal, input_name=input_name, output_name=output_name, classes=classes,
                             batch=batch, transport=transport)
        except BaseException:
            transport.close()
            raise
    return open_local(Path(spec), reveal=reveal, k=k, decimals=decimals, batch=batch, factory=factory,
                      input_name=input_name, output_name=output_name)
