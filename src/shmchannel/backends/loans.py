"""A sender's loans: memory of the store it references from the blobs it sends instead of
copying it (issue 15).

A loan is an object of the store (store/table.py) that this sender's connection holds: a
block ``DataSender.empty`` lent for the user to fill, or a DataSystem object sent by key
(``send_key``). A blob that references it (store/blob.py: ``EXTERNAL``) is written into an
ordinary block of the sender's slabs -- its *descriptor*, a few hundred bytes. The hold is
given back (``release``, written by the connection's writer) once nothing uses the loan:

- no array of this process views it (the arrays ``empty`` returned, and every view made of
  them, keep one base object alive; a weak reference's C callback queues its death, as for
  received views: backends/views.py), no send of it is running, and
- every descriptor that references it is free: its receivers have released it, which the
  sender sees by looking at the block (``_done``), as it does for its own blocks.

A loan ``empty`` lent is kept ``KEEP_IDLE`` seconds first, for the next ``empty`` of its
size (``reuse``): a stream of batches then cycles through a few warm loans with no round
trip. A closing sender, and one whose ``empty`` finds the store full, keep none.

Looking happens at each ``empty``, ``send`` and ``close``, and every ``TIDY_INTERVAL`` on a
daemon thread (for a sender that stopped sending). When the sender leaves or dies, the
broker takes over its slabs: each descriptor still in use then holds the objects it
references itself (broker/slab_grants.py), before the connection's holds are dropped --
so a loan is freed when its last receiver is done with it, and a killed sender leaks
nothing.

Interrupts: every change here is made under a lock by ``with`` (C enter and exit), in an
order where a step cut short leaves a hold kept too long -- given back when the sender's
connection closes -- never one given back too early.
"""

from __future__ import annotations

import _thread
import bisect
import itertools
import math
import collections
import os
import struct
import threading
import time
import weakref
from typing import Any

import numpy as np

from ..errors import EndpointClosed, ReentrantCall
from ..store import block
from ..store.arena import ArenaMap

#: Seconds between the daemon thread's looks at the loans of senders that stopped sending.
TIDY_INTERVAL = 0.05
#: Seconds a loan nothing uses is kept for the sender's next ``empty`` of its size before it
#: goes back to the store. Measured (bench ``large-inplace``, 2 cores): a new loan's round
#: trip to the broker cost 0.27 ms of 3.8 ms per 64 MiB batch, and fresh pages 25 ms.
KEEP_IDLE = 1.0

_HEAD = struct.Struct("<IIQQQ")  # a block's header (store/block.py)


class Loaned:
    """The one base object of every array over a loan's memory: numpy builds an array from
    it (``__array_interface__``) and keeps it as that array's base, and every view of such
    an array keeps it alive in turn. Its death is what says the process views it no more.
    ``keep``: what must outlive the memory's users (a received descriptor's own view)."""

    def __init__(self, source: np.ndarray, keep: Any = None) -> None:
        self.__array_interface__ = source.__array_interface__
        self.source, self.keep = source, keep


class Loan:
    """One object this sender holds (see the module docstring)."""

    __slots__ = ("id", "key", "offset", "size", "viewed", "sending", "uses", "root", "reusable", "idle")

    def __init__(self, key: str, offset: int, size: int, reusable: bool) -> None:
        # Its own number: a key held twice (two sends of it at once) is two loans, each
        # covering its own uses, each given back on its own (the broker counts both).
        self.id = next(_ids)
        self.key, self.offset, self.size = key, offset, size
        self.reusable = reusable  # lent by ``empty`` (a DataSystem object sent by key is not ours to refill)
        self.idle = 0.0  # when nothing used it any more (0: in use), kept for a next ``empty``
        self.viewed = False  # an array of this process views it
        self.sending = 0  # sends of it running now
        self.uses: list[tuple[int, int]] = []  # (descriptor block, object pos) referencing it
        self.root: weakref.ref[np.ndarray] | None = None  # the array empty() returned


_ids = itertools.count(1)


