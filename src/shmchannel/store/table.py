"""The object table: key -> stored object, reference counts, memory accounting.

Pure bookkeeping (the broker calls it; it touches no user data). An object's ``refs`` is
the number of queue entries naming it, plus outstanding hand-outs to clients (each received
or peeked copy that a client still holds), plus one while a DataSystem key pins it. The
memory returns to the allocator exactly when ``refs`` drops to zero.

One capacity bounds every byte the broker keeps for users (issue 13): arena blocks, and the
bytes of inline objects, which live in the broker's own memory, each counted as an arena
block of its size would be (``align``). Inline *credit* -- room set aside for a sender's
next inline objects, so that it can send them without waiting for a reply (state.py) --
counts too. Counting inline bytes against the arena's capacity, rather than a budget of
their own, keeps one number to configure and one ``StoreFull`` for both kinds; the arena
then may have blocks free that no one can take, which costs address space, not pages.
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


@dataclass(frozen=True)
class StoreStats:
    """Usage of the shared-memory store.

    Attributes:
        capacity: bytes the store may hold, in the arena and inline together.
        used: bytes the store holds: arena blocks (objects, allocations being written and
            senders' spare blocks), inline objects (each rounded up to 64 bytes, as an
            arena block would be), and inline room set aside for senders.
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
        self.on_foreign_freed: Callable[[StoredObject], None] = lambda obj: None
        self._reserved_upto = 0
        self._objects: dict[str, StoredObject] = {}
        self._keys = (f"{key_prefix}{n:x}" for n in itertools.count(1))
        self.inline_bytes = 0
        self.inline_charged = 0  # inline_bytes, each object's rounded up (``charge``)
        self.credit = 0  # inline room set aside for senders (``grant``)

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
        """Bytes held: arena blocks, inline objects and inline credit (module docstring)."""
        return self.allocator.used + self.inline_charged + self.credit

    @property
    def free(self) -> int:
        return self.allocator.capacity - self.used

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more (counted with ``charge``) fit now (nothing always does:
        recovered objects may have taken ``free`` below zero)."""
        return nbytes <= 0 or nbytes <= self.free

    def grant(self, nbytes: int) -> None:
        """Set ``nbytes`` of inline credit aside (the caller checked ``fits``)."""
        self.credit += nbytes

    def revoke(self, nbytes: int) -> None:
        """Give back ``nbytes`` of inline credit: unused, or spent on objects (``add``)."""
        self.credit -= nbytes

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

    def add(
        self, size: int, *, offset: int = -1, inline: bytes | None = None, refs: int,
        key: str | None = None, arena: str | None = None,
    ) -> StoredObject:
        """A new object: in our arena at ``offset``, inline, or (recovered after a broker
        died, under its old ``key``) in that broker's ``arena``. An inline object is counted
        in ``used`` from now on: the caller checked that it ``fits``, or revoked the credit
        it was sent on (a recovered one is taken in any case)."""
        obj = StoredObject(key or next(self._keys), size, offset, inline, refs, arena)
        self._objects[obj.key] = obj
        if inline is not None:
            self.inline_bytes += len(inline)
            self.inline_charged += charge(len(inline))
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
            self.inline_charged -= charge(len(obj.inline))
        return True

    def stats(self, reserved: int) -> StoreStats:
        used = self.used
        return StoreStats(self.capacity, used, max(0, self.capacity - used), reserved, len(self._objects), self.inline_bytes)


def charge(nbytes: int) -> int:
    """What ``nbytes`` of one object count against the capacity: an arena block's size."""
    return align(max(nbytes, 1))
