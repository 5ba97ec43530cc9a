"""DataReceiver: the consuming end of one shard of a channel, blocking and asyncio."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Iterator

from .. import aio
from ..backends import backend_for
from ..broker import rules
from ..errors import ChannelClosed, ChannelTimeout, EndpointClosed
from .checks import PREFETCH, check_int, check_name, check_timeout
from .endpoint import Turn, close_endpoint
from .pending import WorkerRecv, Pending, left_of


class DataReceiver(WorkerRecv):
    """The consuming end of one shard of a channel.

    Example::

        with DataReceiver(address="127.0.0.1", dataset_name="clicks", shard_id=0, wait=30) as rx:
            for part in rx:          # ends after the sender's close() and the queue drained
                train(part)

    Received arrays (and the numeric columns of DataFrames) are views of shared memory,
    writable unless the object is shared with other shards (``full_batch``); the memory
    returns to the store when the last of them is dropped.

    Threads may share a receiver: ``get_queue``, ``ack`` and the properties answer while
    another thread's ``recv`` waits; ``recv``/``peek`` take turns, each within its own
    timeout, and each object is handed out once.
    """

    def __init__(
        self,
        address: str | None = None,
        namespace: str = "default",
        shard_id: int = 0,
        dataset_name: str = "dataset",
        *,
        wait: float | None = 0.0,
        prefetch: int = PREFETCH,
    ) -> None:
        """Connect to the channel; ``wait`` seconds (None: forever) for its sender to appear.

        ``prefetch`` (1 to ``rules.MAX_PREFETCH``, 1024): objects the Ray backend fetches
        per call to the channel's actor when that many are queued. They are lent to this
        receiver: ``get_queue`` no longer lists them, other receivers of the shard do not
        get them, and they go back to the head of the queue, in order, at ``close`` or if
        this process dies. The embedded backend claims one object at a time straight from
        shared memory whatever ``prefetch`` says (no round trip to save; claiming ready
        objects in batches measured no faster: backends/receiving.py).

        Raises:
            ChannelNotFound (ValueError): no sender created it (within ``wait``).
            ValueError: a bad parameter, or ``shard_id >= num_shards`` of the channel.
        """
        self._endpoint: Any = None
        self._worker: aio.Worker | None = None  # runs arecv's recv calls
        # The recv pending on the worker (see aio.py), if any: appending it is the one step
        # that commits it, so no interrupt can leave one started and unrecorded.
        self._slot: collections.deque[Pending] = collections.deque()
        self._main_waits = False  # the main thread waits in a recv/peek of this receiver
        self._give_back = False  # what close() decided about an abandoned arecv's object
        self._async_lock: asyncio.Lock | None = None
        self._turn = Turn("this DataReceiver")
        self._namespace = check_name("namespace", namespace)
        self._dataset_name = check_name("dataset_name", dataset_name)
        self._shard_id = check_int("shard_id", shard_id, 0)
        wait = check_timeout("wait", wait)
        prefetch = check_int("prefetch", prefetch, 1, rules.MAX_PREFETCH)
        backend = backend_for(address)
        self._open(lambda made: backend.open_receiver(namespace, dataset_name, shard_id, wait, prefetch, made),
                   close_endpoint)

    def _opened(self, endpoint: Any) -> None:
        self._num_shards = endpoint.num_shards

    @property
    def shard_id(self) -> int:
        """Which shard this receiver reads."""
        return self._shard_id

    @property
    def num_shards(self) -> int:
        """The channel's shard count, as its sender created it."""
        return self._num_shards

    def recv(self, timeout: float | None = None) -> Any:
        """Remove and return the oldest object of this shard; block while it is empty.

        Acknowledges the objects received before (see ``ack``).

        Raises:
            TimeoutError (``ChannelTimeout``): nothing arrived within ``timeout`` seconds.
            ChannelClosed: the sender closed the channel and this shard is drained.
            EndpointClosed: this receiver was closed (also by another thread meanwhile).
            ReentrantCall (a RuntimeError): called from a signal handler while its own
                thread is inside a recv/peek of this receiver.

        Another thread's recv/peek of this receiver goes first. From any thread but the
        main one the wait for it counts against ``timeout``; the main thread waits for it
        to end without counting (it takes the turn with a ``with`` block, which no
        interrupt can cut between taking and owning it), then has all of ``timeout``.

        Example::

            try:
                batch = receiver.recv(timeout=30)
            except ChannelClosed:
                ...                  # end of stream
        """
        endpoint = self._live()
        timeout = check_timeout("timeout", timeout)
        if aio.in_main_thread():
            if self._slot or not getattr(endpoint, "interrupt_safe", False):
                return self._from_main(endpoint, timeout, keep=False)
            # The object being handed out (hand_out's ``handing``) is the caller's only once
            # this, the outermost frame, returns: an interrupt anywhere before -- also at the
            # return of an inner call, a check point on Python 3.10 -- puts it back.
            try:
                obj = self._recv_main(endpoint, timeout, peek=False)
                endpoint.handing = None
                return obj
            except BaseException:
                entry, endpoint.handing = endpoint.handing, None
                if entry is not None and not (endpoint.buffer and endpoint.buffer[0] is entry):
                    endpoint.buffer.appendleft(entry)  # handed out again next; its note again is a no-op
                raise
        if self._slot:
            return self._pending_result(endpoint, timeout, keep=False)
        return self._take(endpoint, timeout, False)

    def _recv_main(self, endpoint: Any, timeout: float | None, peek: bool) -> Any:
        """recv/peek of the main thread, where interrupts are raised, on a backend whose
        steps are interrupt-safe (embedded), in one turn: claim into the buffer if it is
        empty, then hand out its oldest. Interrupt-safe by its order of steps: the turn is
        a with block on a lock (its enter and exit are C, so no interrupt comes between
        taking the lock and owning the block); a claim is the endpoint's once in its
        buffer (one that never got there is found by the next call: ``_tidy``); the object
        leaves the buffer by the last step of ``hand_out``, which names it (``handing``)
        until ``recv`` returns it, and an interrupt after that step -- at the with block's
        exit, or at any return on the way out -- makes ``recv`` put it back. It waits for
        another thread's call without counting that against ``timeout``."""
        self._refuse_reentry("a recv/peek")
        with self._turn.lock:
            if self._endpoint is not endpoint:  # closed by another thread meanwhile
                raise EndpointClosed(f"{self!r} is closed")
            self._main_waits = True  # a signal handler calling in raises ReentrantCall, not deadlock
            try:
                if peek:
                    return endpoint.recv(timeout, True)
                if not endpoint.buffered():
                    endpoint.fetch(timeout)
                obj, _ = endpoint.hand_out(note=True)
                return obj
            finally:
                self._main_waits = False

    def _take(self, endpoint: Any, timeout: float | None, peek: bool) -> Any:
        with self._turn.held(timeout) as left:
            if self._endpoint is not endpoint:  # closed by another thread while this waited
                raise EndpointClosed(f"{self!r} is closed")
            return endpoint.recv(left, peek)

    def peek(self, timeout: float | None = None) -> Any:
        """Like ``recv`` but leave the object in the queue.

        Example::

            head = receiver.peek(timeout=5)    # look at the next batch
            batch = receiver.recv()            # the same batch, now taken
        """
        endpoint = self._live()
        timeout = check_timeout("timeout", timeout)
        if aio.in_main_thread():
            if self._slot or not getattr(endpoint, "interrupt_safe", False):
                return self._from_main(endpoint, timeout, keep=True)
            return self._recv_main(endpoint, timeout, peek=True)
        if self._slot:
            return self._pending_result(endpoint, timeout, keep=True)
        return self._take(endpoint, timeout, True)

    def ack(self) -> None:
        """Acknowledge the objects received so far: they are consumed, and their memory
        returns to the store once they are dropped.

        Without it the next ``recv``/``peek`` or ``close`` acknowledges them. Until then
        the broker (or Ray channel actor) keeps them, and if this process dies they go back
        to the head of the queue for the next receiver of this shard (at-least-once).

        Example::

            batch = receiver.recv()
            checkpoint(model.fit(batch))
            receiver.ack()        # only now is the batch gone for good
        """
        self._live().ack()

    def get_queue(self, shard_id: int | None = None) -> Any:
        """Keys not yet received: a list for ``shard_id``, or ``{shard: list}`` for all shards.

        Answers at once, also while another thread's ``recv`` of this receiver waits.

        Example::

            waiting = len(receiver.get_queue(receiver.shard_id))
        """
        if shard_id is not None:
            check_int("shard_id", shard_id, 0)
        return self._live().queue(shard_id)

    def __iter__(self) -> Iterator[Any]:
        """Receive until the end of the stream (``ChannelClosed``).

        Example::

            for batch in receiver:
                train(batch)
        """
        while True:
            try:
                obj = self.recv()
            except ChannelClosed:
                return
            yield obj
            del obj  # drop our reference so a consumed object can return to the store

    def close(self) -> None:
        """Leave the channel. Objects already received stay valid. Idempotent.

        An object an abandoned ``arecv`` received but never handed out goes back to the
        head of the queue, as do prefetched ones.

        Example::

            receiver = DataReceiver(dataset_name="clicks", shard_id=1)
            try:
                first = receiver.recv(timeout=60)
            finally:
                receiver.close()     # or use ``with DataReceiver(...) as receiver:``
        """
        endpoint = self._begin_close()  # an interrupted close() is finished by the next
        if endpoint is not None:
            job = self._slot[0] if self._slot else None
            worker = self._worker
            if job is not None and not job.done() and worker is not None:
                # Its reply may be in, its object on its way out: end it first, then give
                # that object back (decided before, it would be handed out and lost).
                aio.withdraw(job, lambda: endpoint.withdraw(worker.ident), aio.WITHDRAW_TIMEOUT)
            # Decided once (a close retried after an interrupt finds the slot cleared).
            give_back = self._give_back or (job is not None and job.done() and job.exception() is None)
            self._give_back = give_back
            self._slot.clear()
            del job
            if getattr(endpoint, "interrupt_safe", False):
                # What is in the buffer goes back by name (receiver.close says why): no other
                # thread may take from it meanwhile, so end their waits and take the turn.
                endpoint.withdraw(None)
                with self._turn.lock:
                    endpoint.close(give_back_last=give_back)
            else:
                endpoint.close(give_back_last=give_back)  # also ends a recv blocked on the worker
            if self._worker is not None:
                self._worker.stop()
            self._end_close()

    def __repr__(self) -> str:
        state = "closed" if self._endpoint is None else "open"
        shards = getattr(self, "_num_shards", "?")
        return (
            f"<DataReceiver {getattr(self, '_namespace', '?')}/{getattr(self, '_dataset_name', '?')} "
            f"shard {getattr(self, '_shard_id', '?')}/{shards} {state}>"
        )
