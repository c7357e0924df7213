"""The white-box scheme (weights): `scheme` is its seam, `extract` reads bits from located carriers."""

from .scheme import NAME, PLACEMENTS, Config, Marker, WhiteBox, check_options

__all__ = ["NAME", "PLACEMENTS", "Config", "Marker", "WhiteBox", "check_options"]
