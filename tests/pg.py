"""A real PostgreSQL server for the tests that need one, and a fresh database per test.

$WMTRACE_TEST_PG (a URL to a server where the role may CREATE DATABASE; CI starts one) is used when
set; otherwise a private throwaway cluster is made with initdb/pg_ctl (as the `postgres` user when run
as root: initdb refuses root) and stopped at the end; with neither, the tests are skipped, saying why.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

BINDIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin")


def _bin(name: str) -> str | None:
    for d in BINDIRS:
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    return shutil.which(name)


def _as_owner(cmd: list[str], user: str | None) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_cluster(folder: Path) -> tuple[str, list[str]]:
    """Start a cluster under `folder`; (server URL, the command that stops it)."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise RuntimeError("no initdb/pg_ctl found")
    user = "postgres" if os.geteuid() == 0 else None
    if user:
        shutil.chown(folder, user)
    data, port = folder / "data", _free_port()
    run = lambda cmd: subprocess.run(_as_owner(cmd, user), check=True, capture_output=True, timeout=120)  # noqa: E731
    run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
    run([pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
         f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start"])
    return f"postgresql://postgres@127.0.0.1:{port}/postgres", _as_owner([pg_ctl, "-D", str(data), "-m", "fast",
                                                                           "stop"], user)


@pytest.fixture(scope="session")
def pg_server():
    """The server's URL (its maintenance database)."""
    url = os.environ.get("WMTRACE_TEST_PG")
    if url:
        yield url
        return
    folder = Path(tempfile.mkdtemp(prefix="wmtrace-pg-"))
    try:
        url, stop = _private_cluster(folder)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"no PostgreSQL: WMTRACE_TEST_PG is unset and a private cluster could not start ({e})")
    try:
        yield url
    finally:
        subprocess.run(stop, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def database_url(server: str, name: str) -> str:
    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def _admin(server: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(server, autocommit=True) as c:
        c.execute(sql)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the server, dropped after the test."""
    name = f"wmtrace_test_{secrets.token_hex(6)}"
    _admin(pg_server, f"CREATE DATABASE {name}")
    try:
        yield database_url(pg_server, name)
    finally:
        _admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def kek(tmp_path, monkeypatch) -> bytes:
    """A key-encryption key in a 0600 file, named by $WMTRACE_KEK_FILE for this test (and its subprocesses)."""
    key = os.urandom(32)
    path = tmp_path / "kek"
    path.write_text(key.hex() + "\n")
    path.chmod(0o600)
    monkeypatch.setenv("WMTRACE_KEK_FILE", str(path))
    monkeypatch.delenv("WMTRACE_KEK", raising=False)
    return key
