"""Publishing into a channel's shard rings and claiming from them, without any process between.

The sender (one per channel; the threads of its process take turns) publishes object
number ``p`` by writing slot ``p % R`` of every shard -- one part per shard, or the same
block for all with ``full_batch`` -- and then storing ``tail = p + 1``: that one store is
the commit point of all shards at once, so a sender that dies before it leaves the object
on no shard, after it on all.

Receivers claim the oldest claimable slot of their shard with one CAS on its state
(READY -> CLAIMED by their claim log's number), record it in their claim log (log.py), and
free the slot for the sender's next lap. The shard's ``head`` only helps them find the
oldest: anyone who sees the slot at ``head`` taken advances it. Objects the broker returns
from a dead receiver wait in the shard's *returned* list and are claimed first: they are
older than anything in the ring.

Room: a shard holds ``tail - head`` objects not yet claimed; the sender publishes while
that is below ``max_queue_size`` for every shard. Objects a receiver has claimed are its
own (in its claim log), so they no longer count.

Waking: the channel's ``data`` and ``space`` futex words are event counts (events.py):
receivers wait on ``data`` for objects, senders on ``space`` for room (``Queues._await``).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from . import layout as L
from .events import announce, notify, spin, wake_all_of
from .._native import Region
from .log import ClaimLog

Stop = Callable[[], bool]


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Queues:
    """A process's view of one channel's queues at ``base`` (the layout read and checked)."""

    def __init__(self, region: Region, view: memoryview, base: int) -> None:
        self.region, self.view, self.base = region, view, base
        self.layout = L.read_header(view, base)

    def at(self, offset: int) -> int:
        return self.base + offset

    @property
    def tail(self) -> int:
        return self.region.load(self.base + L.H_TAIL)

    @property
    def closed(self) -> bool:
        return bool(self.region.load(self.base + L.H_CLOSED))

    def queued(self, shard: int) -> int:
        """Objects of ``shard`` not yet claimed (the returned ones included)."""
        load, sb = self.region.load, self.base + self.layout.shard(shard)
        ring = self.tail - load(sb + L.S_HEAD)
        return max(0, ring) + max(0, load(sb + L.S_RET_TAIL) - load(sb + L.S_RET_HEAD))

    def pending(self, shard: int) -> int:
        """Claims of a dead receiver the broker has yet to return to ``shard``."""
        return self.region.load(self.base + self.layout.shard(shard) + L.S_PENDING)

    def received(self, shard: int) -> tuple[int, int]:
        """(objects, bytes) of ``shard`` claimed by receivers, less what went back."""
        load, sb = self.region.load, self.base + self.layout.shard(shard)
        return (load(sb + L.S_HEAD) + load(sb + L.S_RET_HEAD) - load(sb + L.S_RET_TAIL) - load(sb + L.S_PENDING),
                load(sb + L.S_RECV_BYTES))

    def sent(self) -> tuple[int, int]:
        """(objects, bytes) published."""
        return self.tail, self.region.load(self.base + L.H_SENT_BYTES)

    def keys(self, shard: int) -> list[str]:
        """Names of the objects of ``shard`` not yet claimed, oldest first: returned ones,
        then the ring's (``"<position>.<shard>"``; a snapshot, others claim meanwhile)."""
        region, view, lay, sb = self.region, self.view, self.layout, self.base + self.layout.shard(shard)
        out = []
        for head_at, end, slot_of in ((sb + L.S_RET_HEAD, region.load(sb + L.S_RET_TAIL), lay.returned_slot),
                                      (sb + L.S_HEAD, self.tail, lay.slot)):
            for h in range(region.load(head_at), end):
                at = self.base + slot_of(shard, h)
                if region.load(at) == L.ready(h):
                    out.append(f"{L.read_slot(view, at)[2]}.{shard}")
        return out

    def drained(self, shard: int) -> bool:
        """Closed, and nothing of ``shard`` is left to claim or to be returned."""
        if not self.closed:
            return False
        load, sb = self.region.load, self.base + self.layout.shard(shard)
        return (load(sb + L.S_HEAD) >= self.tail and load(sb + L.S_RET_HEAD) >= load(sb + L.S_RET_TAIL)
                and load(sb + L.S_PENDING) == 0)

    def wake_all(self) -> None:
        """Wake every sleeper of the channel (they look again)."""
        wake_all_of(self.region, self.base + L.H_DATA_SEQ)
        wake_all_of(self.region, self.base + L.H_SPACE_SEQ)

    def _await(self, word: int, attempt: Callable[[], Any], probe: Callable[[], int], deadline: float | None,
               stop: Stop | None, ended: Callable[[], bool] = lambda: False) -> Any:
        """``attempt()`` until it gives something (returned), sleeping on the event count
        at ``word`` between tries; None once the deadline passes or ``stop()`` is true.
        Before its first sleep it polls ``probe()`` (``spin``); before each it announces
        itself and tries once more: a change after the announcement wakes it or keeps it
        from sleeping.

        Raises:
            EOFError: ``ended()`` (the stream ended and the shard is drained).
        """
        region = self.region
        spun = False  # once per call: a waiter that keeps losing to another polls no more
        announced: int | None = None  # the value to sleep on, once announced and looked again
        while True:
            got = attempt()
            if got is not None:
                return got
            if ended():
                raise EOFError
            if stop is not None and stop():
                return None
            if announced is not None:  # it looked again after announcing itself: sleep
                timeout = _remaining(deadline)
                if timeout == 0.0 or not region.wait(word, announced, timeout):
                    return None
                announced = None
                continue
            if deadline is not None and deadline <= time.monotonic():
                return None  # (a poll with no time left announces nothing: no wake-up to cost anyone)
            if not spun:
                spun = True
                if spin(probe, deadline):
                    continue  # it moved: look again, no wake-up needed on either side
            announced = announce(region, word)