class Ledger:
    """The loans of one sender."""

    def __init__(self, conn: Any, arena: ArenaMap) -> None:
        self._conn, self._arena = conn, arena
        self._loans: dict[int, Loan] = {}  # by Loan.id
        # Granted on the connection's reader thread, not recorded yet: that thread takes no
        # lock (a signal handler's call may be waiting for it with the lock held below it).
        self._granted: collections.deque[Loan] = collections.deque()
        self._starts: list[tuple[int, int]] = []  # (offset, id), sorted: ``find``
        self._viewers: dict[int, tuple[weakref.ref[Any], int]] = {}  # id(ref) -> (ref, loan id)
        self._dead: collections.deque[weakref.ref[Any]] = collections.deque()  # refs whose Loaned died
        self._lock = threading.RLock()  # the daemon thread tidies too (``_enter`` refuses a signal handler)
        self._base, self._end = arena.address_range
        self.ever = False  # a loan was ever taken (close then hands the slabs over first)
        self.closed = False  # the sender closed: the daemon thread forgets it once empty

    def _enter(self) -> None:
        """Refuse a call from a signal handler that interrupted this thread inside the
        ledger: the interrupted step decided on the state before it (a loan unused), and
        acting on it after the handler changed it would hand out memory in use (a loan
        reused while queued: found by the random handler test under load)."""
        if self._lock._is_owned():  # type: ignore[attr-defined]  # (C RLock: no state of ours to leave behind)
            raise ReentrantCall(
                "a call re-entered a DataSender's loans from a signal handler while its thread was inside "
                "them: call it from another thread, or after the outer call"
            )

    def __bool__(self) -> bool:
        return bool(self._loans) or bool(self._granted)

    # -- taking loans ----------------------------------------------------------------------

    def add(self, key: str, offset: int, size: int, sending: bool = False, reusable: bool = False) -> Loan:
        """Record a hold the broker granted, on the reader thread as its reply comes (the
        caller's on_interrupt gives it back if an interrupt comes first): queued in one
        step, taken into the tables by the next call that locks them (``_take_granted``)."""
        loan = Loan(key, offset, size, reusable)
        loan.sending = int(sending)
        self.ever = True
        self._granted.append(loan)
        _watch(self)
        return loan

    def _take_granted(self) -> None:
        """Record the loans granted meanwhile (the caller holds the lock). Each step may be
        done again: cut short, the next call finishes it."""
        while self._granted:
            loan = self._granted[0]
            if loan.id not in self._loans:
                self._loans[loan.id] = loan
                bisect.insort(self._starts, (loan.offset, loan.id))
            if self._granted and self._granted[0] is loan:
                self._granted.popleft()

    def reuse(self, size: int) -> Loan | None:
        """A loan of ``size`` bytes nothing uses any more, taken again (counted as being
        sent until ``array``): a steady stream of batches then needs no round trip to the
        broker, and its memory is warm. None if there is none."""
        self._enter()
        with self._lock:
            self._take_granted()
            for loan in list(self._loans.values()):  # (a signal handler's call may change it)
                if loan.idle and loan.size == size:
                    loan.idle = 0.0
                    loan.sending += 1
                    return loan
        return None

    def idle(self) -> bool:
        return any(loan.idle for loan in list(self._loans.values()))  # (granted loans are in use)

    def array(self, loan: Loan, shape: tuple[int, ...], dtype: np.dtype, order: str) -> np.ndarray:
        """A writable array over ``loan``; the loan is viewed until it and its views are gone."""
        holder = Loaned(self._arena.array(loan.offset, loan.size))
        ref = weakref.ref(holder, self._dead.append)
        self._enter()
        with self._lock:
            self._take_granted()
            if self.closed or self._loans.get(loan.id) is not loan:
                # close() ran meanwhile (another thread) and may have given it back; if not,
                # unpinned, the next tidy does
                loan.sending = max(0, loan.sending - 1)
                raise EndpointClosed("the sender was closed while empty() waited for its loan")
            self._viewers[id(ref)] = (ref, loan.id)
            loan.viewed = True
            loan.sending = max(0, loan.sending - 1)  # (held since it was granted: ``add``)
        flat = np.asarray(holder)[: math.prod(shape) * dtype.itemsize]
        arr = np.ndarray(shape, dtype, buffer=flat, order="F" if order == "F" else "C")  # (a subarray dtype adds dims)
        loan.root = weakref.ref(arr)
        return arr

    # -- sending ---------------------------------------------------------------------------

    def find(self, source: Any) -> tuple[int, Loan] | None:
        """(arena offset, loan) of ``source``'s bytes if they are one contiguous run inside
        a loan -- an array, a row block of one, a buffer of a frame over it -- else None."""
        if isinstance(source, np.ndarray):
            if not (source.flags.c_contiguous or source.flags.f_contiguous):
                return None
            address, nbytes = source.__array_interface__["data"][0], source.nbytes
        elif isinstance(source, memoryview):
            nbytes = source.nbytes
            if not source.c_contiguous or not nbytes:
                return None
            flat = source if source.format == "B" and source.ndim == 1 else source.cast("B")
            address = np.frombuffer(flat, np.uint8).__array_interface__["data"][0]
        else:
            return None  # a Writer (an Arrow stream) makes its bytes as it writes them
        if not nbytes or not self._base <= address < self._end:
            return None
        offset = address - self._base
        self._enter()
        with self._lock:  # the daemon's tidy may change the tables meanwhile
            self._take_granted()
            loan = self._containing(offset)
            if loan is None or offset + nbytes > loan.offset + loan.size:
                return None
            loan.sending += 1  # pinned until the send is over (``done_sending``): noted or not
        return offset, loan

    def outside(self, data: Any) -> bool:
        """Whether no buffer of the Arrow table or batch ``data`` lies in a loan (it is then
        sent as one stream, a slice of it carrying only its own rows)."""
        for column in data.columns:
            for chunk in getattr(column, "chunks", (column,)):
                for buf in chunk.buffers():
                    if buf is not None and buf.size and self._base <= buf.address < self._end:
                        self._enter()
                        with self._lock:
                            self._take_granted()
                            if self._containing(buf.address - self._base) is not None:
                                return False
        return True

    def _containing(self, offset: int) -> Loan | None:
        """The loan whose memory holds byte ``offset`` (the caller holds the lock); entries
        of loans given back (an interrupt left them) are passed over."""
        i = bisect.bisect_right(self._starts, (offset, 1 << 62)) - 1
        while i >= 0:
            loan = self._loans.get(self._starts[i][1])
            if loan is not None:
                return loan if loan.offset <= offset < loan.offset + loan.size else None
            i -= 1
        return None

    def note(self, loan: Loan, descriptor: int, pos: int) -> None:
        """``descriptor`` (object ``pos``) references ``loan``: recorded before it is
        published, so that no look can find the loan unused while a receiver may read it."""
        self._enter()
        with self._lock:
            loan.uses.append((descriptor, pos))

    def sent(self, referenced: list[tuple[Loan, Any]]) -> None:
        """A send is queued that references these (loan, source): the sources, and the
        arrays ``empty`` returned for those loans, become read-only (a write would change
        what receivers read). Views made before the send keep their flag (numpy does not
        list them); what the send copied keeps its own."""
        for loan, source in referenced:
            if isinstance(source, np.ndarray):
                source.flags.writeable = False
            root = loan.root() if loan.root is not None else None
            if root is not None:
                root.flags.writeable = False

    def done_sending(self, loans: list[Loan]) -> None:
        # Not refused inside the ledger (no ``_enter``): it only makes a loan less used, so
        # an interrupted look's older view is the safe one; and it ends a send that went.
        with self._lock:
            for loan in loans:
                loan.sending = max(0, loan.sending - 1)

    # -- giving back -----------------------------------------------------------------------

    def tidy(self, keep: bool = True) -> int:
        """Give back the loans nothing uses any more (module docstring); how many. With
        ``keep``, one lent by ``empty`` is kept for reuse first, ``KEEP_IDLE`` seconds."""
        if not self._loans and not self._granted:
            if self.closed:
                self._conn.holds_done()  # (a release cut short by an interrupt: see below)
            return 0
        given = 0
        now = time.monotonic()
        keep = keep and not self.closed
        self._enter()
        with self._lock:
            self._take_granted()
            while self._dead:
                ref = self._dead[0]
                found = self._viewers.get(id(ref))
                if found is not None:  # each step may be done again: cut short, the next tidy does
                    viewed = self._loans.get(found[1])
                    if viewed is not None:
                        viewed.viewed = False
                    self._viewers.pop(id(ref), None)
                if self._dead and self._dead[0] is ref:  # (a nested tidy may have taken it)
                    self._dead.popleft()
            for loan in list(self._loans.values()):
                if loan.viewed or loan.sending:
                    if len(loan.uses) > 16:  # a loan kept in view and sent again and again
                        loan.uses = [use for use in loan.uses if not self._done(*use)]
                    continue
                # Oldest first, up to the first in use: receivers mostly finish in order, and
                # each look is a header read that a 64 MiB fill has pushed out of the caches.
                done = 0
                while done < len(loan.uses) and self._done(*loan.uses[done]):
                    done += 1
                if done:
                    del loan.uses[:done]
                if loan.uses:
                    continue
                if keep and loan.reusable and (not loan.idle or now - loan.idle < KEEP_IDLE):
                    loan.idle = loan.idle or now
                    continue
                # Out of the tables first: cut here, the hold stays until the connection
                # closes. (A signal handler's nested tidy may have given it back already.)
                if self._loans.pop(loan.id, None) is None:
                    continue
                self._conn.release(loan.key)
                given += 1
                i = bisect.bisect_left(self._starts, (loan.offset, loan.id))
                if i < len(self._starts) and self._starts[i] == (loan.offset, loan.id):
                    del self._starts[i]
            if len(self._starts) != len(self._loans):  # an interrupt left one out, or one in
                self._starts = sorted([(loan.offset, loan.id) for loan in list(self._loans.values())])
            if self.closed and not self._loans and not self._granted:
                # Nothing of ours is held any more: a release an interrupt cut short (popped
                # above, never said) must not keep the connection open for ever.
                self._conn.holds_done()
        return given

    def _done(self, descriptor: int, pos: int) -> bool:
        """Whether the descriptor block at ``descriptor`` no longer holds object ``pos``:
        all its receivers released it (its bits are clear), or it was reused since (it
        names another object). Our own block: only this sender writes its header."""
        region = self._arena.region
        magic, refs, _, _, held = _HEAD.unpack_from(self._arena.whole, descriptor)
        if magic != block.MAGIC or held != pos:
            return True
        return block.is_free(region, descriptor, refs)

    def forget_uses(self) -> None:
        """The broker takes over our slabs now (the sender leaves): each descriptor in use
        holds what it references on its own from then on, so the loans need only cover
        this process's arrays."""
        self._enter()
        with self._lock:
            self._take_granted()
            self.closed = True  # an empty() still waiting for its loan now refuses it (``array``)
            for loan in list(self._loans.values()):
                loan.uses = []
                loan.sending = 0  # no send runs any more (close waited for it), and none starts


# -- the daemon thread -----------------------------------------------------------------------

_ledgers: set[Ledger] = set()  # strong: a closed sender's loans outlive it, until given back
_tidier = False


def _forked() -> None:
    global _tidier
    _ledgers.clear()  # a child's copies hold nothing at the broker
    _tidier = False


os.register_at_fork(after_in_child=_forked)


def _watch(ledger: Ledger) -> None:
    global _tidier
    _ledgers.add(ledger)
    if not _tidier:
        _tidier = True
        _thread.start_new_thread(_tidy_forever, ())  # one C call (see aio.Worker)


def _tidy_forever() -> None:
    while True:
        time.sleep(TIDY_INTERVAL)
        for ledger in list(_ledgers):
            try:
                ledger.tidy()
            except Exception:  # noqa: BLE001 -- shared memory gone (process exiting): nothing to give back
                pass
            if ledger.closed and not ledger:
                _ledgers.discard(ledger)
