"""Current rates of a channel's counters (objects and bytes sent and received per second),
shared by both brokers: the embedded one (records.py) and the Ray channel actor.

Design: each change adds its amounts to the bucket of the current second, and a rate is
the sum of the buckets of the last ``WINDOW`` seconds divided by the time they cover. A
change costs a clock read and a few additions; nothing runs between changes, so an idle
broker never wakes up for this, and a stream that stops reads 0 once its last second has
left the window. Rejected: sampling the cumulative counters from a timer once a second --
it wakes the broker every second while any channel exists, busy or not, for the same
one-second resolution.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Sequence

#: Seconds of recent history a rate averages over.
WINDOW = 5

#: What every channel counts, in the order ``Rates.add`` takes them.
CHANNEL_COUNTERS = ("sent_objects", "sent_bytes", "received_objects", "received_bytes")


class Rates:
    """Per-second sums of a few counters over the last ``window`` whole seconds."""

    __slots__ = ("names", "window", "_clock", "_start", "_buckets")

    def __init__(
        self, names: Sequence[str] = CHANNEL_COUNTERS, window: int = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be an int >= 1 (seconds), got {window!r}")
        self.names = tuple(names)
        self.window = window
        self._clock = clock
        self._start = clock()
        # [second, amount per name]; older seconds fall off the left end.
        self._buckets: deque[list[int]] = deque(maxlen=window)

    def add(self, *amounts: int) -> None:
        """Count ``amounts`` (one per name, negative to take back) as happening now."""
        second = int(self._clock())
        buckets = self._buckets
        if not buckets or buckets[-1][0] != second:
            buckets.append([second] + [0] * len(self.names))
        bucket = buckets[-1]
        for i, amount in enumerate(amounts, 1):
            bucket[i] += amount

    def per_second(self) -> dict[str, float]:
        """Each counter's rate over the window (or the time since creation, if shorter);
        never negative (amounts taken back can outweigh a quiet window)."""
        now = self._clock()
        first = int(now) - self.window + 1  # the oldest whole second still in the window
        span = now - max(first, self._start)
        totals = [0] * len(self.names)
        for bucket in self._buckets:
            if bucket[0] >= first:
                for i in range(len(totals)):
                    totals[i] += bucket[i + 1]
        return {name: max(0.0, total / span) if span > 0 else 0.0 for name, total in zip(self.names, totals)}
