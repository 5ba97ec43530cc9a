"""Layer 5, the public API: DataSender, DataReceiver, DataSystem (``mindpandas.channel``
compatible).

Each class checks its arguments once, here, and delegates to a backend endpoint chosen by
``address``; what it adds to the reference is keyword-only.
"""

from .checks import MAX_NAME, PREFETCH
from .datasystem import DataSystem
from .receiver import DataReceiver
from .sender import DataSender

__all__ = ["MAX_NAME", "PREFETCH", "DataReceiver", "DataSender", "DataSystem"]
