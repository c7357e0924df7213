"""`wmtrace` command line: a thin layer over the Python API (`wmtrace.api`), one module per command."""

from .main import app, main

__all__ = ["app", "main"]
