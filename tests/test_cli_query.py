"""`wmtrace query`: a target that cannot be asked is one `error:` line and exit code 2, before any
registry is read or any query is spent, and never shows a credential from its URL; a buyer's copy
served by KServe with labels only is named in JSON, exit code 0."""

import json
import shutil
import time

import pytest
from typer.testing import CliRunner

from tests import servers
from wmtrace.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [*map(str, args)], catch_exceptions=False)


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


def test_unreachable_endpoint_is_one_line_without_secrets(tmp_path):
    port = servers.free_port()
    start = time.monotonic()
    r = run("query", f"http://alice:s3cret@127.0.0.1:{port}/v2/models/cnn/infer?token=hunter2",
            "--reveal", "top1", "--registry", tmp_path / "no-registry")
    assert r.exit_code == 2 and time.monotonic() - start < 5
    line = one_error_line(r)
    assert line == f"error: http://127.0.0.1:{port}/v2/models/cnn: connection refused after 4 tries"
    assert "s3cret" not in r.output and "hunter2" not in r.output and "alice" not in r.output


def test_silent_endpoint_times_out_in_one_line():
    with servers.fault_server(servers.Fault(sleep=3.0)) as url:
        start = time.monotonic()
        r = run("query", f"{url}/v2/models/m", "--timeout", "0.2", "--retries", "1")
        assert time.monotonic() - start < 2.5
    assert r.exit_code == 2
    assert one_error_line(r) == f"error: {url}/v2/models/m: timed out after 0.2 s after 2 tries"


def test_bad_reveal_and_bad_numbers_exit_2():
    r = run("query", "http://127.0.0.1:1/v2/models/m", "--reveal", "logits")
    assert r.exit_code == 2
    line = one_error_line(r)
    assert "'logits' is not one of" in line and "scores" in line and "embedding" in line
    r = run("query", "http://127.0.0.1:1/v2/models/m", "--concurrency", "0")
    assert r.exit_code == 2 and one_error_line(r) == "error: --concurrency must be 1 or more"
    r = run("query", "http://127.0.0.1:1/predict")
    assert r.exit_code == 2 and "--target must be an OIP v2 URL" in one_error_line(r)


def test_weight_file_needs_a_registry_for_its_factory(tmp_path):
    leak = tmp_path / "leak.safetensors"
    leak.write_bytes(b"not read")
    r = run("query", leak, "--registry", tmp_path / "none")
    assert r.exit_code == 2 and "no wmtrace registry" in one_error_line(r)
    assert not (tmp_path / "none").exists()


def test_a_copy_served_by_kserve_is_named_in_json(issued, tmp_path):
    pytest.importorskip("kserve")
    root, buyers = issued
    shutil.copytree(root, tmp_path / "w", symlinks=True)  # the query session writes an audit entry
    leaked = buyers[1]
    with servers.kserve_server({"cnn": servers.leak(leaked.file, attack="top1")}) as url:
        r = run("query", f"{url}/v2/models/cnn", "--reveal", "top1", "--registry", tmp_path / "w" / "registry",
                "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["verdict"] == "identified" and result["buyer"]["id"] == leaked.id
    assert result["false_positive_probability"] <= 1e-6 and result["queries"] <= 256
    assert result["file"] == f"{url}/v2/models/cnn"
