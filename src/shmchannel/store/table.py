"""The object table: key -> stored object, reference counts, memory accounting.

Pure bookkeeping (the broker calls it; it touches no user data). It holds the DataSystem's
objects: an object's ``refs`` is one while its key pins it, plus one for each view of it
in the arena a client holds (a ``get`` whose array it has not released). The memory
returns to the allocator exactly when ``refs`` drops to zero.

One capacity bounds every byte the broker keeps for users (issue 13): arena blocks, and the
bytes of inline objects, which live in the broker's own memory, each counted as an arena
block of its size would be (``align``). Counting inline bytes against the arena's capacity,
rather than a budget of their own, keeps one number to configure and one ``StoreFull`` for
both kinds; the arena then may have blocks free that no one can take, which costs address
space, not pages.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import StoreFull
from .allocator import Allocator, align


@dataclass
class StoredObject:
    key: str
    size: int
    offset: int = -1  # arena offset; -1 when the blob is kept inline
    inline: bytes | None = None
    refs: int = 0
    loan_pid: int = 0  # a sender's loan (issue 15): its process; journaled, so a next broker keeps it

    def describe(self) -> dict[str, Any]:
        """Where the object is, as a get's reply carries it: its ``offset`` in the arena,
        or ``inline`` [start, length] of the payload that goes with the reply."""
        if self.inline is not None:
            return {"key": self.key, "size": self.size, "inline": [0, len(self.inline)]}
        return {"key": self.key, "size": self.size, "offset": self.offset}


@dataclass(frozen=True)
class StoreStats:
    """Usage of the shared-memory store.

    Attributes:
        capacity: bytes the store may hold, in the arena and inline together.
        used: bytes the store holds: arena blocks (objects, allocations being written,
            senders' slabs), and inline objects (each rounded up to 64 bytes, as an arena
            block would be).
        free: ``capacity - used`` (0 if a recovered broker's objects take more).
        reserved: bytes of the arena backed by /dev/shm pages so far (never shrinks).
        objects: objects stored (in the arena or inline).
        inline_bytes: bytes of small objects kept in the broker's memory instead of the
            arena (counted in ``used``).

    Example::

        with DataSystem() as ds:
            stats = ds.stats()
            print(f"{stats.used / stats.capacity:.0%} of the store in use, {stats.objects} objects")
    """

    capacity: int
    used: int
    free: int
    reserved: int
    objects: int
    inline_bytes: int


class ObjectTable:
    def __init__(self, capacity: int, reserve: Callable[[int], None], key_prefix: str) -> None:
        self.allocator = Allocator(capacity)
        self._reserve = reserve
        self._objects: dict[str, StoredObject] = {}
        self._keys = (f"{key_prefix}{n:x}" for n in itertools.count(1))
        self.inline_bytes = 0
        self.inline_charged = 0  # inline_bytes, each object's rounded up (``charge``)

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, key: object) -> bool:
        return key in self._objects

    def get(self, key: str) -> StoredObject | None:
        return self._objects.get(key)

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    @property
    def used(self) -> int:
        """Bytes held: arena blocks and inline objects (module docstring)."""
        return self.allocator.used + self.inline_charged

    @property
    def free(self) -> int:
        return self.allocator.capacity - self.used

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more (counted with ``charge``) fit now (nothing always does:
        recovered objects may have taken ``free`` below zero)."""
        return nbytes <= 0 or nbytes <= self.free

    def check_fits(self, sizes: list[int]) -> None:
        total = sum(map(charge, sizes))
        if total > self.allocator.capacity:
            raise StoreFull(
                f"object needs {total} bytes of shared memory, the store holds {self.allocator.capacity} in all"
                " (start the broker with a larger --memory or SHMCHANNEL_MEMORY)"
            )

    def allocate(self, sizes: list[int]) -> list[int] | None:
        """Offsets of new blocks for all ``sizes``, or None (nothing allocated) if they don't fit.

        Raises:
            StoreFull: they could never fit, even in an empty store.
            OSError: /dev/shm has no room for the pages (ENOSPC); nothing allocated.
        """
        self.check_fits(sizes)
        if not self.fits(sum(map(charge, sizes))):  # the arena may have room that inline objects hold
            return None
        offsets: list[int] = []
        for size in sizes:
            offset = self.allocator.alloc(size)
            if offset is None:
                for done in offsets:
                    self.allocator.release(done)
                return None
            offsets.append(offset)
        try:
            # Up to the end of these blocks, not the allocator's high-water mark: that may
            # stay above what the tmpfs can hold after a block that failed here is released.
            self._reserve(max((offset + align(max(size, 1)) for offset, size in zip(offsets, sizes)), default=0))
        except OSError:
            for done in offsets:
                self.allocator.release(done)
            raise
        return offsets

    def free_allocation(self, offset: int) -> None:
        self.allocator.release(offset)

    def add(self, size: int, *, offset: int = -1, inline: bytes | None = None, refs: int) -> StoredObject:
        """A new object: in the arena at ``offset``, or inline. An inline object is counted
        in ``used`` from now on: the caller checked that it ``fits``."""
        obj = StoredObject(next(self._keys), size, offset, inline, refs)
        self._objects[obj.key] = obj
        if inline is not None:
            self.inline_bytes += len(inline)
            self.inline_charged += charge(len(inline))
        return obj

    def objects(self) -> list[StoredObject]:
        return list(self._objects.values())

    def containing(self, offset: int) -> StoredObject | None:
        """The arena object whose block holds byte ``offset`` (a look through all: only
        when a sender's slabs are taken over)."""
        for obj in self._objects.values():
            if 0 <= obj.offset <= offset < obj.offset + max(obj.size, 1):
                return obj
        return None

    def unref(self, key: str, n: int = 1) -> bool:
        """Drop ``n`` references; True if that freed the object."""
        obj = self._objects[key]
        obj.refs -= n
        if obj.refs > 0:
            return False
        del self._objects[key]
        if obj.offset >= 0:
            self.allocator.release(obj.offset)
        if obj.inline is not None:
            self.inline_bytes -= len(obj.inline)
            self.inline_charged -= charge(len(obj.inline))
        return True

    def stats(self, reserved: int) -> StoreStats:
        used = self.used
        return StoreStats(self.capacity, used, max(0, self.capacity - used), reserved, len(self._objects), self.inline_bytes)


def charge(nbytes: int) -> int:
    """What ``nbytes`` of one object count against the capacity: an arena block's size."""
    return align(max(nbytes, 1))
