"""Backup and restore: the key is the one thing that must never be lost, so a backup must be
complete, consistent while copies are being issued, private (0700/0600), free of key bytes in
what it prints, and a restore must never overwrite a key nor install a damaged backup."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wmtrace.coding import keys
from wmtrace.registry import Registry
from wmtrace.registry.backup import backup, restore

from .test_cli import run, snapshot


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def assert_private(root: Path) -> None:
    for rel, mode in modes(root).items():
        want = 0o700 if (root / rel).is_dir() else 0o600
        assert mode == want, (rel, oct(mode))


def one_error_line(r) -> str:
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.output
    return lines[0]


def traced_ids(reg: Path, buyers: list[dict]) -> list[int | None]:
    ids = []
    for b in buyers:
        r = run("trace", b["file"], "--json", registry=reg)
        ids.append(json.loads(r.stdout)["buyer"]["id"] if r.exit_code == 0 else None)
    return ids


def test_backup_then_restore_traces_every_copy(workdir, tmp_path):
    reg = workdir / "registry"
    secret = (reg / "keys" / "small.key").read_text().strip()
    before = snapshot(reg)
    dest = tmp_path / "safe" / "backup-1"
    t0 = time.perf_counter()
    r = run("registry", "backup", dest, "--json", registry=reg)
    took = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert snapshot(reg) == before, "a backup must not change the registry"
    assert [m["name"] for m in info["masters"]] == ["small"] and info["buyers"] == 3
    assert info["masters"][0]["key_fingerprint"] == keys.fingerprint(bytes.fromhex(secret))
    assert sorted(p.name for p in dest.iterdir()) == ["backup.json", "keys", "masters", "seller.key", "wmtrace.db"]
    assert {f["path"] for f in info["files"]} == {"wmtrace.db", "keys/small.key", "masters/small.safetensors",
                                                  "masters/small.moments.safetensors", "seller.key"}
    with Registry(reg) as live:
        assert info["seller"] == live.public_key().fingerprint
    assert_private(dest)
    assert not list(dest.parent.glob(".*")), "no staging folder left behind"
    print(f"backup of the test registry: {info['bytes']} bytes, {len(info['files'])} files, {took:.2f} s")

    restored = tmp_path / "restored" / "registry"
    r = run("registry", "restore", dest, "--json", registry=restored)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["registry"] == str(restored) and d["buyers"] == 3 and d["masters"] == info["masters"]
    assert d["seller"] == info["seller"]
    assert (restored / "seller.key").read_bytes() == (reg / "seller.key").read_bytes()
    with Registry(restored) as again:  # the restored registry signs on, as the same seller, in the same chain
        again.log_event("restored", None)
        check = again.verify_chain()
        assert check["ok"] and check["seller"] == info["seller"], check
    assert_private(restored)
    assert not (restored / "cache").exists() and not (restored / "backup.json").exists()
    # Every issued copy traces to its buyer against the restored registry alone.
    buyers = json.loads(run("buyers", "--json", registry=restored).stdout)["buyers"]
    assert len(buyers) == 3
    assert traced_ids(restored, buyers) == [b["id"] for b in buyers]


def test_no_key_bytes_in_manifest_or_output(workdir, tmp_path):
    reg = workdir / "registry"
    secret = (reg / "keys" / "small.key").read_text().strip()
    outputs = []
    for i, extra in enumerate(([], ["--json"])):
        r = run("registry", "backup", tmp_path / f"b{i}", *extra, registry=reg)
        assert r.exit_code == 0, r.output
        outputs.append(r.output)
        r = run("registry", "restore", tmp_path / f"b{i}", *extra, registry=tmp_path / f"r{i}")
        assert r.exit_code == 0, r.output
        outputs.append(r.output)
    assert "backed up" in outputs[0] and "restored" in outputs[1]
    manifest = (tmp_path / "b0" / "backup.json").read_text()
    seller = (reg / "seller.key").read_text().strip()
    for text in [*outputs, manifest]:
        assert secret not in text and secret[:16] not in text and secret.upper()[:16] not in text
        assert seller[:16] not in text and seller.upper()[:16] not in text
    assert bytes.fromhex(secret) not in (tmp_path / "b0" / "backup.json").read_bytes()


def test_backup_while_another_process_issues_is_consistent(workdir, tmp_path):
    reg = workdir / "registry"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "wmtrace", "issue", "--buyers", "3", "--json", "--registry", str(reg),
           "--out", str(workdir / "more")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        with Registry(reg) as r:  # wait until the other process has reserved its IDs
            deadline = time.monotonic() + 240
            while not r.buyers(status="reserved") and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        taken, during = [], []
        while proc.poll() is None and len(taken) < 60:
            dest = tmp_path / f"b{len(taken)}"
            with Registry(reg) as r:
                backup(r, dest)
            taken.append(dest)
            during.append(proc.poll() is None)
            time.sleep(0.2)
        out, errs = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, errs
    assert any(during), "no backup overlapped the issuing process"
    taken.append(tmp_path / "after")
    with Registry(reg) as r:
        backup(r, taken[-1])
    counts = []
    for dest in taken:
        with Registry(dest) as r:  # opens: a consistent database with our schema
            issued = r.buyers()
            counts.append(len(issued))
            for b in issued:
                assert b.sha256 and len(b.sha256) == 64 and b.file, (dest, b)
            assert all(b.sha256 is None for b in r.buyers(status="reserved"))
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] < 6, counts
    print(f"{len(taken) - 1} backups while issuing; issued buyers in them: {counts}")
    # A backup taken mid-run restores and traces every copy it lists as issued.
    last_mid = max(i for i, c in enumerate(counts) if c < 6)  # the latest backup that caught the run midway
    restored = tmp_path / "restored"
    restore(taken[last_mid], restored)
    buyers = json.loads(run("buyers", "--json", registry=restored).stdout)["buyers"]
    assert len(buyers) == counts[last_mid]
    assert traced_ids(restored, buyers) == [b["id"] for b in buyers]
    json.loads(out)  # the issuing process finished normally, JSON intact


def test_restore_refuses_a_target_holding_keys(workdir, tmp_path):
    reg = workdir / "registry"
    dest = tmp_path / "b"
    assert run("registry", "backup", dest, registry=reg).exit_code == 0
    # The live registry itself, and a folder with only someone's key in it.
    lone = tmp_path / "lone"
    keys.write(lone / "keys" / "small.key", keys.generate())
    for target in (reg, lone):
        before = snapshot(target)
        line = one_error_line(run("registry", "restore", dest, registry=target))
        assert "already holds a registry" in line and "never overwrites" in line
        assert snapshot(target) == before
    # A non-empty folder that is not a registry is refused too; an empty one is filled.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not empty" in one_error_line(run("registry", "restore", dest, registry=other))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    info = restore(dest, empty)
    assert info["buyers"] == 3
    assert (empty / "keys" / "small.key").read_bytes() == (reg / "keys" / "small.key").read_bytes()
    assert_private(empty)


def _replace_key(b: Path) -> None:
    (b / "keys" / "small.key").unlink()
    keys.write(b / "keys" / "small.key", keys.generate())


def _flip_weights(b: Path) -> None:
    data = bytearray((b / "masters" / "small.safetensors").read_bytes())
    data[-1] ^= 1
    (b / "masters" / "small.safetensors").write_bytes(bytes(data))


def _flip_moments(b: Path) -> None:
    data = bytearray((b / "masters" / "small.moments.safetensors").read_bytes())
    data[-1] ^= 1
    (b / "masters" / "small.moments.safetensors").write_bytes(bytes(data))


def _drop_key(b: Path) -> None:
    (b / "keys" / "small.key").unlink()


def _replace_seller(b: Path) -> None:
    (b / "seller.key").unlink()
    keys.write(b / "seller.key", keys.generate())


def _drop_seller(b: Path) -> None:
    (b / "seller.key").unlink()


@pytest.mark.parametrize("tamper, says", [
    (_replace_key, "fingerprint"), (_flip_weights, "sha256 differs from the registered weights"),
    (_flip_moments, "sha256 differs from the backup manifest"), (_drop_key, "missing from the backup"),
    (_replace_seller, "not the key the registry's audit log was started with"),
    (_drop_seller, "missing from the backup"),
])
def test_restore_refuses_a_tampered_backup(workdir, tmp_path, tamper, says):
    dest = tmp_path / "b"
    assert run("registry", "backup", dest, registry=workdir / "registry").exit_code == 0
    tamper(dest)
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (tmp_path / "new", empty):
        line = one_error_line(run("registry", "restore", dest, registry=target))
        assert says in line, line
    assert not (tmp_path / "new").exists() and not any(empty.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "empty", "w"], "no staging folder left behind"


def test_backup_refuses_a_non_empty_dest(workdir, tmp_path):
    reg = workdir / "registry"
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("keep me")
    line = one_error_line(run("registry", "backup", dest, registry=reg))
    assert "not empty" in line
    assert [p.name for p in dest.iterdir()] == ["old.txt"] and (dest / "old.txt").read_text() == "keep me"
    # A backup already there is not overwritten either; inside the registry is refused; an empty folder works.
    assert run("registry", "backup", tmp_path / "b", registry=reg).exit_code == 0
    before = snapshot(tmp_path / "b")
    assert "not empty" in one_error_line(run("registry", "backup", tmp_path / "b", registry=reg))
    assert snapshot(tmp_path / "b") == before
    assert "inside the registry" in one_error_line(run("registry", "backup", reg / "bk", registry=reg))
    assert not (reg / "bk").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with Registry(reg) as r:
        info = backup(r, empty)
    assert info["buyers"] == 3 and (empty / "backup.json").exists()
    assert_private(empty)
    assert "no wmtrace registry" in one_error_line(run("registry", "backup", tmp_path / "x",
                                                       registry=tmp_path / "none"))
    assert "not a wmtrace registry backup" in one_error_line(run("registry", "restore", dest,
                                                                 registry=tmp_path / "r"))
