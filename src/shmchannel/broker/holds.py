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
from typing import Any

from . import protocol

#: Most keys one release frame names: finalizers may queue thousands at once, and a frame
#: must stay within ``protocol.MAX_JSON`` (about 26 bytes a key).
RELEASE_BATCH = 4096


class Holds:
    """How many objects are held, and the keys released but not yet told to the broker."""

    def __init__(self) -> None:
        self._keys: collections.deque[str] = collections.deque()
        # One item per hold: append and pop are single C steps, so no lock -- a lock here
        # could be held by the main thread as a signal handler's request waits for the
        # reader thread, which counts that request's hold (a deadlock a test found).
        self._held: list[None] = []

    @property
    def count(self) -> int:
        return len(self._held)

    def hold(self) -> None:
        self._held.append(None)

    def release(self, key: str) -> None:
        try:
            self._held.pop()
        except IndexError:
            pass  # (counted as gone already: ``clear``)
        self._keys.append(key)

    def clear(self) -> None:
        self._held.clear()

    def pending(self) -> bool:
        return bool(self._keys)

    def frame(self) -> list[Any]:
        """A frame releasing queued keys, at most RELEASE_BATCH (the caller writes it)."""
        keys: list[str] = []
        while self._keys and len(keys) < RELEASE_BATCH:
            keys.append(self._keys.popleft())
        return protocol.encode({"op": "release", "keys": keys})
