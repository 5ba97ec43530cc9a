"""The object table: key -> stored object, reference counts, memory accounting.

Pure bookkeeping (the broker calls it; it touches no user data). An object's ``refs`` is
the number of queue entries naming it, plus outstanding hand-outs to clients (each received
or peeked copy that a client still holds), plus one while a DataSystem key pins it. The
memory returns to the allocator exactly when ``refs`` drops to zero.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..errors import StoreFull
from .allocator import Allocator, align


@dataclass
class StoredObject:
    key: str
    size: int
    offset: int = -1  # arena offset; -1 when the blob is kept inline
    inline: bytes | None = None
    refs: int = 0
    arena: str | None = None  # file name of a dead broker's arena holding it (None: ours)

    def describe(self, pos: int = 0) -> dict[str, Any]:
        """Where the object is, as replies and journal records carry it: ``offset`` (and
        ``arena`` if it is a dead broker's), or ``inline`` [start, length] of the payload
        that goes with the description, where its bytes are put at ``pos``."""
        if self.inline is not None:
            return {"key": self.key, "size": self.size, "inline": [pos, len(self.inline)]}
        where: dict[str, Any] = {"key": self.key, "size": self.size, "offset": self.offset}
        if self.arena is not None:
            where["arena"] = self.arena
        return where


def describe_all(objs: Iterable[StoredObject]) -> tuple[list[dict[str, Any]], bytes]:
    """Descriptions of ``objs`` and the one payload holding the inline ones' bytes, each
    at a 64-byte offset: a reader that puts the payload on a 64-byte boundary gets every
    blob there too, as its layout assumes (see ``inline_span``)."""
    described, inline, pos = [], [], 0
    for obj in objs:
        if obj.inline is not None:
            start = align(pos)
            inline.append(bytes(start - pos))
            described.append(obj.describe(start))
            inline.append(obj.inline)
            pos = start + len(obj.inline)
        else:
            described.append(obj.describe())
    return described, b"".join(inline)


def inline_span(pos: int, obj: StoredObject) -> int:
    """Where the payload of ``describe_all`` ends if ``obj`` follows ``pos`` bytes of it."""
    return pos if obj.inline is None else align(pos) + len(obj.inline)


@dataclass(frozen=True)
class StoreStats:
    """Usage of the shared-memory store.

    Attributes:
        capacity: bytes the arena may hold.
        used: bytes allocated in the arena (objects and allocations being written).
        free: ``capacity - used``.
        reserved: bytes of the arena backed by /dev/shm pages so far (never shrinks).
        objects: objects stored (in the arena or inline).
        inline_bytes: bytes of small objects kept in the broker's memory instead.

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
        self.on_foreign_freed: Callable[[StoredObject], None] = lambda obj: None
        self._reserved_upto = 0
        self._objects: dict[str, StoredObject] = {}
        self._keys = (f"{key_prefix}{n:x}" for n in itertools.count(1))
        self.inline_bytes = 0

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, key: object) -> bool:
        return key in self._objects

    def get(self, key: str) -> StoredObject | None:
        return self._objects.get(key)

    def check_fits(self, sizes: list[int]) -> None:
        total = sum(align(max(s, 1)) for s in sizes)
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

    def add(
        self, size: int, *, offset: int = -1, inline: bytes | None = None, refs: int,
        key: str | None = None, arena: str | None = None,
    ) -> StoredObject:
        """A new object: in our arena at ``offset``, inline, or (recovered after a broker
        died, under its old ``key``) in that broker's ``arena``."""
        obj = StoredObject(key or next(self._keys), size, offset, inline, refs, arena)
        self._objects[obj.key] = obj
        if inline is not None:
            self.inline_bytes += len(inline)
        return obj

    def unref(self, key: str, n: int = 1) -> bool:
        """Drop ``n`` references; True if that freed the object."""
        obj = self._objects[key]
        obj.refs -= n
        if obj.refs > 0:
            return False
        del self._objects[key]
        if obj.arena is not None:
            self.on_foreign_freed(obj)
        elif obj.offset >= 0:
            self.allocator.release(obj.offset)
        if obj.inline is not None:
            self.inline_bytes -= len(obj.inline)
        return True

    def stats(self, reserved: int) -> StoreStats:
        a = self.allocator
        return StoreStats(a.capacity, a.used, a.free, reserved, len(self._objects), self.inline_bytes)
