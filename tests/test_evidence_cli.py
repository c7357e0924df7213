"""Evidence through the CLI, as seller, buyer and arbiter use it: an honest bundle for a pruned,
fine-tuned and ONNX-exported leak verified in a fresh folder with no registry, receipts signed by the
buyer and carried by the bundle, the exit codes of `evidence` and `audit verify`, and the seller's
public key exported without its seed. (Forged bundles are tests/test_evidence_forgery.py's.)"""

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key
from safetensors.torch import load_file
from typer.testing import CliRunner

import wmtrace
from wmtrace import api, example, formats
from wmtrace.cli import app

runner = CliRunner()
CHECKS = {"bundle files", "seller key", "bundle signature", "leak hash", "audit chain", "trace entry", "statements",
          "key commitment", "merkle proofs", "codeword commitments", "issue entries", "buyer acknowledgements",
          "re-extraction"}


def run(*args, registry: Path | None = None):
    argv = [*map(str, args)] + (["--registry", str(registry)] if registry else [])
    return runner.invoke(app, argv, catch_exceptions=False)


def seller_seed(workdir: Path) -> str:
    """The seller key's seed as stored (hex): it must never appear in any output."""
    seed = (workdir / "registry" / "seller.key").read_text().strip().lower()
    assert len(seed) == 64
    return seed


def assert_no_secret(seed: str, *results) -> None:
    for r in results:
        text = (r.stdout + r.stderr).lower()
        assert seed not in text


def one_line_error(r) -> None:
    assert r.exit_code == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr


def make_leak(copy: Path, tmp: Path) -> Path:
    """What a leaker does: prune 40% of the weights, fine-tune a few steps on the task, export to ONNX."""
    pruned, tuned = tmp / "pruned.safetensors", tmp / "tuned.safetensors"
    api.attack("prune", copy, pruned, 0.4)
    api.attack("finetune", pruned, tuned, 0.1, factory="wmtrace.example:build", data="tests.smalldata:dataset")
    before, after = load_file(str(pruned)), load_file(str(tuned))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))  # really tuned
    model = example.build()
    model.load_state_dict(after)
    leak = tmp / "leak.onnx"
    formats.export_onnx(model, torch.zeros(1, 1, 28, 28), leak)
    return leak


