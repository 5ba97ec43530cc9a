"""A sender's memory: slabs of the arena the broker granted it, carved into blocks here.

Allocation is the sender's own business, with no message to anyone: a block comes from a
slab by first fit (``Allocator``, which keeps reusing the same touched pages), and goes back
to it when its receivers have cleared every reference bit (block.py) -- which the sender
sees by looking, when it needs memory (``reclaim``), not by being told. Only a new slab
costs a round trip to the broker.

A slab starts with a 64-byte header holding its *freed* futex word: whoever frees one of
its blocks bumps it, so a sender that waits for memory sleeps on it instead of polling.
When the sender leaves, it hands its slabs back with the blocks still in use
(``outstanding``); the broker frees each slab once they are (broker/slabs.py).
"""

from __future__ import annotations

from .._native import Region
from . import block
from .allocator import Allocator, align

SLAB_HEADER = 64
FREED = 0  # u32 futex word in the slab header: bumped when one of its blocks is freed
FREED_WAITERS = 4  # u32: senders asleep on it
#: u64, 1 once its sender is done with it -- for a broker that took the arena over from a
#: dead one: it keeps a running process's slabs whole, unless that process says so here.
RELEASED = 8

#: Smallest slab asked for: enough for a stream of small objects to go for thousands of
#: sends between requests, little enough to matter in a store of 1 GiB.
MIN_SLAB = 8 << 20
#: Slabs are asked for in multiples of this (pages come in 2 MiB chunks, see arena.py).
SLAB_STEP = 2 << 20


def slab_size_for(need: int, max_queue_size: int) -> int:
    """The slab to ask for when a block needing ``need`` bytes of slab fits nowhere: room
    for as many such blocks as can be in flight at once -- a full queue, one held by a
    receiver, one being written, and slack -- at least MIN_SLAB. The broker may grant less
    in a store too small for it (broker/operations.py: ``_slab``), never below ``need``."""
    return max(MIN_SLAB, align(SLAB_HEADER + (max_queue_size + 4) * need, SLAB_STEP))


