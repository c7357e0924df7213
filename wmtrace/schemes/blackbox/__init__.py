"""The black-box scheme (answers): `scheme` is its seam; `queries`, `edit` and `read` its three steps."""

from .scheme import NAME, BlackBox, Config, Plan

__all__ = ["NAME", "BlackBox", "Config", "Plan"]
