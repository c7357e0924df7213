"""The HTTP transport every endpoint target shares: one pooled client, bounded retries, batches sent
concurrently and reassembled in order, and failures as one line that names the endpoint.

A tracer talks to servers it does not run: they may be down, slow, overloaded or hostile. So every
request has a timeout; connection errors, timeouts, 429 and 5xx are retried a bounded number of times
with exponential backoff and jitter (the whole backoff capped, so a dead endpoint fails in seconds,
not minutes); everything else fails at once. Messages show the URL without credentials or query
string, and never a request header: a bearer token (`$WMTRACE_TARGET_TOKEN`) is sent, never shown.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..errors import TargetFailed

TOKEN_ENV = "WMTRACE_TARGET_TOKEN"  # sent as "Authorization: Bearer ..." when set
BACKOFF_BASE = 0.1  # seconds before the first retry, doubled each time, with full jitter
BACKOFF_TOTAL = 4.0  # at most this many seconds of backoff in one request, however many retries
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

T = TypeVar("T")
R = TypeVar("R")


def public_url(url: str) -> str:
    """`url` as reports may show it: no user, password, query string or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _excerpt(text: str, limit: int = 120) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 3] + "..."


def _cause(e: httpx.TransportError) -> str:
    text = str(e).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service" in text or "nodename" in text or "getaddrinfo" in text or "resolve" in text:
        return "host not found"
    if "reset" in text:
        return "connection reset"
    return type(e).__name__


class Transport:
    """A pooled httpx client for one endpoint, and a thread pool of `concurrency` workers. Thread
    safe: `post_json` may be called from the pool's threads at once (httpx clients are)."""

    def __init__(self, url: str, *, timeout: float, retries: int, concurrency: int) -> None:
        self.url, self.name = url, public_url(url)
        self.timeout, self.retries = timeout, retries
        headers = {"Accept": "application/json"}
        if os.environ.get(TOKEN_ENV):
            headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
        self.client = httpx.Client(
            # trust_env=False: no proxy or .netrc credentials picked up from the environment behind our back
            timeout=httpx.Timeout(timeout), headers=headers, follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="wmtrace-target")
        self.lock = threading.Lock()

    def request(self, method: str, url: str, body: Any = None, *, retry_status: bool = True) -> httpx.Response:
        """The response to one request, retried on connection errors, timeouts (and, with
        `retry_status`, 429 and 5xx). Raises `TargetFailed` once the tries or the backoff run out."""
        tries, slept, delay = 0, 0.0, BACKOFF_BASE
        while True:
            tries += 1
            failure: str
            try:
                r = self.client.request(method, url, json=body)
            except httpx.TimeoutException:
                failure = f"timed out after {self.timeout:g} s"
            except httpx.TransportError as e:
                failure = _cause(e)
            else:
                if not (retry_status and r.status_code in RETRY_STATUS):
                    return r
                failure = f"HTTP {r.status_code}: {_excerpt(r.text) or r.reason_phrase}"
                retry_after = r.headers.get("retry-after", "")
                if retry_after.isdigit():
                    delay = max(delay, float(retry_after))
            pause = random.uniform(delay / 2, delay)
            if tries > self.retries or slept + pause > BACKOFF_TOTAL:
                raise TargetFailed(f"{self.name}: {failure} after {tries} {'try' if tries == 1 else 'tries'}")
            time.sleep(pause)
            slept, delay = slept + pause, delay * 2

    def post_json(self, url: str, body: Any) -> Any:
        """The JSON answer to a POST; an HTTP error or a body that is not JSON raises `TargetFailed`."""
        return self.json(self.request("POST", url, body))

    def json(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            raise TargetFailed(f"{self.name}: HTTP {r.status_code}: {_excerpt(r.text) or r.reason_phrase}")
        if r.status_code >= 300:
            raise TargetFailed(f"{self.name}: HTTP {r.status_code} (redirects are not followed)")
        try:
            return r.json()
        except ValueError:
            raise TargetFailed(f"{self.name}: answer is not JSON: {_excerpt(r.text, 60)!r}") from None

    def probe(self, url: str) -> httpx.Response | None:
        """GET `url` once to learn what the server declares; None if it answers with an error status
        (many servers lack the optional endpoint). Unreachable or silent servers fail here, early."""
        r = self.request("GET", url, retry_status=False)
        return r if r.status_code < 300 else None

    def map(self, fn: Callable[[T], R], chunks: Sequence[T]) -> list[R]:
        """`fn` over `chunks` on the pool, results in the order of `chunks`; the first failure is
        raised and the requests not yet started are cancelled."""
        if len(chunks) <= 1:
            return [fn(c) for c in chunks]
        futures = [self.pool.submit(fn, c) for c in chunks]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in futures:
            if f in done and f.exception() is not None:
                wait(pending)
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]

    def count(self, target: Any, n: int) -> None:
        """Add `n` answered inputs to `target.queries`, from any thread."""
        with self.lock:
            target.queries += n

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()


def chunks(n: int, batch: int) -> list[slice]:
    """Consecutive slices of at most `batch` of `range(n)`."""
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]