class Publisher(Queues):
    """The sender's side: publish one object (one part per shard) at a time."""

    def __init__(self, region: Region, view: memoryview, base: int) -> None:
        super().__init__(region, view, base)
        self._room = 0  # objects every shard is sure to take (room only grows behind our back)
        lay = self.layout
        self._slot0 = [base + lay.slot(s, 0) for s in range(lay.num_shards)]  # slot p is at + (p % R) * SLOT

    def room(self) -> int:
        lay, load, tail = self.layout, self.region.load, self.tail
        return min(lay.max_queue_size - (tail - load(self.base + lay.shard(s) + L.S_HEAD)) for s in range(lay.num_shards))

    def try_publish(self, parts: list[tuple[int, int]]) -> int | None:
        """Publish ``parts`` [(offset, size) per shard] as the next object; its number, or
        None without a trace if a shard has no room.

        Interrupt-safe: until the commit store nothing is visible, and slots written for
        an object that was not committed are written again by the next try (``tail`` is
        read from shared memory each time, never cached: after an interrupt that came
        right after the commit, the next object goes to the next position)."""
        region, view, base, lay = self.region, self.view, self.base, self.layout
        load, store = region.load, region.store
        p = load(base + L.H_TAIL)
        if self._room <= 0:
            self._room = self.room()
            if self._room <= 0:
                return None
        mine = L.ready(p)  # our own, uncommitted write of p (an interrupted try)
        step = (p % lay.ring) * L.SLOT
        slots = [at + step for at in self._slot0]
        for at in slots:
            state = load(at)
            if state != L.FREE and state != mine:
                return None  # a claim still holds the slot, or a dead claimer's (the broker returns it)
        if len(parts) == 1 and len(slots) > 1:
            parts = parts * len(slots)
        pack = L.SLOT_WORDS.pack_into
        sent = 0
        for at, (offset, size) in zip(slots, parts):
            pack(view, at + L.W_OFFSET, offset, size, p)
            store(at, mine)
            sent += size
        store(base + L.H_TAIL, p + 1)  # the commit point
        self._room -= 1
        region.add(base + L.H_SENT_BYTES, sent)
        notify(region, base + L.H_DATA_SEQ)
        return p

    def publish(self, parts: list[tuple[int, int]], deadline: float | None, stop: Stop | None = None) -> int | None:
        """Publish, sleeping while a shard is full; the object's number, or None if the
        deadline passed (or ``stop()`` became true) first, with nothing published."""
        return self._await(self.base + L.H_SPACE_SEQ, lambda: self.try_publish(parts), self._claimed, deadline, stop)

    def _claimed(self) -> int:
        """Objects claimed from the rings so far (what makes room), for ``spin``."""
        load, base, lay = self.region.load, self.base, self.layout
        return sum(load(base + lay.shard(s) + L.S_HEAD) for s in range(lay.num_shards))

    def committed(self, p: int) -> bool:
        """Whether object ``p`` was published (for a caller an interrupt left unsure)."""
        return self.tail > p

    def recover(self) -> None:
        """A new sender's first step: forget what a dead one wrote and never committed."""
        tail, lay = self.tail, self.layout
        for s in range(lay.num_shards):
            at = self.base + lay.slot(s, tail)
            if self.region.load(at) == L.ready(tail):
                self.region.store(at, L.FREE)

    def close(self) -> None:
        """End of stream: receivers drain what is queued, then are told it ended."""
        self.region.store(self.base + L.H_CLOSED, 1)
        self.wake_all()


