"""Who holds a reservation, and how a holder that died is noticed.

SQLite registries live on one machine: a reservation names its process ("host:pid") and a dead local
pid's reservations are taken over. A shared database is reached from many hosts, where a pid means
nothing: its reservations carry a lease, renewed by a daemon thread while the process lives
(`Heartbeat`), and taken over once it expires (a worker killed on another host: after at most one lease).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable

LEASE_SECONDS = 60.0  # a dead worker's IDs wait at most this long; renewed every quarter of it


def pid_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(owner: str | None) -> bool:
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname():
        return True  # cannot tell for another machine; leave it alone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def lease_owner() -> str:
    """host:pid:random, unique even when a pid is reused on a host."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def lease_seconds() -> float:
    """$WMTRACE_LEASE_SECONDS (tests shorten it) or 60 s."""
    try:
        return max(1.0, float(os.environ.get("WMTRACE_LEASE_SECONDS") or LEASE_SECONDS))
    except ValueError:
        return LEASE_SECONDS


class Heartbeat:
    """Calls `renew` every quarter lease on a daemon thread until stopped (or the process dies, which is
    the point: then the renewals stop and the lease runs out). A failed renewal is retried next beat."""

    def __init__(self, renew: Callable[[], None], lease: float):
        self.renew, self.interval = renew, lease / 4
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wmtrace-lease", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a database away for a moment: the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
