"""`issue --ray`: buyer copies issued by Ray actors, each holding the master once.

The driver reserves the IDs (so a killed driver's reservations are taken over by the next run, as in
one process), then hands buyers one at a time to actors, two in flight each so that none waits for the
driver. Each actor opens the registry from its location, builds one `_Run` (the master, markers,
held-out outputs: the load a single process pays once), and per buyer marks, measures, self-traces,
writes and completes the reservation itself. An actor that dies (its process or node killed) has its
unfinished buyers handed to the others: a buyer it wrote but did not complete is marked again with the
same seed, so the same bytes are written again, and completed once; one it completed but could not
report is found issued and not redone.

Workers write to the output folder and open the registry by path: on more than one host both must be
on a shared disk mounted at the same path (a registry URL needs no disk). Ray is imported here only,
and this module only when `issue` is asked for Ray.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

from .. import failpoint, registry
from ..errors import BadArgument, BadInput, InternalError, WmtraceError, first_line
from ..registry import Buyer, Master, RegistryBackend

# Buyers queued per actor: the next is waiting when one finishes, and a dead actor strands at most two.
IN_FLIGHT = 2
# Actors started to replace dead ones before the run gives up (per actor asked for).
RESPAWNS = 2
CONNECT_TIMEOUT_S = 5.0
# The driver's settings that actors need to open a PostgreSQL registry, forwarded to them: the KEK
# file's path (the file itself on a shared disk). An inline $WMTRACE_KEK is a secret, never sent
# through Ray: set it on each node instead.
FORWARDED_ENV = ("WMTRACE_KEK_FILE",)
STOP_TIMEOUT_S = 30.0


def check(address: str | bool, workers: int | None) -> None:
    """Refuse, before the registry is touched, a Ray that is not installed, an address that does not
    answer (Ray itself retries an unreachable address for minutes) and a worker count below 1."""
    if workers is not None and workers < 1:
        raise BadArgument("ray_workers", "must be at least 1")
    if importlib.util.find_spec("ray") is None:
        raise BadInput("Ray is not installed: pip install 'wmtrace[ray]'")
    if address is True or address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"Ray address {address!r}: expected HOST:PORT (the head node's GCS port, 6379 by default)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise BadInput(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from e


def issue_on_ray(
    reg: RegistryBackend, m: Master, wanted: list[str | None], out: Path, address: str | bool, make_run: Callable, *,
    seed: int | None = None, eval_samples: int | None = None, progress: Callable | None = None,
    workers: int | None = None,
) -> list[Buyer]:
    """Issue `wanted` (names, None for generated ones) of master `m` on the Ray cluster at `address`
    (True or "auto": `ray.init()`, which joins $RAY_ADDRESS or the cluster last started here, else
    starts one; "local": a new one here; else HOST:PORT);
    `workers` actors (one per CPU of the cluster by default), each holding `make_run(reg, m, eval_samples)`
    (`issue._Run`, handed in so that this module needs nothing of `issue`). Returns the buyers in ID order."""
    check(address, workers)
    import ray

    started = not ray.is_initialized()
    if started:
        target = None if address in (True, "auto") else address
        try:
            ray.init(address=target, logging_level=logging.ERROR, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - Ray's own (ConnectionError, AuthenticationError, ...)
            raise BadInput(f"cannot join the Ray cluster at {address}: {first_line(e)}") from e
    out = out.resolve()  # as every node reads it: the driver's working folder is not theirs
    token = out / f".wmtrace-ray-{secrets.token_hex(8)}"
    try:
        token.touch(mode=0o600)
        reserved = reg.reserve(m.name, wanted)
        failpoint.reached("issue:reserved")
        if not reserved:
            return []
        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        fleet = _Fleet(ray, (_location(reg), m.name, reg.fingerprint(m.name), str(out), token.name, eval_samples,
                             make_run))
        try:
            done = fleet.run(reserved, min(n, len(reserved)), seed, progress)
        except BaseException:
            fleet.stop()  # nothing completes after the release below
            ids = {b.id for b in fleet.done}
            reg.release(m.name, [b.id for b in reserved if b.id not in ids])
            raise
        fleet.stop()
        return sorted(done, key=lambda b: b.id)
    finally:
        token.unlink(missing_ok=True)
        if started:
            ray.shutdown()


def _location(reg: RegistryBackend) -> str:
    """What a worker opens the registry from: a folder, or the database URL (with its password, handed
    to the actors in memory, never logged; a URL without one makes each node use its own PGPASSWORD or
    ~/.pgpass)."""
    return str(getattr(reg, "url", None) or Path(reg.root).resolve())


class _Worker:
    """One Ray actor: the master loaded once, then one buyer per call. Errors come back as values, so
    that a bad buyer reaches the driver as the same `WmtraceError` a single process raises, and a Ray
    actor error always means the process died."""

    def __init__(self, location: str, master: str, fingerprint: str | None, out: str, token: str,
                 eval_samples: int | None, make_run: Callable):
        self.error: BaseException | None = None
        self.out = Path(out)
        start = time.perf_counter()
        try:
            if not (self.out / token).is_file():
                raise BadInput(f"{out}: the output folder is not the driver's on Ray node {socket.gethostname()}; "
                               "issuing on several hosts needs a shared disk mounted at the same path")
            self.reg = registry.open(location)
            if self.reg.fingerprint(master) != fingerprint:
                raise BadInput(f"{registry.mask(location)}: not the driver's registry on Ray node "
                               f"{socket.gethostname()} (another master key); use a shared disk or a registry URL")
            self.run = make_run(self.reg, self.reg.master(master), eval_samples)
        except Exception as e:  # noqa: BLE001 - handed to the driver, which raises it
            self.error = _portable(e)
        self.load_s = time.perf_counter() - start

    def issue(self, b: Buyer, seed: int | None) -> Buyer | BaseException:
        if self.error is not None:
            return self.error
        try:
            row = self.reg.buyer(b.master, b.id)
            if row is None or row.name != b.name:
                raise InternalError(f"buyer {b.id} of master {b.master!r}: its reservation is gone")
            if row.status != "issued":  # else completed by an actor that died before it could report
                self.run.one(b, self.out, seed if seed is not None else b.id, None)
                failpoint.reached("issue:written")
                self._complete(b)
                failpoint.reached("issue:completed")
            else:
                b = row
            b.extra["worker"] = {"pid": os.getpid(), "host": socket.gethostname(), "load_s": self.load_s}
            return b
        except Exception as e:  # noqa: BLE001 - handed to the driver, which raises it
            return _portable(e)

    def _complete(self, b: Buyer) -> None:
        """Complete `b`; one already completed with the same file (by an actor thought dead) is done."""
        try:
            self.reg.complete(b)
        except BadInput:
            row = self.reg.buyer(b.master, b.id)
            if row is None or row.status != "issued" or row.sha256 != b.sha256:
                raise


def _portable(e: Exception) -> Exception:
    """What an actor hands the driver for `e`: a `WmtraceError` as it is (each pickles as its arguments:
    `BadArgument.__reduce__`), anything else as an InternalError naming its type and message, which
    Ray can always carry back (a third-party exception may not survive pickling)."""
    return e if isinstance(e, WmtraceError) else InternalError(f"{type(e).__name__}: {e}")


class _Fleet:
    """The actors of one run and the buyers in flight on each."""

    def __init__(self, ray, args: tuple):
        self.ray = ray
        self.cls = ray.remote(num_cpus=1, max_restarts=0)(_Worker)
        forwarded = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        if forwarded:
            self.cls = self.cls.options(runtime_env={"env_vars": forwarded})
        self.args = args  # `_Worker`'s
        self.actors: list = []
        self.inflight: dict = {}  # ObjectRef -> (actor, buyer)
        self.done: list[Buyer] = []

    def _spawn(self) -> None:
        self.actors.append(self.cls.remote(*self.args))

    def run(self, reserved: list[Buyer], n: int, seed: int | None, progress: Callable | None) -> list[Buyer]:
        ray = self.ray
        dead = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)
        queue = collections.deque(reserved)
        for _ in range(n):
            self._spawn()
        respawns = RESPAWNS * n
        while queue or self.inflight:
            self._fill(queue, seed)
            if not self.inflight:  # every actor died with buyers left
                if respawns == 0:
                    raise WmtraceError(f"every Ray worker died ({len(queue)} buyers not issued; their "
                                       "reservations are released): see the Ray logs, then run again")
                respawns -= 1
                self._spawn()
                continue
            (ref,), _ = ray.wait(list(self.inflight), num_returns=1)
            actor, b = self.inflight.pop(ref)
            try:
                result = ray.get(ref)
            except dead:
                self._drop(actor)
                b.extra["redispatched"] = b.extra.get("redispatched", 0) + 1
                queue.appendleft(b)
                continue
            if isinstance(result, BaseException):
                raise result
            self.done.append(result)
            if progress is not None:
                progress(len(self.done), len(reserved), 1, 1, result.margin)
        return self.done

    def _fill(self, queue: collections.deque, seed: int | None) -> None:
        load = collections.Counter(id(a) for a, _ in self.inflight.values())
        for actor in self.actors:
            while queue and load[id(actor)] < IN_FLIGHT:
                b = queue.popleft()
                self.inflight[actor.issue.remote(b, seed)] = (actor, b)
                load[id(actor)] += 1

    def _drop(self, actor) -> None:
        """Forget a dead (or unreachable) actor; killed to be sure it completes nothing more."""
        if actor in self.actors:
            self.actors.remove(actor)
            self.ray.kill(actor, no_restart=True)

    def stop(self) -> None:
        """Kill every actor, and wait (boundedly) until their calls have ended: after a failure the driver
        releases the reservations left, which no actor may complete afterwards."""
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors.clear()
        if self.inflight:
            self.ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=STOP_TIMEOUT_S)