class Claim:
    """One object taken from a shard: its block and number, and its claim-log entry."""

    __slots__ = ("entry", "offset", "size", "pos", "returned")

    def __init__(self, entry: int, offset: int, size: int, pos: int, returned: bool = False) -> None:
        self.entry, self.offset, self.size, self.pos = entry, offset, size, pos
        self.returned = returned  # from the returned list: a dead receiver's, older than the ring's

    def __repr__(self) -> str:
        return f"Claim(pos={self.pos}, offset={self.offset}, size={self.size}, entry={self.entry}, returned={self.returned})"


class Claimer(Queues):
    """A receiver's side: claim the oldest object of ``shard`` into ``log``."""

    def __init__(self, region: Region, view: memoryview, base: int, shard: int, log: ClaimLog, receiver: int) -> None:
        super().__init__(region, view, base)
        if not 0 <= shard < self.layout.num_shards:
            raise ValueError(f"shard {shard} of a channel with {self.layout.num_shards} shards")
        self.shard, self.log, self.receiver = shard, log, receiver
        self._sb = base + self.layout.shard(shard)
        # What an interrupt may cut short, for ``repair`` to finish without a search: the
        # slot a claim is taking (set before its CAS), and the claim taken, until the
        # caller has it (it clears ``claimed``). One of each: one claim at a time.
        self.claiming = -1
        self.claimed: Claim | None = None
        # And what a claim has left to do once its slot is FREE (``_finish_claim``): from
        # that store on the slot no longer names us, so ``claiming`` cannot tell. Set only
        # while ``claimed`` is.
        self.freeing: tuple[int, int, int] | None = None
        # The reference bit of a block this shard owns: its own, or its shard's in a block
        # every shard shares (full_batch; store/block.py).
        self.ref = shard if self.layout.full_batch else 0

    def try_claim(self) -> Claim | None:
        """The oldest claimable object of the shard, now recorded CLAIMED in our log; None
        if there is none. Returned objects (older) come first."""
        sb, load = self._sb, self.region.load
        returned = load(sb + L.S_RET_TAIL)
        if returned > load(sb + L.S_RET_HEAD):  # (looked at here: it is nearly always empty)
            got = self._take(sb + L.S_RET_HEAD, returned, self.layout.returned_slot)
            if got is not None:
                return got
        return self._take(sb + L.S_HEAD, load(self.base + L.H_TAIL), self.layout.slot)

    def _take(self, head_at: int, end: int, slot_of: Callable[[int, int], int]) -> Claim | None:
        region = self.region
        load, cas, taken = region.load, region.cas, self.log.claimer << 4 | L.CLAIMED
        first, ring = self.base + slot_of(self.shard, 0), self.layout.ring
        h = load(head_at)
        while h < end:
            at = first + h % ring * L.SLOT
            state = load(at)
            if state == (h & L.POS_MASK) << 24 | L.READY:  # L.ready(h), inline: once per object
                self.claiming = at
                if cas(at, state, state - L.READY + taken) == state:  # L.claimed(h, us)
                    return self._finish_claim(at, head_at, h)
                self.claiming = -1
                continue  # lost the CAS to another claimer: look again
            cas(head_at, h, h + 1)  # taken already: help the head past it
            h = load(head_at)
        return None

    def _finish_claim(self, at: int, head_at: int, h: int, entry: int = -1) -> Claim:
        """Record the claim of the slot at ``at`` (ours by CAS) in the log (unless
        ``entry`` holds it already), free the slot, move the head past it."""
        region = self.region
        offset, size, pos = L.SLOT_WORDS.unpack_from(self.view, at + L.W_OFFSET)
        if entry < 0:
            entry = self.log.claim_entry(self.base, self.shard, self.receiver, pos, offset, size, self.ref)
        claim = Claim(entry, offset, size, pos, head_at == self._sb + L.S_RET_HEAD)
        self.claimed = claim
        # Named before the slot is FREE, for ``repair``: cut short after that store, the
        # head stayed on the slot and no sender was woken -- a sender asleep for this room
        # slept on, and a shard whose stream ended never looked drained (a peek after the
        # last object waited for ever: tests/test_api_interrupt_random.py's peek test hung).
        self.freeing = (head_at, h, size)
        region.store(at, L.FREE)
        self.claiming = -1
        region.cas(head_at, h, h + 1)
        self.freeing = (head_at, h, 0)  # counted: no instant (3.11+) comes between this and the add
        region.add(self._sb + L.S_RECV_BYTES, size)
        notify(region, self.base + L.H_SPACE_SEQ)  # a sender may wait for this room
        self.freeing = None
        return claim

    def _finish_freeing(self, freeing: tuple[int, int, int]) -> None:
        """What ``_finish_claim`` had left to do after freeing the slot when an interrupt
        cut it (``freeing``): the head past the slot (a CAS from its position: said twice it
        moves nothing), the bytes unless counted, and a wake-up of every sender -- not
        ``notify``: cut between its new epoch and its wake-up, it would find no one
        announced and wake no one. A spare wake-up costs a look."""
        head_at, h, size = freeing
        region = self.region
        region.cas(head_at, h, h + 1)
        if size:
            self.freeing = (head_at, h, 0)
            region.add(self._sb + L.S_RECV_BYTES, size)
        wake_all_of(region, self.base + L.H_SPACE_SEQ)
        self.freeing = None

    def claim(self, deadline: float | None, stop: Stop | None = None) -> Claim | None:
        """Claim, sleeping while the shard is empty; None if the deadline passed or
        ``stop()`` became true first.

        Raises:
            EOFError: the stream ended and the shard is drained.
        """
        return self._until(self.try_claim, deadline, stop)

    def _until(self, attempt: Callable[[], Any], deadline: float | None, stop: Stop | None) -> Any:
        """``attempt()`` until it gives something, sleeping on the data event count."""
        tail_at = self.base + L.H_TAIL
        return self._await(self.base + L.H_DATA_SEQ, attempt, lambda: self.region.load(tail_at), deadline, stop,
                           lambda: self.drained(self.shard))

    def peek(self, read: Callable[[int, int], object], deadline: float | None, stop: Stop | None = None) -> object:
        """``read(offset, size)`` of the oldest object, which stays where it is: read
        without claiming it, and kept only if its slot did not change meanwhile (a slot
        still READY for the same position was claimed by no one, so its block was neither
        freed nor reused while it was read). ``read`` must copy what it needs, and may
        fail on what it reads from a slot that changed (it is then tried again). None if the
        deadline passed or ``stop()`` became true first.

        Raises:
            EOFError: the stream ended and the shard is drained.
        """
        region, sb = self.region, self._sb

        def look() -> tuple[object] | None:
            got = self._look(sb + L.S_RET_HEAD, region.load(sb + L.S_RET_TAIL), self.layout.returned_slot, read)
            if got is None:
                got = self._look(sb + L.S_HEAD, region.load(self.base + L.H_TAIL), self.layout.slot, read)
            return got

        got = self._until(look, deadline, stop)
        return None if got is None else got[0]

    def _look(self, head_at: int, end: int, slot_of: Callable[[int, int], int],
              read: Callable[[int, int], object]) -> tuple[object] | None:
        region, base, load = self.region, self.base, self.region.load
        h = load(head_at)
        while h < end:
            at = base + slot_of(self.shard, h)
            state = load(at)
            if state != L.ready(h):
                # Taken: the next one may be the oldest left. Help the head past it, as a
                # claim does: a claimer killed between freeing the slot and moving the head
                # leaves it there, and the shard would never look drained (a peek at the end
                # of the stream waited for ever while a recv said it ended).
                region.cas(head_at, h, h + 1)
                h += 1
                continue
            offset, size, _ = L.read_slot(self.view, at)
            try:
                got = read(offset, size)
            except Exception:
                if load(at) == state:
                    raise  # the slot held still: what it names is bad
                h = load(head_at)
                continue
            if load(at) == state:
                return (got,)
            h = load(head_at)  # claimed meanwhile: what was read may be anything
        return None

    def repair(self, full: bool = False) -> Claim | None:
        """Finish what an interrupt cut short; the claim the caller never got, if any,
        which it must take, then clear ``claimed`` (cleared here, an interrupt before the
        caller had it lost the claim: taken, never handed out). A claim whose slot still
        names us is recorded in the log (once: the log's last entry may hold it already)
        and its slot freed; one cut after its slot was freed moves the head past it and
        wakes senders; releases left half done are completed. Call with the receiver's
        turn held, before its next claim.

        ``full``: also search the whole shard and log (for a caller that lost track:
        each slot CLAIMED by us is a claim, each RELEASING or idle ACKED entry a release)."""
        region, log = self.region, self.log
        at = self.claiming
        if at >= 0:
            state = region.load(at)
            if L.code_of(state) == L.CLAIMED and L.claimer_of(state) == log.claimer:
                pos = L.read_slot(self.view, at)[2]
                entry = log.last if log.holds(log.last, self.base, self.shard, pos) else -1
                head_at = self._sb + (L.S_HEAD if self.layout.slot(self.shard, 0) <= at - self.base <
                                      self.layout.returned_slot(self.shard, 0) else L.S_RET_HEAD)
                self._finish_claim(at, head_at, state >> 24, entry)
            self.claiming = -1
        if self.freeing is not None:
            self._finish_freeing(self.freeing)
        if full:
            lay = self.layout
            for slot_of in (lay.slot, lay.returned_slot):
                for i in range(lay.ring):
                    at = self.base + slot_of(self.shard, i)
                    state = region.load(at)
                    if L.code_of(state) == L.CLAIMED and L.claimer_of(state) == log.claimer:
                        pos = L.read_slot(self.view, at)[2]
                        held = any(log.holds(index, self.base, self.shard, pos) for index, _ in log.entries())
                        if not held:
                            log.claim_entry(self.base, self.shard, self.receiver, pos, *L.read_slot(self.view, at)[:2],
                                            self.ref)
                        region.store(at, L.FREE)
            log.finish_releasing()
        else:
            log.finish_pending()
        return self.claimed
