"""wmtrace: give every buyer of a model a copy carrying its own hidden ID, and name the buyer
behind a leaked copy. The Python API lives in `wmtrace.api`; the CLI (`wmtrace`) is a thin layer over it."""

from .errors import BadInput, WmtraceError

__version__ = "0.1.0"
__all__ = ["BadInput", "WmtraceError", "__version__"]
