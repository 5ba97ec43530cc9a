"""Layer 1: objects <-> (header bytes, large buffers), and row-wise splitting."""

from .codec import Serialized, deserialize, serialize
from .split import SUPPORTED, row_count, split, splittable

__all__ = ["Serialized", "deserialize", "SUPPORTED", "row_count", "serialize", "split", "splittable"]