def verify_elsewhere(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m wmtrace verify` in a fresh process, in `folder`, with no registry to find and an empty HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WMTRACE_")}
    env["HOME"] = str(folder.parent / "home")
    env["PYTHONPATH"] = str(Path(wmtrace.__file__).resolve().parents[1])  # this code, not a registry
    return subprocess.run([sys.executable, "-m", "wmtrace", "verify", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


def test_honest_bundle_for_an_attacked_onnx_leak_verifies_with_no_registry(workdir, tmp_path, monkeypatch):
    reg = workdir / "registry"
    copy = workdir / "out" / "buyer-0002.safetensors"
    leak = make_leak(copy, tmp_path)
    r = run("evidence", leak, "--out", tmp_path / "B", "--json", registry=reg)
    assert r.exit_code == 0, r.stdout + r.stderr
    made = json.loads(r.stdout)
    assert {"bundle", "verdict", "master", "accused", "leak", "seller", "files", "result"} <= set(made)
    assert (made["verdict"], made["accused"], made["master"]) == ("identified", [2], "small")
    assert made["result"]["buyer"] == {"id": 2, "name": "buyer-0002"}
    key = run("keys", "export-public", "--out", tmp_path / "seller.pem", registry=reg)
    assert key.exit_code == 0
    assert_no_secret(seller_seed(workdir), r, key)

    fresh = tmp_path / "arbiter" / "case"  # only the bundle, the leak and the public key
    (tmp_path / "arbiter" / "home").mkdir(parents=True)
    fresh.mkdir()
    shutil.copytree(tmp_path / "B", fresh / "B")
    shutil.copy(leak, fresh / "leak.onnx")
    shutil.copy(tmp_path / "seller.pem", fresh / "seller.pem")
    before = sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*"))

    js = verify_elsewhere(fresh, "B", "leak.onnx", "--public-key", "seller.pem", "--json")
    assert js.returncode == 0, js.stdout + js.stderr
    v = json.loads(js.stdout)
    assert {"verdict", "bundle", "leak", "accused", "failed", "checks"} <= set(v)
    assert v["verdict"] == "verified" and v["failed"] == [] and v["accused"] == [{"id": 2, "name": "buyer-0002"}]
    assert all({"name", "ok", "detail"} <= set(c) and c["ok"] is True for c in v["checks"]), v["checks"]
    assert CHECKS <= {c["name"] for c in v["checks"]}
    monkeypatch.chdir(fresh)  # the table, in this process (the fresh one above costs seconds): same folder
    for name in [k for k in os.environ if k.startswith("WMTRACE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "arbiter" / "home"))
    text = run("verify", "B", "leak.onnx", "--public-key", "seller.pem")
    assert text.exit_code == 0, text.stdout + text.stderr
    assert "verified" in text.stdout and "buyer-0002 (id 2)" in text.stdout and "FAIL" not in text.stdout
    # Nothing was created to verify: no registry in the folder, nothing in HOME.
    assert sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*")) == before
    assert not any((tmp_path / "arbiter" / "home").iterdir())


def test_receipt_signed_by_the_buyer_for_their_copy_is_recorded_and_carried_by_the_bundle(workdir, tmp_path):
    reg, out = workdir / "registry", workdir / "out"
    assert all((out / f"buyer-000{i}.receipt.json").is_file() for i in (1, 2, 3))
    receipt, key, ack = out / "buyer-0002.receipt.json", tmp_path / "buyer.key", out / "buyer-0002.ack.json"

    wrong = run("receipt", "sign", receipt, "--key", key, "--copy", out / "buyer-0001.safetensors")
    one_line_error(wrong)
    assert "sha256" in wrong.stderr and not ack.exists() and not key.exists()

    signed = run("receipt", "sign", receipt, "--key", key, "--copy", out / "buyer-0002.safetensors")
    assert signed.exit_code == 0, signed.stdout + signed.stderr
    assert ack.is_file() and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "buyer-0002 (id 2)" in signed.stdout
    buyer_seed = key.read_text().strip().lower()

    edited = tmp_path / "edited.ack.json"  # the acknowledgement changed after the buyer signed it
    doc = json.loads(ack.read_text())
    doc["at"] += 86400
    edited.write_text(json.dumps(doc))
    refused = run("receipt", "record", edited, registry=reg)
    one_line_error(refused)
    recorded = run("receipt", "record", ack, registry=reg)
    assert recorded.exit_code == 0, recorded.stdout + recorded.stderr
    assert "buyer-0002 (id 2)" in recorded.stdout
    with api.open_registry(reg) as r:
        logged = [e for e in r.audit_chain() if e["action"] == "acknowledged"]
    assert [e["detail"]["id"] for e in logged] == [2]  # the edited one left no entry

    bundle = tmp_path / "B"
    made = run("evidence", out / "buyer-0002.safetensors", "--out", bundle, registry=reg)
    assert made.exit_code == 0, made.stdout + made.stderr
    assert json.loads((bundle / "receipts" / "2.ack.json").read_text()) == json.loads(ack.read_text())
    assert run("keys", "export-public", "--out", tmp_path / "seller.pem", registry=reg).exit_code == 0
    v = run("verify", bundle, out / "buyer-0002.safetensors", "--public-key", tmp_path / "seller.pem", "--json")
    assert v.exit_code == 0, v.stdout + v.stderr
    checks = {c["name"]: c for c in json.loads(v.stdout)["checks"]}
    acks = checks["buyer acknowledgements"]
    assert acks["ok"] and "buyer 2: acknowledged" in acks["detail"]
    for r in (wrong, signed, refused, recorded, made, v):
        assert buyer_seed not in (r.stdout + r.stderr).lower()
    assert_no_secret(seller_seed(workdir), wrong, signed, refused, recorded, made, v)


def test_evidence_refuses_unmarked_models_and_used_folders(workdir, tmp_path, master_file, other_master_file):
    reg, here = workdir / "registry", tmp_path / "bundles"
    here.mkdir()
    for i, unmarked in enumerate((master_file, other_master_file)):
        dest = here / f"none-{i}"
        r = run("evidence", unmarked, "--out", dest, registry=reg)
        assert r.exit_code == 1, r.stdout + r.stderr
        assert "nobody is named" in r.stderr and "Traceback" not in r.stdout + r.stderr
        assert not dest.exists()
    assert list(here.iterdir()) == []  # no half-written bundle beside it either
    used = here / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    r = run("evidence", workdir / "out" / "buyer-0001.safetensors", "--out", used, registry=reg)
    one_line_error(r)
    assert [p.name for p in used.iterdir()] == ["notes.txt"] and (used / "notes.txt").read_text() == "mine"


def test_audit_verify_names_the_edited_entry(workdir):
    reg = workdir / "registry"
    ok = run("audit", "verify", registry=reg)
    assert ok.exit_code == 0 and "intact" in ok.stdout, ok.stdout + ok.stderr
    with api.open_registry(reg) as r:
        seq = next(e["seq"] for e in r.audit_chain() if e["action"] == "issue" and e["detail"]["id"] == 2)
    db = sqlite3.connect(reg / "wmtrace.db")
    with db:
        row = db.execute("SELECT detail FROM audit WHERE seq = ?", (seq,)).fetchone()
        detail = json.loads(row[0])
        detail["name"] = "someone-else"
        db.execute("UPDATE audit SET detail = ? WHERE seq = ?", (json.dumps(detail), seq))
    db.close()
    broken = run("audit", "verify", registry=reg)
    assert broken.exit_code == 1, broken.stdout + broken.stderr
    assert f"entry {seq}: edited" in broken.stdout
    js = run("audit", "verify", "--json", registry=reg)
    info = json.loads(js.stdout)
    assert js.exit_code == 1 and info["ok"] is False and any(p.startswith(f"entry {seq}:") for p in info["problems"])
    assert_no_secret(seller_seed(workdir), ok, broken, js)


def test_public_key_export_is_the_sellers_ed25519_key_and_never_its_seed(workdir, tmp_path):
    reg = workdir / "registry"
    seed = seller_seed(workdir)
    r = run("keys", "export-public", registry=reg)
    assert r.exit_code == 0, r.stdout + r.stderr
    key = load_pem_public_key(r.stdout.encode())
    assert isinstance(key, Ed25519PublicKey)
    mine = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed)).public_key()
    raw = (Encoding.Raw, PublicFormat.Raw)
    assert key.public_bytes(*raw) == mine.public_bytes(*raw)
    written = run("keys", "export-public", "--out", tmp_path / "seller.pem", registry=reg)
    assert written.exit_code == 0 and (tmp_path / "seller.pem").read_text() == r.stdout
    shown = run("audit", "show", "--json", "--limit", "100", registry=reg)
    assert shown.exit_code == 0
    assert_no_secret(seed, r, written, shown)
    assert seed not in (tmp_path / "seller.pem").read_text().lower()


def test_revoke_is_a_signed_entry_and_the_revoked_buyer_is_still_named(workdir):
    """A revocation ends a licence, not the buyer's responsibility for the copy they were sold."""
    reg = workdir / "registry"
    r = run("revoke", "buyer-0001", "--reason", "refund", "--json", registry=reg)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["id"] == 1
    one_line_error(run("revoke", "1", "--reason", "again", registry=reg))      # already revoked
    one_line_error(run("revoke", "buyer-9999", "--reason", "x", registry=reg))  # no such buyer
    one_line_error(run("revoke", "buyer-0002", "--reason", " ", registry=reg))  # no reason
    traced = json.loads(run("trace", workdir / "out" / "buyer-0001.safetensors", "--json", registry=reg).stdout)
    assert traced["buyer"]["id"] == 1 and traced["buyer"]["revoked"]["reason"] == "refund"
    rows = {b["id"]: b["revoked"] for b in json.loads(run("buyers", "--json", registry=reg).stdout)["buyers"]}
    assert rows[1]["reason"] == "refund" and rows[2] is None and rows[3] is None
    with api.open_registry(reg) as opened:
        assert opened.verify_chain()["ok"]
        assert [e["action"] for e in opened.audit_chain()].count("revoke") == 1
