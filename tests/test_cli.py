"""The CLI's promises: one-line errors with exit code 2 that change nothing, JSON for scripts,
no secret in any output, and safe concurrent issuing."""

import hashlib
import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, external_data_helper, helper, numpy_helper
from typer.testing import CliRunner

from wmtrace.cli import app

runner = CliRunner()


def run(*args, registry: Path | None = None):
    argv = [*map(str, args)] + (["--registry", str(registry)] if registry else [])
    return runner.invoke(app, argv, catch_exceptions=False)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


class Evil:
    """Unpickling this would run code: it must never happen."""

    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['WMTRACE_EVIL_MARK'])}",))


def bad_files(tmp: Path, good: Path) -> dict[str, Path]:
    files = {}
    files["missing"] = tmp / "does-not-exist.safetensors"
    (tmp / "random.safetensors").write_bytes(os.urandom(4096))
    files["corrupt"] = tmp / "random.safetensors"
    data = good.read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    files["truncated"] = tmp / "truncated.safetensors"
    (tmp / "empty.onnx").write_bytes(b"")
    files["empty"] = tmp / "empty.onnx"
    with open(tmp / "evil.pt", "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    files["pickle"] = tmp / "evil.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2, 2)}, "hook": Evil()}, tmp / "evil_zip.pt")
    files["pickle-in-zip"] = tmp / "evil_zip.pt"
    # ONNX whose external data points outside its folder.
    sub = tmp / "onnx"
    sub.mkdir()
    (tmp / "secret.bin").write_bytes(b"\x00" * 64)
    t = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    external_data_helper.set_external_data(t, location="../secret.bin", offset=0, length=64)
    t.ClearField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [t])
    onnx.save(helper.make_model(graph), sub / "escape.onnx")
    files["onnx-escape"] = sub / "escape.onnx"
    return files


