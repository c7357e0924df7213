"""`wmtrace serve`: a model file behind a minimal Open Inference Protocol v2 endpoint, for demos."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer

from ..errors import BadArgument
from ..targets import OnnxTarget, TorchTarget
from ..targets.serve import Server
from .common import guarded, out


@guarded
def serve(
    file: Annotated[Path, typer.Argument(help="Model file: .onnx, or weights with --model")],
    reveal: Annotated[str, typer.Option(help="What the endpoint answers: scores, topk or top1")] = "scores",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one)")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind (another than 127.0.0.1 exposes the model)")] = "127.0.0.1",
    name: Annotated[str, typer.Option(help="Model name in the URL")] = "model",
    model: Annotated[str | None, typer.Option(help="module:factory for a weight file")] = None,
    input_shape: Annotated[str | None, typer.Option(help="Input shape without the batch, e.g. 1,28,28")] = None,
) -> None:
    """Serve a model file on Open Inference Protocol v2 REST until interrupted (for demos: real
    deployments use KServe, Triton or MLServer, which `wmtrace query` speaks to as well)."""
    if reveal not in ("scores", "topk", "top1"):
        raise BadArgument("reveal", f"{reveal!r}: use scores, topk or top1")
    shape = tuple(int(d) for d in input_shape.split(",")) if input_shape else None
    if file.suffix.lower() == ".onnx":
        runner = OnnxTarget(file, reveal="scores", k=5, decimals=None, batch=256, input_name=None, output_name=None)
        dims = runner.input.shape[1:]
        shape = shape or (tuple(dims) if all(isinstance(d, int) for d in dims) else None)
    else:
        if not model:
            raise BadArgument("model", f"is needed to run {file} (module:factory building its nn.Module)")
        runner = TorchTarget(file, factory=model, reveal="scores", k=5, decimals=None, batch=256)
    if shape is None:
        raise BadArgument("input_shape", "is needed: the model does not declare a fixed input shape")
    # Ctrl-C and SIGTERM (how service managers stop a server) both end it cleanly, even where the
    # shell started it with SIGINT ignored (a background job).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    with Server(runner.outputs, name, shape, reveal, host, port) as server:
        out.print(f"serving {file} at {server.url} (answers: {reveal}); Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            out.print("stopped")


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt
