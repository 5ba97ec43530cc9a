"""The embedded backend's receiver: objects claimed straight from shared memory.

``fetch`` claims the oldest object of the shard (queue/ring.py), sleeping on the channel's
futex while there is none, and records the claim in this process's claim log (one per
process: arena_client.Session). ``hand_out`` rebuilds it over a view of its block -- zero
copy -- whose last array, when dropped, drops the view's count in the log. The object is
consumed when acknowledged (at the next recv/peek, ``ack`` or close); its block goes back
to its sender once acknowledged and no longer viewed, by every shard that shares it.

There is no round trip to save, so objects are claimed one at a time (``prefetch`` has no
effect here: claiming up to ``prefetch`` ready objects at once was measured no faster, in
``make bench``'s ``small``): nothing is held back from other receivers of the shard, and
nothing has to be put back at ``close`` but an object an interrupted or abandoned call
left claimed.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Any

import numpy as np

from .. import serialization
from ..broker import rules
from ..errors import ProtocolError
from ..queue.log import CLAIMED, STATUS
from ..queue.ring import Claim, Claimer
from ..serialization.arrays import aligned_copy
from ..store import block
from ..store.arena import CONTROL_SPACE
from ..store.blob import external_ranges, read_blob
from . import views
from .loans import Loaned
from .arena_client import ArenaClient, leave_session, session_for, tell_next_broker
from .sending import Withdrawable, _queue

_receivers = itertools.count(1)  # receiver numbers within this process (claim-log entries name them)

class EmbeddedReceiver(Withdrawable):
    """One shard's receiver on the direct path (see the module docstring)."""

    _role = "receiver"

    #: Its main-thread calls are interrupt-safe (see DataReceiver.recv): a claim an
    #: interrupt cut short is finished by the next call (``_tidy``).
    interrupt_safe = True

    def __init__(
        self, client: ArenaClient, namespace: str, dataset_name: str, shard_id: int, wait: float | None, prefetch: int,
        made: list[Any],
    ) -> None:
        self._client = client
        self._ident = {"namespace": namespace, "dataset_name": dataset_name}
        self._label = f"{namespace}/{dataset_name}"
        self._shard = shard_id
        self._number = next(_receivers)
        try:
            self._session = session_for(client.arena, self)
            reply, _ = client.conn.request({"op": "open", **self._ident, "shard": shard_id, "timeout": wait})
        except BaseException:
            client.conn.close()
            leave_session(client.arena, self)  # ends the session if nothing else uses it
            raise
        self.num_shards = int(reply["num_shards"])
        self.full_batch = bool(reply["full_batch"])
        self._shared = self.full_batch and self.num_shards > 1
        arena = client.arena
        self._store = arena.capacity - CONTROL_SPACE  # what a referenced buffer may name (not the queues)
        self._log = self._session.log
        self._claimer = Claimer(arena.region, arena.whole, int(reply["queues"]), shard_id, self._log, self._number)
        self.buffer: collections.deque[Claim] = collections.deque()  # claimed, not handed out yet
        self.handing: Claim | None = None  # see hand_out
        self._handed: list[Claim] = []  # handed out, not acknowledged yet
        self._withdrawn: set[int | None] = set()
        made.append(self)  # last (see backends/base.py)

    # -- claiming ------------------------------------------------------------------------

    def buffered(self) -> bool:
        return bool(self.buffer)

    def fetch(self, timeout: float | None) -> None:
        """Claim the next object into ``buffer``, waiting up to ``timeout`` seconds.

        Raises:
            ChannelTimeout: nothing came within ``timeout``.
            ChannelClosed: the stream ended and the shard is drained.
            EndpointClosed, Cancelled: ``withdraw`` ended the wait.
        """
        self._tidy()
        if self.buffer:  # what a cut-short call had claimed comes first
            return
        me = threading.get_ident()
        self._withdrawn.discard(me)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            claim = self._claimer.claim(deadline, stop=self._stopped)
        except EOFError:
            raise rules.drained(self._label, self._shard) from None
        if claim is None:
            self._check_withdrawn(me)
            raise rules.recv_timeout(False, timeout, self._shard, self._label)
        self.buffer.append(claim)
        self._claimer.claimed = None  # ours now (an interrupt before this: _tidy sees it in buffer)

    def _tidy(self) -> None:
        """Finish what an interrupt cut short -- a claim, a release (queue/ring.py:
        ``repair``; a few attribute checks when there is nothing) -- and take a claim
        the caller never got into ``buffer``."""
        views.drain()
        claimer = self._claimer
        if claimer.claiming < 0 and claimer.claimed is None and not self._log.unfinished:
            return  # nothing was cut short (the usual case: three attribute checks)
        claimed = claimer.repair()
        if claimed is None:
            return
        known = {(c.entry, c.pos) for c in self.buffer} | {(c.entry, c.pos) for c in self._handed}
        if (claimed.entry, claimed.pos) not in known:
            self.buffer.append(claimed)  # the newest claim: after what is waiting
        claimer.claimed = None  # ours now (an interrupt before this: the next _tidy finds it known)

    def _rebuild(self) -> None:
        """For close: search the shard and the log (``repair(full=True)``) and rebuild
        ``buffer`` and the handed-out list from the log, which is what counts: every entry
        of ours still CLAIMED is handed out if we said so, else waiting in ``buffer``, in
        order; what we knew of that the log no longer holds is dropped."""
        claimed = self._claimer.repair(full=True)
        if claimed is not None:
            self.buffer.append(claimed)
        # Handed out, unless back in ``buffer``: put back, the caller never had it.
        handed = {(c.entry, c.pos) for c in self._handed} - {(c.entry, c.pos) for c in self.buffer}
        waiting: list[Claim] = []
        out: list[Claim] = []
        for index, state in self._log.entries():
            if state & STATUS != CLAIMED:
                continue
            channel, shard, receiver, pos, offset, size, _ = self._log.fields(index)
            if channel == self._claimer.base and shard == self._shard and receiver == self._number:
                claim = Claim(index, offset, size, pos)
                (out if (index, pos) in handed else waiting).append(claim)
        self.buffer = collections.deque(sorted(waiting, key=lambda c: c.pos))
        self._handed = out
        self._claimer.claimed = None  # in the log, so in what was rebuilt from it

    def hand_out(self, note: bool = False) -> tuple[Any, Any]:
        """The next claimed object, acknowledging the ones handed out before. It leaves
        ``buffer`` by the last step. With ``note`` (the main thread's recv only)
        ``handing`` names it from before, so that an interrupt anywhere until the caller
        has it puts it back (DataReceiver.recv); other threads' calls leave ``handing``
        alone, or the main thread's next failing recv would put back an object a worker
        had handed out (delivered twice, and one left in the queue at close)."""
        self._tidy()
        self._ack_handed()
        claim = self.buffer[0]
        if note:
            self.handing = claim
        obj = self._unpack(claim)
        self._handed.append(claim)
        del self.buffer[0]
        return obj, claim

    def recv(self, timeout: float | None, peek: bool) -> Any:
        if peek:
            return self._peek(timeout)
        if not self.buffer:
            self.fetch(timeout)
        obj, _ = self.hand_out()
        return obj

    def _peek(self, timeout: float | None) -> Any:
        """A copy of the next object, which stays where it is (claimed by nobody, or in
        our buffer): a peek claims nothing (its one write, the head moved past a slot
        already taken, is a single CAS), so an interrupt leaves nothing to repair."""
        self._tidy()
        self.ack()
        if self.buffer:
            claim = self.buffer[0]
            return self._object_of(self._raw(claim.offset, claim.size))
        me = threading.get_ident()
        self._withdrawn.discard(me)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            got = self._claimer.peek(self._raw, deadline, stop=self._stopped)
        except EOFError:
            raise rules.drained(self._label, self._shard) from None
        if got is None:
            self._check_withdrawn(me)
            raise rules.recv_timeout(True, timeout, self._shard, self._label)
        return self._object_of(got)

    # -- objects -------------------------------------------------------------------------

    def _unpack(self, claim: Claim) -> Any:
        """The object over a view of its block. The view is counted in the claim log until
        its last array goes (a weak reference's callback): the block stays until then."""
        arena = self._client.arena
        base = arena.array(block.blob_of(arena.whole, claim.offset, claim.size), claim.size)
        if self._shared:
            base.flags.writeable = False  # the other shards read the same memory
        views.count(self._log, claim.entry, base)
        return self._object_of(base, base)

    def _raw(self, offset: int, size: int) -> Any:
        """A copy of an object's blob, and of the bytes it references (a peek holds
        nothing: all is copied before the queue says the object was still there)."""
        arena = self._client.arena
        blob = aligned_copy(arena.view(block.blob_of(arena.whole, offset, size), size))
        copies = {(at, n): aligned_copy(arena.view(at, n)) for at, n in external_ranges(blob, self._store)}
        return blob, copies

    def _object_of(self, data: Any, keep: Any = None) -> Any:
        """The object of the blob ``data`` (or of a copy ``_raw`` made). A buffer it
        references elsewhere in the store (a sender's loan, an object sent by key: issue
        15) is a read-only view that keeps ``keep`` -- the blob's own view, counted in the
        claim log -- alive, so the blob's block, which holds that memory for us
        (backends/loans.py), stays until it goes."""
        arena = self._client.arena
        copies = None
        if isinstance(data, tuple):
            data, copies = data

        def external(offset: int, length: int) -> Any:
            if offset + length > self._store:
                raise ProtocolError(f"object references bytes [{offset}, {offset + length}) past the store's {self._store}")
            if copies is not None:
                return copies[offset, length]
            viewed = np.asarray(Loaned(arena.array(offset, length), keep))
            viewed.flags.writeable = False  # other shards, channels and the sender read it too
            return memoryview(viewed)  # type: ignore[arg-type]  # numpy exports a buffer

        header, buffers = read_blob(memoryview(data), external)
        return serialization.deserialize(header, buffers)

    def ack(self) -> None:
        """Acknowledge what was handed out -- not what is back in ``buffer`` (an interrupt
        put it back before the caller had it). Said again (after an interrupt) it changes
        nothing: an entry is acknowledged only while it still names its object."""
        views.drain()  # (a view dropped just now, if an interrupt kept its callback from it)
        self._ack_handed()

    def _ack_handed(self) -> None:
        handed = self._handed
        if not handed:
            return
        base = self._claimer.base
        if len(handed) == 1 and not (self.buffer and self.buffer[0] is handed[0]):  # the usual case
            self._log.ack(handed[0].entry, base, handed[0].pos)
            self._handed = []
            return
        waiting = {c.entry for c in self.buffer}
        for claim in handed:
            if claim.entry not in waiting:
                self._log.ack(claim.entry, base, claim.pos)
        self._handed = [c for c in handed if c.entry in waiting]

    # -- the rest ------------------------------------------------------------------------

    def withdraw(self, thread: int | None) -> None:
        self._withdrawn.add(thread)
        self._claimer.wake_all()
        self._client.conn.withdraw(thread)

    def queue(self, shard_id: int | None) -> Any:
        return _queue(self._claimer, shard_id)

    def close(self, give_back_last: bool = False) -> None:
        """Leave: what was handed out is acknowledged (but the last one with
        ``give_back_last``: it never reached the user), and the broker puts back at the
        head of the shard, in order, whatever this receiver still holds claimed."""
        try:
            views.drain()
            self._rebuild()
            if give_back_last and self._handed:
                last = self._handed.pop()
                self.buffer.appendleft(last)  # not acknowledged: it goes back with the others
            self.ack()
            self.buffer.clear()
        finally:
            detach = {"op": "detach", **self._ident, "claimer": self._log.claimer, "receiver": self._number,
                      "shard": self._shard}
            gone = self._client.conn.closed
            try:
                self._client.conn.close(detach)
                if gone:  # the broker died: the next one took over our claims, and gives them back
                    tell_next_broker(detach)
            finally:
                leave_session(self._client.arena, self)


__all__ = ["EmbeddedReceiver"]
