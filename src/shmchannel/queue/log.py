"""A process's claim log: every object its receivers took and have not finished with.

Each receiving process owns one log, in shared memory the broker placed (it knows where,
and its identity is the log's number, the *claimer* id written into the slots it claims).
An entry goes::

    FREE -> CLAIMED     taken from a queue (the receiver holds it; not consumed yet)
    CLAIMED -> ACKED    acknowledged: consumed, never to be delivered again
    ACKED -> RELEASING  acknowledged and no view of its memory is left in this process
    RELEASING -> FREE   its shard's reference on the block was dropped (idempotent)
    CLAIMED -> RETURNED the broker put it back in its queue (the receiver left without it)

Each step is one atomic operation on the entry's state word, so whatever instant the
process dies at, the broker reads an unambiguous entry: CLAIMED goes back to its queue,
ACKED and RELEASING drop their block reference (RELEASING's drop may have happened:
dropping is idempotent, see store/block.py), FREE and RETURNED are nothing. The state word
also counts the process's live views of the entry's memory (``VIEW`` units): an
acknowledged object's block is kept until its last view is gone.
"""

from __future__ import annotations

import functools
import struct
import threading
from typing import Callable, Iterator

from ..errors import ProtocolError, StoreFull
from .._native import Region
from ..store import block

ENTRY = 64
LOG_HEADER = 64
LOG_MAGIC = 0x474F4C53  # "SLOG"
LOG_VERSION = 2  # 2: no sleep marks (a 64-byte header)
RELEASED = 16  # u64 in the log's header: 1 once its process let it go

FREE, CLAIMED, ACKED, RELEASING, RETURNED = 0, 1, 2, 3, 4
STATUS = 0xF
VIEW = 1 << 8
MAX_VIEWS = (1 << 24) - 1

# entry words: state u64, channel u64, shard u32 + receiver u32, pos u64, offset u64, size u64,
# ref u64 (which reference bit of the block this claim owns: store/block.py)
_FIELDS = struct.Struct("<QIIQQQQ")  # from byte 8 of the entry


class LogFull(StoreFull):
    """Every entry is taken: the process holds that many received objects (claimed and
    not acknowledged, or acknowledged and still viewed). A MemoryError: drop some."""


