"""`wmtrace serve`: a model file behind a minimal Open Inference Protocol v2 endpoint, for demos.

The other side of `oip.OipTarget`, small enough to read in one go: `GET /v2/health/ready`,
`GET /v2/models/NAME` (metadata) and `POST /v2/models/NAME/infer`, answering what `reveal` allows
(all scores, the top-k with probabilities, or the top-1 label). It runs on the standard library's
threading HTTP server, bound to 127.0.0.1 unless told otherwise. Production deployments use a real
model server (KServe, Triton, MLServer: the tests query KServe); this one exists so that `wmtrace
demo` can tell the black-box story without one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

MAX_BODY = 64 << 20  # a request larger than this is refused, not read

# (n, ...) float32 inputs -> (n, classes) logits
Predict = Callable[[np.ndarray], np.ndarray]


def outputs(logits: np.ndarray, reveal: str, k: int = 5) -> list[dict]:
    """The v2 `outputs` a server revealing `reveal` sends for these logits."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    n = len(p)
    if reveal == "top1":
        labels = p.argmax(1).astype(np.int64)
        return [{"name": "label", "shape": [n], "datatype": "INT64", "data": labels.tolist()}]
    if reveal == "topk":
        idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(p, idx, 1)
        return [{"name": "topk_indices", "shape": list(idx.shape), "datatype": "INT64", "data": idx.ravel().tolist()},
                {"name": "topk_scores", "shape": list(top.shape), "datatype": "FP32",
                 "data": top.astype(np.float32).ravel().tolist()}]
    scores = p.astype(np.float32).ravel().tolist()
    return [{"name": "scores", "shape": list(p.shape), "datatype": "FP32", "data": scores}]


class Server:
    """`with Server(predict, "cnn", input_shape=(1, 28, 28)) as s: s.url` serves until the block ends."""

    def __init__(self, predict: Predict, name: str, input_shape: tuple[int, ...], reveal: str = "scores",
                 host: str = "127.0.0.1", port: int = 0) -> None:
        handler = _handler(predict, name, tuple(input_shape), reveal)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.name = name
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v2/models/{self.name}"

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(predict: Predict, name: str, input_shape: tuple[int, ...], reveal: str):
    base = f"/v2/models/{name}"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet: a demo prints its own story
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            if self.path == "/v2/health/ready":
                self._send(200, {"ready": True})
            elif self.path == base:
                self._send(200, {"name": name, "platform": "wmtrace-demo",
                                 "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *input_shape]}],
                                 "outputs": [{"name": o["name"], "datatype": o["datatype"]}
                                             for o in outputs(np.zeros((1, 2)), reveal)]})
            else:
                self._send(404, {"error": f"no such path {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != f"{base}/infer":
                return self._send(404, {"error": f"no such path {self.path}"})
            size = int(self.headers.get("Content-Length") or 0)
            if not 0 < size <= MAX_BODY:
                return self._send(413, {"error": "request body missing or too large"})
            try:
                tensor = json.loads(self.rfile.read(size))["inputs"][0]
                x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
                if tuple(x.shape[1:]) != input_shape:
                    raise ValueError(f"input shape {list(x.shape)}, expected [n, {', '.join(map(str, input_shape))}]")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return self._send(400, {"error": str(e)[:200]})
            self._send(200, {"model_name": name, "outputs": outputs(predict(x), reveal)})

    return Handler
