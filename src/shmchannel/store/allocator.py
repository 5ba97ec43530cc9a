"""First-fit allocator over one arena (pure: offsets only, no memory touched).

Lowest-address first fit on purpose: it keeps reusing the same few pages, which the store
has already reserved and every client has already faulted in. Fresh shared-memory pages
are what is slow (DESIGN.md: 1.4 GB/s into fresh pages against memcpy speed into touched
ones), so locality beats fragmentation-avoiding cleverness here. Free blocks coalesce with
their neighbours on free.
"""

from __future__ import annotations

import bisect

# A cache line, and the boundary every buffer handed to a user starts on (numpy needs at
# most 16; it is the serialization layer's promise, kept here by the blob layout).
from ..serialization.arrays import ALIGNMENT


def align(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


class Allocator:
    """Hands out aligned ``[offset, offset + size)`` ranges of a space of ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._starts: list[int] = [0]  # sorted starts of free blocks
        self._free: dict[int, int] = {0: capacity}  # start -> size
        self._used: dict[int, int] = {}  # start -> size of allocated blocks
        self.used = 0
        self.high_water = 0  # highest end ever handed out

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        return max(self._free.values(), default=0)

    def alloc(self, size: int) -> int | None:
        """Offset of a new block of ``size`` bytes (rounded up), or None if nothing fits."""
        size = align(max(size, 1))
        for start in self._starts:
            block = self._free[start]
            if block >= size:
                self._take(start, block, size)
                return start
        return None

    def _take(self, start: int, block: int, size: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        del self._starts[i]
        del self._free[start]
        if block > size:
            rest = start + size
            self._starts.insert(i, rest)
            self._free[rest] = block - size
        self._used[start] = size
        self.used += size
        self.high_water = max(self.high_water, start + size)

    def take(self, offset: int, size: int) -> None:
        """Mark ``[offset, offset + size)`` allocated (it must be free): a dead broker's
        allocations, taken over.

        Raises:
            ValueError: the range is not inside one free block.
        """
        size = align(max(size, 1))
        i = bisect.bisect_right(self._starts, offset) - 1
        start = self._starts[i] if i >= 0 else -1
        if start < 0 or offset + size > start + self._free[start]:
            raise ValueError(f"[{offset}, {offset + size}) is not free")
        self._take(start, self._free[start], offset - start + size)  # from the free block's start ...
        if offset > start:  # ... then the part before the range is freed again
            self._used[start] = offset - start
            self.release(start)
            self._used[offset] = size

    def release(self, offset: int) -> None:
        """Return the block at ``offset``; KeyError if it is not allocated."""
        size = self._used.pop(offset)
        self.used -= size
        i = bisect.bisect_left(self._starts, offset)
        # merge with the following free block
        if i < len(self._starts) and self._starts[i] == offset + size:
            size += self._free.pop(self._starts[i])
            del self._starts[i]
        # merge with the preceding free block
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._free[prev] == offset:
                self._free[prev] += size
                return
        self._starts.insert(i, offset)
        self._free[offset] = size
