"""The output-image scheme (`scheme.Images`): marks in every image an image-to-image copy produces."""

from .scheme import NAME, Config, Images

__all__ = ["NAME", "Config", "Images"]
