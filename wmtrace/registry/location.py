"""Where a registry lives: a folder (SQLite) or a PostgreSQL URL, and how a URL is shown.

A URL may carry a password (`postgresql://user:secret@host/db`); everything the user or the audit log
sees goes through `mask`, so the password is never printed, logged or stored in a registry.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def default_location() -> str:
    """$WMTRACE_REGISTRY (a folder or a URL) or ./registry."""
    return os.environ.get("WMTRACE_REGISTRY") or str(Path.cwd() / "registry")


def is_postgres(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and location.lower().startswith(POSTGRES_SCHEMES)


def is_url(location: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def mask(location: str | os.PathLike) -> str:
    """`location` with any password replaced by `***` (in the user part or a `password=` parameter)."""
    text = str(location)
    if not is_url(text):
        return text
    try:
        parts = urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, host = netloc.rpartition("@")
            if ":" in user:
                user = user.split(":", 1)[0] + ":***"
            netloc = f"{user}@{host}"
        query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return text.split("://", 1)[0] + "://***"
