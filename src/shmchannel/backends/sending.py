"""The embedded backend's sender: objects go straight into shared memory, no broker between.

A send serializes each part (no copy), writes each blob once into a block of the sender's
own slabs (store/slabs.py: no round trip unless a new slab is needed), and publishes the
blocks into the channel's shard rings (queue/ring.py): a few atomic operations, and a
futex wake only if a receiver sleeps. The broker hears from the sender only to create
the channel, to grant a slab, and at close.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np

from .. import serialization
from ..broker import rules
from ..errors import Cancelled, ChannelError, ChannelTimeout, EndpointClosed, StoreFullTimeout, UnsupportedType
from ..queue.ring import Publisher, Queues
from ..store import block
from ..store import slabs as S
from ..store.allocator import align
from ..store.blob import plan_blob, read_blob, write_blob
from .arena_client import ArenaClient, remaining, tell_next_broker
from .loans import Ledger

#: Seconds a sender out of memory sleeps on its own slabs' freed word before it asks the
#: broker again: memory freed in other senders' slabs wakes no one here.
STORE_RECHECK = 0.05


class Withdrawable:
    """Ending another thread's wait in a call of this endpoint (``withdraw``): the waits
    ask ``_stopped`` between sleeps; the call then raises what ``_check_withdrawn`` says."""

    _label: str
    _withdrawn: set[int | None]

    def _stopped(self) -> bool:
        return bool(self._withdrawn) and (None in self._withdrawn or threading.get_ident() in self._withdrawn)

    def _check_withdrawn(self, me: int) -> None:
        if None in self._withdrawn:
            raise EndpointClosed(f"the {self._role} of {self._label} was closed by another thread")
        if me in self._withdrawn:
            self._withdrawn.discard(me)
            raise Cancelled(f"{'send' if self._role == 'sender' else 'recv'} withdrawn")

    _role = "sender"


class EmbeddedSender(Withdrawable):
    """One channel's sender on the direct path (see the module docstring)."""

    #: Its main-thread calls are interrupt-safe as they are (see DataSender.send): nothing is
    #: visible until the one commit store, and what an interrupted send allocated is given
    #: back by the next call (``_settle``).
    interrupt_safe = True

    def __init__(
        self, client: ArenaClient, namespace: str, dataset_name: str, num_shards: int, full_batch: bool,
        max_queue_size: int, made: list[Any],
    ) -> None:
        self._client = client
        self._ident = {"namespace": namespace, "dataset_name": dataset_name}
        self._label = f"{namespace}/{dataset_name}"
        try:
            reply, _ = client.conn.request(
                {"op": "create", **self._ident, "num_shards": num_shards, "full_batch": full_batch,
                 "max_queue_size": max_queue_size}
            )
            arena = client.arena
            self._pub = Publisher(arena.region, arena.whole, int(reply["queues"]))
            self._pub.recover()
        except BaseException:
            client.conn.close()
            raise
        self._max_queue_size = max_queue_size
        self._refs = num_shards if full_batch else 1
        self._slabs = S.Slabs(client.arena.region, client.arena.whole)
        self._ledger = Ledger(client.conn, client.arena)
        # (tail before, blocks) of the send in progress: a send an interrupt cut short
        # leaves it, and the next call frees the blocks unless the send was published.
        self._unsettled: tuple[int, list[int]] | None = None
        self._withdrawn: set[int | None] = set()
        # Held by a send from its first allocation to its commit, and by close: a close
        # from another thread waits for the send it ended, then settles and ends the stream.
        self._busy = threading.Lock()
        made.append(self)  # last (see backends/base.py)

    def send(self, parts: list[Any], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._busy:
            try:
                self._send(parts, timeout, deadline)
            except BaseException:
                self._settle()  # (an interrupt right here leaves it to the next call)
                raise

    def _send(self, parts: list[Any], timeout: float | None, deadline: float | None) -> None:
        if self._unsettled is not None:
            self._settle()
        me = threading.get_ident()
        if self._withdrawn:
            self._withdrawn.discard(me)  # a withdrawal was for an earlier call
            self._check_withdrawn(me)
        ledger = self._ledger
        if not ledger:
            serialized = [serialization.serialize(part) for part in parts]
            plans = [plan_blob(len(s.header), [int(b.nbytes) for b in s.buffers]) for s in serialized]
            self._write(serialized, plans, None, timeout, deadline)
            return
        serialized = [serialization.serialize(part, arrow_stream=ledger.outside) for part in parts]
        lent: list[list[Any]] = [[] for _ in serialized]  # per part: (loan, source) it references
        try:
            plans = [self._plan_referencing(s, found) for s, found in zip(serialized, lent)]
            self._write(serialized, plans, lent, timeout, deadline)
        finally:
            ledger.done_sending([loan for found in lent for loan, _ in found])  # find()'s pins

    def _write(self, serialized: list[serialization.Serialized], plans: list[Any], lent: list[list[Any]] | None,
               timeout: float | None, deadline: float | None) -> None:
        """Write the blobs into blocks of ours and publish them; ``lent``: per part, the
        (loan, source) it references, noted before publication."""
        me = threading.get_ident()
        ledger = self._ledger
        blocks: list[int] = []
        pos = self._pub.tail  # what this object will be (one sender: no one else publishes)
        self._unsettled = (pos, blocks)
        view = self._client.arena
        descriptors = []
        for i, (s, plan) in enumerate(zip(serialized, plans)):
            offset, blob = self._alloc(plan.size, pos, blocks, timeout, deadline)
            write_blob(view.view(blob, plan.size), plan, s.header, s.buffers)
            if lent is not None:
                for loan in {id(loan): loan for loan, _ in lent[i]}.values():
                    ledger.note(loan, offset, pos)
            descriptors.append((offset, plan.size))
        if self._pub.publish(descriptors, deadline, stop=self._stopped) is None:
            self._settle()
            self._check_withdrawn(me)
            raise ChannelTimeout(
                f"send timed out after {timeout} s: a queue of {self._label} stayed full "
                f"(max_queue_size={self._max_queue_size}); nothing was enqueued"
            )
        self._unsettled = None
        if lent is not None:
            ledger.sent([x for found in lent for x in found])

    def _plan_referencing(self, s: serialization.Serialized, found: list[Any]) -> Any:
        """The blob plan of ``s`` with each buffer that lies in a loan referenced, not
        copied; (loan, source) of each is appended to ``found``."""
        external = []
        for source in s.buffers:
            hit = self._ledger.find(source)
            external.append(-1 if hit is None else hit[0])
            if hit is not None:
                found.append((hit[1], source))
        return plan_blob(len(s.header), [int(b.nbytes) for b in s.buffers], external)

    def _settle(self) -> None:
        """Free the blocks of an unfinished send that was never published; after one that
        was, wake every receiver."""
        unsettled = self._unsettled
        if unsettled is not None:
            before, blocks = unsettled
            if not self._pub.committed(before):
                for offset in blocks:
                    self._slabs.free(offset)
            else:
                # Cut after its commit, its wake-up may be lost: cut between notify's new
                # epoch and its wake-up, a receiver asleep for the object slept on, and the
                # next sends, finding no one announced, woke no one either (cut before, the
                # receiver waited for the next send). A spare wake-up costs a look.
                self._pub.wake_all()
            self._unsettled = None

    def _alloc(self, blob_size: int, pos: int, blocks: list[int], timeout: float | None,
               deadline: float | None) -> tuple[int, int]:
        """A block for a blob of ``blob_size`` bytes, appended to ``blocks``: from our slabs,
        else from a new slab, else (the store is full) after blocks come free, within
        ``deadline``."""
        while True:
            got = self._slabs.alloc(blob_size, self._refs, pos, blocks)
            if got is not None:
                return got
            me = threading.get_ident()
            need = block.block_size(blob_size, self._refs) + S.SLAB_HEADER
            freed = self._slabs.freed_word()
            try:
                # With blocks of our own in use, only a short wait at the broker: they may be
                # what frees first, and that wakes no one there.
                wait = remaining(deadline) if freed is None and not self._ledger.idle() else 0.0
                reply, _ = self._client.conn.request(
                    {"op": "slab", "size": S.slab_size_for(need, self._max_queue_size), "need": align(need, 64), "timeout": wait,
                     "asked": timeout},
                    on_interrupt=self._unslab,
                )
                self._slabs.add(int(reply["offset"]), int(reply["size"]))
                continue
            except StoreFullTimeout:
                if self._ledger.idle():
                    self._ledger.tidy(keep=False)  # loans kept for reuse make room first
                    continue
                if freed is None or remaining(deadline) == 0.0:
                    raise
            self._check_withdrawn(me)
            word, waiters = freed
            region = self._client.arena.region
            seq = region.load32(word)
            if self._slabs.reclaim():
                continue
            left = remaining(deadline)
            region.wait(word, seq, STORE_RECHECK if left is None else min(left, STORE_RECHECK), waiters)

    def empty(self, shape: tuple[int, ...], dtype: Any, order: str, timeout: float | None) -> Any:
        """A writable array in a new loan of the store (backends/loans.py): one round trip
        to the broker, which may wait ``timeout`` seconds for room."""
        ledger = self._ledger
        ledger.tidy()  # what receivers finished with is free again first
        nbytes = max(1, math.prod(shape) * dtype.itemsize)  # Python ints: no wrap-around (StoreFull if huge)
        loan = ledger.reuse(nbytes)
        if loan is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            kept = ledger.idle()  # loans kept for reuse: first ask without waiting
            try:
                loan = self._new_loan(nbytes, 0.0 if kept else remaining(deadline), timeout)
            except StoreFullTimeout:
                if not kept:
                    raise
                ledger.tidy(keep=False)  # the loans kept for reuse make room
                loan = self._new_loan(nbytes, remaining(deadline), timeout)
        return ledger.array(loan, shape, dtype, order)

    def _new_loan(self, nbytes: int, wait: float | None, timeout: float | None) -> Any:
        # Granted, the hold is in the ledger on the reader thread, as the reply comes: no
        # interrupt of ours can come between them (what we have not recorded is not ours).
        reply, _ = self._client.conn.request(
            {"op": "loan", "size": nbytes, "timeout": wait, "asked": timeout},
            on_interrupt=self._unlend, on_reply=lambda r, _: self._lent(r, nbytes, sending=True, reusable=True),
        )
        return reply["_loan"]

    def _unlend(self, reply: dict[str, Any], data: Any) -> None:
        """A loan granted as its caller was interrupted: nothing uses it (tidy gives it back)."""
        if "_loan" in reply:
            self._ledger.done_sending([reply["_loan"]])

    def _lent(self, reply: dict[str, Any], size: int, sending: bool = False, reusable: bool = False) -> None:
        self._client.conn.hold()
        reply["_loan"] = self._ledger.add(str(reply["key"]), int(reply["offset"]), size, sending, reusable)

    def borrow(self, key: str) -> tuple[Any, Any]:
        """The object under DataSystem ``key`` over the store's memory, held for a send
        (``send`` references its buffers rather than copying them), and the function that
        ends the hold's part in that send. An object kept inline at the broker is a copy."""
        # Asked each time, though we may hold it already (a send of it in flight): the key
        # must still be there (KeyError), and a second hold is merged into the first (``add``).
        reply, data = self._client.conn.request(
            {"op": "lend", "key": key}, on_interrupt=self._unlend,
            on_reply=lambda r, d: self._lent(r, int(r["size"]), sending=True) if "offset" in r else None,
        )
        if "offset" not in reply:
            header, buffers = read_blob(memoryview(data).toreadonly())
            return serialization.deserialize(header, buffers), lambda: None
        loan = reply["_loan"]
        try:
            header, buffers = read_blob(self._client.arena.view(loan.offset, loan.size).toreadonly())
            obj = serialization.deserialize(header, buffers)
        except BaseException as exc:
            self._ledger.done_sending([loan])
            if isinstance(exc, Exception) and not isinstance(exc, ChannelError):
                raise UnsupportedType(f"the object under key {key!r} cannot be rebuilt to send it: {exc!r}") from exc
            raise
        return obj, lambda: self._ledger.done_sending([loan])

    def _unslab(self, reply: dict[str, Any], data: Any) -> None:
        """A slab granted as its caller was interrupted: straight back to the broker."""
        if "offset" in reply:
            self._client.conn.post({"op": "unslab", "offsets": [int(reply["offset"])]}, quiet=True)

    def queue(self, shard_id: int | None) -> Any:
        return _queue(self._pub, shard_id)

    def withdraw(self, thread: int | None) -> None:
        self._withdrawn.add(thread)
        self._pub.wake_all()
        self._client.conn.withdraw(thread)

    def close(self, end_of_stream: bool) -> None:
        """Leave; with ``end_of_stream`` the stream ends. Each step runs though an
        interrupt cut the one before: the end is marked in shared memory, and said again
        in the farewell to the broker (which marks it too), so an interrupt at any point
        still ends the stream."""
        self._ledger.closed = True  # an empty() of another thread refuses its loan from now on
        try:
            try:
                self._withdrawn.add(None)  # a send of another thread ends (EndpointClosed) ...
                self._pub.wake_all()
                self._client.conn.withdraw(None)
                with self._busy:  # ... and is out before the stream ends behind it
                    self._settle()
            finally:
                if end_of_stream:
                    self._pub.close()  # receivers see it at once, broker or not
                if self._ledger.ever:
                    self._hand_over_loans()
        finally:
            # The broker takes over our slabs: it frees each once its blocks are consumed.
            # If it died meanwhile, the next one has them (kept for us while we run).
            gone = self._client.conn.closed
            self._client.conn.close({"op": "close", **self._ident} if end_of_stream else None)
            self._slabs.release_all()
            if gone and self._slabs.slabs:
                tell_next_broker({"op": "unslab", "offsets": list(self._slabs.slabs)})

    def _hand_over_loans(self) -> None:
        """Give the broker our slabs while the connection still holds the loans: each
        descriptor in use then holds what it references itself (broker/slab_grants.py),
        and the loans need only cover this process's arrays -- the connection lingers
        while any is left (client.py), and a loan nothing views goes back now."""
        ledger = self._ledger
        if not self._client.conn.closed:
            offsets = list(self._slabs.slabs)
            # Forgotten first: once the broker may have them, we must not write them
            # (release_all); if the request never reaches it, our disconnect hands them over.
            self._slabs.forget()
            try:
                self._client.conn.request({"op": "unslab", "offsets": offsets})
            except ChannelError:
                return  # the broker is gone: a next one keeps our slabs whole while we run
        ledger.forget_uses()
        ledger.tidy()


def _queue(queues: Queues, shard_id: int | None) -> Any:
    """Names of the objects not yet claimed, read from shared memory."""
    if shard_id is None:
        return {shard: queues.keys(shard) for shard in range(queues.layout.num_shards)}
    if not 0 <= shard_id < queues.layout.num_shards:
        rules.check_shard(shard_id, queues.layout.num_shards)
    return queues.keys(shard_id)