class Slabs:
    """The slabs of one sender and the blocks it carved from them that are still in use."""

    def __init__(self, region: Region, view: memoryview) -> None:
        self.region, self.view = region, view
        self._slabs: dict[int, Allocator] = {}  # slab offset -> allocator of its bytes after the header
        self._sizes: dict[int, int] = {}
        self._out: dict[int, tuple[int, int, int]] = {}  # block offset -> (slab offset, refs, size)
        # Set while an allocator is being changed: the sender runs in the main thread, where
        # an interrupt can cut a change in two. ``_out`` changes in single steps (a dict item
        # set or removed), so it is what counts: the allocators are rebuilt from it.
        self._changing = False

    def add(self, offset: int, size: int) -> None:
        """A slab the broker granted: ``[offset, offset + size)`` of the arena."""
        self.view[offset : offset + SLAB_HEADER] = bytes(SLAB_HEADER)
        self._slabs[offset] = Allocator(size - SLAB_HEADER)
        self._sizes[offset] = size

    @property
    def slabs(self) -> dict[int, int]:
        return dict(self._sizes)

    def alloc(self, blob_size: int, refs: int, pos: int, into: list[int]) -> tuple[int, int] | None:
        """A new block for object ``pos``, a blob of ``blob_size`` bytes with ``refs``
        references: (block offset, blob offset); None if no slab has room, even after
        ``reclaim``. The block's offset is appended to ``into`` in the same step that
        records it here (no interrupt point between): the caller's list of what to free
        should its send not go through.

        The oldest block out is taken again as it is if its receivers are done with it and
        it has the size asked: a stream's blocks come back in the order they went, so a
        steady stream cycles through a few blocks whose pages stay in cache, at the cost
        of one load per send."""
        size = block.block_size(blob_size, refs)
        self._check()
        # ``_changing`` until ``_out`` names the block: an interrupt anywhere before leaves
        # the allocators to be rebuilt from ``_out``, which then never had it (no leak).
        self._changing = True
        found = None
        for oldest, entry in self._out.items():
            slab, oldest_refs, oldest_size = entry
            if align(oldest_size) == align(size) and oldest_refs == refs:
                # Looked at before it leaves ``_out``: an interrupt at this call's check
                # point with the block out of ``_out`` would have the allocators rebuilt
                # without it -- and a block in use handed out again (found by the random
                # interrupt test: one object overwritten by a later one).
                free = block.is_free(self.region, oldest, oldest_refs)
                del self._out[oldest]  # re-entered last (below, or now): the newest
                if free:
                    found = slab, oldest - slab - SLAB_HEADER
                else:
                    # Still in use (a receiver keeps it): to the back, so that one kept block
                    # does not stop the reuse of those behind it. (No interrupt point between
                    # the del and this store.)
                    self._out[oldest] = entry
            break
        if found is None:
            found = self._alloc(size)
        if found is None:
            self._changing = False
            if self.reclaim():
                self._changing = True
                found = self._alloc(size)
        if found is None:
            self._changing = False
            return None
        slab, start = found
        offset = slab + SLAB_HEADER + start
        blob = block.write_header(self.region, self.view, offset, size, refs, pos, owner=slab + FREED)
        self._out[offset] = (slab, refs, size)  # what is in ``_out`` has its header
        into.append(offset)
        self._changing = False
        return offset, blob

    def _alloc(self, size: int) -> tuple[int, int] | None:
        for slab, allocator in self._slabs.items():
            start = allocator.alloc(size)
            if start is not None:
                return slab, start
        return None

    def free(self, offset: int) -> None:
        """Give back a block that was never published (its send failed); again changes
        nothing (an interrupt may cut the caller short after the first time)."""
        self._check()
        self._changing = True  # before the pop: a check point follows it (a C call)
        found = self._out.pop(offset, None)
        if found is not None:
            # Its bits cleared: a loan it references sees it unused (backends/loans.py).
            for i in range((found[1] + 63) // 64):
                self.region.store(offset + block.REFS_AT + 8 * i, 0)
            self._slabs[found[0]].release(offset - found[0] - SLAB_HEADER)
        self._changing = False

    def reclaim(self) -> int:
        """Take back every block whose receivers are all done with it; how many."""
        self._check()
        freed = 0
        for offset, (slab, refs, _) in list(self._out.items()):
            if block.is_free(self.region, offset, refs):
                del self._out[offset]
                self._changing = True
                self._slabs[slab].release(offset - slab - SLAB_HEADER)
                self._changing = False
                freed += 1
        return freed

    def _check(self) -> None:
        """Rebuild the allocators from ``_out`` if an interrupt cut a change short."""
        if not self._changing:
            return
        for slab in self._slabs:
            self._slabs[slab] = Allocator(self._sizes[slab] - SLAB_HEADER)
        for offset, (slab, _, size) in list(self._out.items()):
            self._slabs[slab].take(offset - slab - SLAB_HEADER, size)
        self._changing = False

    def freed_word(self) -> tuple[int, int] | None:
        """(futex word, waiter count) of a slab with blocks in use -- what a sender out of
        memory sleeps on -- or None if no block is in use (waiting would be for nothing)."""
        for slab, _, _ in self._out.values():
            return slab + FREED, slab + FREED_WAITERS
        return None

    def outstanding(self) -> list[int]:
        """Offsets of the blocks still in use (published, not yet freed by all receivers)."""
        self.reclaim()
        return list(self._out)

    def idle(self) -> list[int]:
        """Slabs none of whose blocks is in use (they can go back to the broker)."""
        used = {slab for slab, _, _ in self._out.values()}
        return [slab for slab in self._slabs if slab not in used]

    def release_all(self) -> None:
        """Say in each slab that this sender will write no more blocks in it."""
        for slab in self._slabs:
            self.region.store(slab + RELEASED, 1)

    def forget(self) -> None:
        """Forget every slab (handed over to the broker, blocks in use and all)."""
        self._slabs, self._sizes, self._out = {}, {}, {}

    def drop(self, slab: int) -> None:
        """Forget a slab (given back to the broker); it must have no block in use."""
        del self._slabs[slab], self._sizes[slab]
