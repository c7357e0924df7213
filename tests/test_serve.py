"""`wmtrace serve`: a model file behind the minimal OIP v2 endpoint, queried over HTTP, stopped by a signal."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from wmtrace import api, example
from wmtrace.targets import open_target
from wmtrace.targets.serve import Server

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_command_answers_labels_that_name_the_buyer_and_stops_on_a_signal(issued, stop):
    root, buyers = issued
    b = buyers[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "wmtrace", "serve", b.file, "--model", "wmtrace.example:build",
                          "--input-shape", "1,28,28", "--port", "0", "--reveal", "top1", "--name", "cnn"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = p.stdout.readline()  # "serving FILE at URL (answers: top1); Ctrl-C stops"
        assert " at http://127.0.0.1:" in line, (line, p.stderr.read() if p.poll() is not None else "")
        url = line.split(" at ")[1].split(" ")[0]
        with open_target(url, reveal="top1") as t:
            r = api.query(t, api.open_registry(root / "registry"))
        assert r.verdict == "identified" and r.buyer["id"] == b.id
    finally:
        p.send_signal(stop)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    assert p.returncode == 0 and "Traceback" not in err and "stopped" in out


def test_server_refuses_bad_requests_without_dying():
    model = example.build().eval()
    with Server(lambda x: model(torch.from_numpy(x)).detach().numpy(), "cnn", (1, 28, 28)) as s:
        base = s.url
        assert httpx.post(base + "/infer", json={"inputs": [{"data": [1, 2], "shape": [1, 2]}]}).status_code == 400
        assert httpx.post(base + "/infer", content=b"not json").status_code == 400
        assert httpx.get(base.replace("/cnn", "/other")).status_code == 404
        ok = httpx.post(base + "/infer", json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28],
                                                           "data": np.zeros(2 * 784).tolist()}]})
        assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [2, 10]


@pytest.mark.parametrize("args,message", [
    (["--reveal", "all"], "--reveal"), (["--input-shape", "1,28,28"], "--model is needed"),
])
def test_serve_refuses_bad_arguments_in_one_line(issued, args, message):
    _, buyers = issued
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "wmtrace", "serve", buyers[0].file, *args], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