class ClaimLog:
    """This process's log at ``base`` of the shared memory, ``capacity`` entries.

    ``release(offset, ref, pos)`` drops a finished entry's reference ``ref`` on its block
    at ``offset`` holding object ``pos`` (``store.block.drop`` unless given); it must be
    idempotent, also once the block holds another object (a process interrupted inside it
    calls it again: store/block.py)."""

    def __init__(
        self, region: Region, view: memoryview, base: int, capacity: int, claimer: int,
        release: Callable[[int, int, int], None] | None = None,
    ) -> None:
        if base < 0 or base % 64 or base + LOG_HEADER + capacity * ENTRY > len(view):
            raise ProtocolError(f"claim log at offset {base} ({capacity} entries) lies outside the shared memory")
        self.region, self.view, self.base, self.capacity, self.claimer = region, view, base, capacity, claimer
        self._release = release or functools.partial(block.drop, region, view)
        self._free: list[int] = []
        self.last = -1  # the entry of the latest claim (Claimer.repair looks there first)
        # Entries an ack or a view's drop is changing: an interrupt (or a view's callback cut short)
        # leaves them here, and ``finish_pending`` completes their release.
        self.unfinished: set[int] = set()
        self._lock = threading.Lock()  # the process's receivers take entries from one list
        self._rescan()

    @staticmethod
    def size_for(capacity: int) -> int:
        return LOG_HEADER + capacity * ENTRY

    @staticmethod
    def format(view: memoryview, base: int, capacity: int) -> None:
        struct.pack_into("<IIQ", view, base, LOG_MAGIC, LOG_VERSION, capacity)

    def release(self) -> None:
        """Say in the log that its process is done with it (``released``): for a broker
        that took the arena over from a dead one, which keeps a running process's log."""
        self.region.store(self.base + RELEASED, 1)

    @property
    def released(self) -> bool:
        return bool(self.region.load(self.base + RELEASED))

    def state_at(self, index: int) -> int:
        return self.base + LOG_HEADER + index * ENTRY

    def _rescan(self) -> None:
        """Rebuild the list of reusable entries from the log itself (FREE or RETURNED):
        the log, not this process's memory, is what counts (an interrupt may have cut a
        list operation)."""
        load = self.region.load
        self._free = [i for i in range(self.capacity - 1, -1, -1) if _reusable(load(self.state_at(i)))]

    def claim_entry(self, channel: int, shard: int, receiver: int, pos: int, offset: int, size: int, ref: int) -> int:
        """Record a claim (CLAIMED); returns the entry's index.

        Raises:
            LogFull: no entry is free.
        """
        load, free = self.region.load, self._free
        with self._lock:  # (a C-level with: an interrupt cannot leave it taken)
            while True:
                if not free:
                    self._rescan()
                    free = self._free
                    if not free:
                        raise LogFull(
                            f"this process holds {self.capacity} received objects (claimed and not acknowledged, "
                            "or still viewed): drop some of the objects received, or acknowledge them, to receive more"
                        )
                index = free[-1]
                at = self.base + LOG_HEADER + index * ENTRY
                if _reusable(load(at)):
                    break
                free.pop()  # taken after all: an interrupt came between its store and its pop
            _FIELDS.pack_into(self.view, at + 8, channel, shard, receiver, pos, offset, size, ref)
            # Named before the entry is CLAIMED: ``Claimer.repair`` looks for a claim cut short
            # here in ``last`` only (set after, an interrupt between made it record the claim
            # in a second entry -- the first, never acknowledged, went back to the queue at
            # close and the object was delivered again). Until the store it names a FREE
            # entry, which ``holds`` nothing.
            self.last = index
            self.region.store(at, CLAIMED)
            # Popped after the entry is CLAIMED: an interrupt before leaves it on the list,
            # FREE; after, it is off the list and recorded.
            free.pop()
            return index

    def fields(self, index: int) -> tuple[int, int, int, int, int, int, int]:
        """(channel, shard, receiver, pos, offset, size, ref) of an entry."""
        return _FIELDS.unpack_from(self.view, self.state_at(index) + 8)

    def holds(self, index: int, channel: int, shard: int, pos: int) -> bool:
        """Whether entry ``index`` is a live claim of object ``pos`` of that shard."""
        if not 0 <= index < self.capacity or self.region.load(self.state_at(index)) & STATUS not in (CLAIMED, ACKED, RELEASING):
            return False
        found = self.fields(index)
        return (found[0], found[1], found[3]) == (channel, shard, pos)

    def status(self, index: int) -> int:
        return self.region.load(self.state_at(index)) & STATUS

    def add_view(self, index: int) -> None:
        """A view of the entry's memory now exists in this process (``drop_view`` when gone)."""
        self.region.add(self.state_at(index), VIEW)

    def drop_view(self, index: int, done: list[bool] | None = None) -> None:
        """A view counted by ``add_view`` is gone. ``done[0]`` is set in the same step as
        the count drops (no interrupt point between): a caller cut short after it must not
        drop it again (backends/views.py)."""
        self.unfinished.add(index)
        at = self.base + LOG_HEADER + index * ENTRY
        if done is not None:
            done[0] = True
        state = self.region.add(at, -VIEW) - VIEW
        if state & STATUS == ACKED and state >> 8 == 0:
            self._finish(index, at, state)
        self.unfinished.discard(index)

    def ack(self, index: int, channel: int | None = None, pos: int | None = None) -> None:
        """The entry's object is consumed (CLAIMED -> ACKED); its block goes once no view is
        left. With ``channel`` and ``pos``, only if the entry still names that object (an
        ack said again after an interrupt must not hit the entry's next claim)."""
        at = self.base + LOG_HEADER + index * ENTRY
        if pos is not None:
            found = _FIELDS.unpack_from(self.view, at + 8)
            if found[0] != channel or found[3] != pos:
                return
        self.unfinished.add(index)
        region = self.region
        state = region.load(at)
        while state & STATUS == CLAIMED:
            found_state = region.cas(at, state, state - CLAIMED + ACKED)
            if found_state == state:
                state = state - CLAIMED + ACKED
                break
            state = found_state
        if state & STATUS == ACKED and state >> 8 == 0:
            self._finish(index, at, state)
        self.unfinished.discard(index)

    def finish_pending(self) -> None:
        """Complete the releases an interrupt cut short (``unfinished``)."""
        for index in list(self.unfinished):
            at = self.state_at(index)
            state = self.region.load(at)
            if state & STATUS == RELEASING:
                self._complete(index, at)
            elif state & STATUS == ACKED and state >> 8 == 0:
                self._finish(index, at, state)
            self.unfinished.discard(index)

    def finish_releasing(self) -> None:
        """Complete releases an interrupt cut short: RELEASING entries (dropping a
        reference twice is harmless: store/block.py), and ACKED ones with no view left,
        whose release never began (never dropping it would leak the block)."""
        load = self.region.load
        for index in range(self.capacity):
            at = self.state_at(index)
            state = load(at)
            if state & STATUS == RELEASING:
                self._complete(index, at)
            elif state & STATUS == ACKED and state >> 8 == 0:
                self._finish(index, at, state)

    def _finish(self, index: int, at: int, state: int) -> None:
        # One of ack and the last drop_view (maybe on different threads) wins this CAS.
        if self.region.cas(at, state, RELEASING) != state:
            return
        self._complete(index, at)

    def _complete(self, index: int, at: int) -> None:
        _, _, _, pos, offset, _, ref = _FIELDS.unpack_from(self.view, at + 8)
        self._release(offset, ref, pos)
        # A CAS, not a store: another thread may complete the same release meanwhile
        # (``finish_pending`` finds it in ``unfinished``, which all receivers of the
        # process share) and the entry be claimed again -- a store here would wipe that
        # claim. One of them frees it and lists it.
        if self.region.cas(at, RELEASING, FREE) == RELEASING:
            self._free.append(index)

    def mark_returned(self, index: int) -> None:
        """CLAIMED -> RETURNED (by the broker: the object went back to its queue), keeping
        the count of views the process may still have of it: the entry is reused only
        once they are gone."""
        at, cas = self.state_at(index), self.region.cas
        state = self.region.load(at)
        while True:
            found = cas(at, state, (state & ~STATUS) | RETURNED)
            if found == state:
                return
            state = found

    def busy(self) -> bool:
        """Whether any entry is in use: claimed, or acknowledged and not yet released
        (FREE and RETURNED ones are there to be taken again)."""
        return any(not _reusable(state) for _, state in self.entries())

    def entries(self) -> Iterator[tuple[int, int]]:
        """(index, state) of every entry not FREE."""
        load = self.region.load
        for index in range(self.capacity):
            state = load(self.state_at(index))
            if state & STATUS != FREE:
                yield index, state


def _reusable(state: int) -> bool:
    """FREE, or RETURNED with no view of it left in the process."""
    return state & STATUS == FREE or (state & STATUS == RETURNED and state >> 8 == 0)
