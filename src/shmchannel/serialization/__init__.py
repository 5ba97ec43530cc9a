"""Layer 1: objects <-> (header bytes, large buffers), and row-wise splitting."""

from .codec import Serialized, deserialize, serialize
from .split import row_count, split

__all__ = ["Serialized", "deserialize", "row_count", "serialize", "split"]
