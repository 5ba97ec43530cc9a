"""The zero-copy objects a process holds through one connection, and their releases.

An array a DataSystem get returns views the broker's arena; the broker reuses its block
only once every process viewing it has released it. A release comes from a finalizer (``weakref.finalize``
on the array), which may run in any thread at any allocation -- including inside the
connection's own code, in the same thread. So a release is only queued here, never
written: the connection's writer thread writes the queued releases in front of its next
frame (a release queues an empty one to wake it); a release is never lost, never
interleaved into another frame, and never deadlocks.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from . import protocol

#: Most keys one release frame names: finalizers may queue thousands at once, and a frame
#: must stay within ``protocol.MAX_JSON`` (about 26 bytes a key).
RELEASE_BATCH = 4096


class Holds:
    """How many objects are held, and the keys released but not yet told to the broker."""

    def __init__(self) -> None:
        self._keys: collections.deque[str] = collections.deque()
        self._count = 0
        self._lock = threading.Lock()  # finalizers of other threads release concurrently

    @property
    def count(self) -> int:
        return self._count

    def hold(self) -> None:
        with self._lock:
            self._count += 1

    def release(self, key: str) -> None:
        with self._lock:
            self._count -= 1
        self._keys.append(key)

    def clear(self) -> None:
        with self._lock:
            self._count = 0

    def pending(self) -> bool:
        return bool(self._keys)

    def frame(self) -> list[Any]:
        """A frame releasing queued keys, at most RELEASE_BATCH (the caller writes it)."""
        keys: list[str] = []
        while self._keys and len(keys) < RELEASE_BATCH:
            keys.append(self._keys.popleft())
        return protocol.encode({"op": "release", "keys": keys})