def test_bad_input_is_one_line_exit_2_and_changes_nothing(workdir, tmp_path, monkeypatch):
    reg = workdir / "registry"
    good = Path(json.loads(run("buyers", "--json", registry=reg).stdout)["buyers"][0]["file"])
    mark = tmp_path / "pwned"
    monkeypatch.setenv("WMTRACE_EVIL_MARK", str(mark))
    before = snapshot(reg)
    for kind, path in bad_files(tmp_path, good).items():
        r = run("trace", path, registry=reg)
        assert r.exit_code == 2, (kind, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (kind, r.stderr)
        assert "Traceback" not in r.output
    assert not mark.exists(), "a pickle was unpickled"
    assert "outside the model's folder" in run("trace", tmp_path / "onnx" / "escape.onnx", registry=reg).stderr
    assert "not a plain state dict" in run("trace", tmp_path / "evil.pt", registry=reg).stderr

    # Unknown master, unknown registry, unwritable output folder.
    r = run("trace", good, "--master", "nope", registry=reg)
    assert r.exit_code == 2 and "unknown master" in r.stderr
    r = run("trace", good, registry=tmp_path / "no-registry")
    assert r.exit_code == 2 and "no wmtrace registry" in r.stderr
    assert not (tmp_path / "no-registry").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = run("issue", "--buyers", "1", "--out", blocker / "sub", registry=reg)
    assert r.exit_code == 2 and "not writable" in r.stderr
    r = run("issue", "--buyers", "1", "--master", "nope", registry=reg)
    assert r.exit_code == 2 and "unknown master" in r.stderr
    assert snapshot(reg) == before


def test_trace_json_and_exit_codes(workdir, master_file):
    reg = workdir / "registry"
    buyers = json.loads(run("buyers", "--json", registry=reg).stdout)["buyers"]
    r = run("trace", buyers[2]["file"], "--json", registry=reg)
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["verdict"] == "identified" and d["buyer"] == {"id": buyers[2]["id"], "name": buyers[2]["name"]}
    assert d["master"] == "small" and d["bit_errors"] == 0 and d["false_positive_probability"] < 1e-6
    r = run("trace", master_file, "--json", registry=reg)
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["verdict"] == "no watermark" and d["buyer"] is None
    # Every trace is in the audit log.
    with_log = run("buyers", "--json", registry=reg)
    assert with_log.exit_code == 0


def test_no_secret_in_any_output_and_key_is_0600(workdir, tmp_path):
    reg = workdir / "registry"
    key_file = reg / "keys" / "small.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    secret = key_file.read_text().strip()
    outputs = []
    outputs.append(run("buyers", registry=reg).output)
    outputs.append(run("buyers", "--json", registry=reg).output)
    outputs.append(run("issue", "--buyers", "1", "--out", tmp_path / "o", "--json", registry=reg).output)
    f = json.loads(outputs[-1])["buyers"][0]["file"]
    outputs.append(run("trace", f, registry=reg).output)
    outputs.append(run("trace", f, "--json", registry=reg).output)
    db = (reg / "wmtrace.db").read_bytes()
    for text in outputs:
        assert secret not in text and secret[:16] not in text
    assert secret.encode() not in db and bytes.fromhex(secret) not in db


def test_init_registers_a_user_master_and_json(tmp_path, master_file):
    reg = tmp_path / "reg"
    r = run("init", "--name", "mine", "--weights", master_file, "--model", "wmtrace.example:build",
            "--data", "tests.smalldata:dataset", "--json", registry=reg)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["master"] == "mine" and sum(c["bits"] for c in d["carriers"]) == 256
    assert stat.S_IMODE((reg / "keys" / "mine.key").stat().st_mode) == 0o600
    r = run("init", "--name", "mine", "--weights", master_file, registry=reg)
    assert r.exit_code == 2 and "already registered" in r.stderr
    r = run("init", "--name", "x", "--weights", master_file, "--model", "no.such.module:build", registry=reg)
    assert r.exit_code == 2 and "cannot import" in r.stderr
    r = run("init", "--name", "y", "--weights", master_file, "--placement", "anywhere", registry=reg)
    assert r.exit_code == 2 and "placement 'anywhere'" in r.stderr

    # Minimal-norm placement with a short repair, fidelity check skipped: still a traceable copy.
    r = run("init", "--name", "plain", "--weights", master_file, "--data", "tests.smalldata:dataset",
            "--placement", "minimal-norm", "--repair-steps", "5", registry=reg)
    assert r.exit_code == 0, r.output
    r = run("issue", "--buyers", "1", "--master", "plain", "--eval-samples", "0", "--out", tmp_path / "o",
            "--json", registry=reg)
    assert r.exit_code == 0, r.output
    (b,) = json.loads(r.stdout)["buyers"]
    assert b["agreement"] is None and b["accuracy"] is None
    r = run("trace", b["file"], "--json", registry=reg)
    assert r.exit_code == 0 and json.loads(r.stdout)["buyer"]["id"] == b["id"]


def test_two_issuing_processes_never_share_an_id(workdir):
    reg = workdir / "registry"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "wmtrace", "issue", "--buyers", "2", "--json", "--registry", str(reg)]
    procs = [subprocess.Popen([*cmd, "--out", str(workdir / f"p{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ids = [b["id"] for out, _ in outs for b in json.loads(out)["buyers"]]
    assert len(ids) == 4 and len(set(ids)) == 4
    listed = json.loads(run("buyers", "--json", registry=reg).stdout)["buyers"]
    assert len(listed) == 7 and len({b["id"] for b in listed}) == 7
    files = {b["file"] for b in listed}
    assert len(files) == 7 and all(Path(f).exists() for f in files)


@pytest.mark.parametrize(
    "args", [["issue"], ["issue", "--buyers", "0"], ["issue", "--buyers", "1", "--eval-samples", "-1"]]
)
def test_issue_argument_errors(workdir, args):
    r = run(*args, registry=workdir / "registry")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_checkpoint_of_plain_tensors_is_accepted(workdir, tmp_path):
    reg = workdir / "registry"
    f = json.loads(run("buyers", "--json", registry=reg).stdout)["buyers"][0]["file"]
    from safetensors.torch import load_file

    torch.save(load_file(f), tmp_path / "plain.pth")
    assert run("trace", tmp_path / "plain.pth", registry=reg).exit_code == 0


def test_paths_and_names_are_printed_as_text_never_as_markup(workdir, tmp_path):
    """A path holding "[/x]" once crashed Rich's markup parser after the verdict was logged."""
    reg = workdir / "registry"
    names = tmp_path / "names.txt"
    names.write_text("[b]acme[red]\n")
    r = run("issue", "--names", names, "--out", tmp_path / "o", registry=reg)
    assert r.exit_code == 0, r.output
    assert "[b]acme[red]" in r.stdout
    f = json.loads(run("buyers", "--json", registry=reg).stdout)["buyers"][-1]["file"]
    odd = tmp_path / "leak [/x] [red]" / "copy[/bold].safetensors"
    odd.parent.mkdir(parents=True)
    odd.write_bytes(Path(f).read_bytes())
    r = run("trace", odd, registry=reg)
    assert r.exit_code == 0, r.output
    assert str(odd) in r.stdout and "buyer: [b]acme[red]" in r.stdout
    missing = odd.parent / "missing[/b].onnx"
    r = run("trace", missing, registry=reg)
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {missing}: no such file"


@pytest.mark.parametrize("name", ["../escaped-up", "/tmp/absolute", "a/b", ".hidden", "x" * 300, "tab\there"])
def test_buyer_names_that_are_not_one_file_name_are_refused_before_anything_is_issued(workdir, tmp_path, name):
    reg = workdir / "registry"
    names = tmp_path / "names.txt"
    names.write_text(f"fine-first\n{name}\n")
    before = snapshot(reg)
    r = run("issue", "--names", names, "--out", tmp_path / "out" / "deep", registry=reg)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "buyer name" in r.stderr, r.output
    assert snapshot(reg) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped-up.safetensors").exists()


def test_a_names_list_run_again_issues_only_the_names_not_issued_yet(workdir, tmp_path):
    reg = workdir / "registry"
    names = tmp_path / "names.txt"
    names.write_text("acme\nglobex\n")
    first = json.loads(run("issue", "--names", names, "--out", tmp_path / "o", "--json", registry=reg).stdout)
    assert [b["name"] for b in first["buyers"]] == ["acme", "globex"] and first["skipped"] == []
    names.write_text("acme\nglobex\ninitech\n")
    r = run("issue", "--names", names, "--out", tmp_path / "o", "--json", registry=reg)
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert [b["name"] for b in again["buyers"]] == ["initech"] and again["skipped"] == ["acme", "globex"]
    listed = [b["name"] for b in json.loads(run("buyers", "--json", registry=reg).stdout)["buyers"]]
    assert listed.count("acme") == 1 and "initech" in listed


@pytest.mark.parametrize("args", [["issue", "--buyers", "abc"], ["trace"], ["attack", "prune", "--bogus", "1"],
                                  ["nonsense"]])
def test_usage_errors_are_one_line(tmp_path, args):
    r = run(*args, registry=tmp_path / "reg")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert not (tmp_path / "reg").exists()


@pytest.mark.parametrize("args", [
    ["issue", "--buyers", "0"],
    ["issue", "--buyers", "1", "--eval-samples", "-1"],
    ["init", "--name", "m", "--weights", "{master}", "--model", "no.such.module:build"],
    ["init", "--name", "../m", "--weights", "{master}"],
    ["init", "--name", "m", "--weights", "{master}", "--strength", "7"],
])
def test_a_failing_first_command_creates_no_registry(tmp_path, master_file, args):
    args = [a.replace("{master}", str(master_file)) for a in args]
    r = run(*args, registry=tmp_path / "reg")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "reg").exists()


def test_every_trace_is_in_the_audit_log(workdir, master_file):
    from wmtrace import api

    reg = workdir / "registry"
    buyers = json.loads(run("buyers", "--json", registry=reg).stdout)["buyers"]
    assert run("trace", buyers[1]["file"], registry=reg).exit_code == 0
    assert run("trace", master_file, registry=reg).exit_code == 1
    with api.open_registry(reg) as r:
        traces = [e for e in r.audit_log() if e["action"] == "trace"][:2]
    assert [(e["detail"]["file"], e["detail"]["verdict"], e["detail"]["buyer"]) for e in traces] == [
        (str(master_file), "no watermark", None), (buyers[1]["file"], "identified", buyers[1]["id"])]
