"""DataSender: the producing end of a channel."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import aio
from ..backends import backend_for
from ..broker import rules
from ..errors import EndpointClosed, InvalidArgument, UnsupportedType
from ..serialization import row_count, split, splittable
from .checks import check_dtype, check_int, check_name, check_shape, check_timeout
from .endpoint import ChannelEnd, Turn


def _leave(endpoint: Any) -> None:
    endpoint.close(end_of_stream=False)


class DataSender(ChannelEnd):
    """The producing end of a channel: splits each object into shards and queues them.

    Example::

        with DataSender(address="127.0.0.1", dataset_name="clicks", num_shards=2) as sender:
            sender.send(df)        # rows [0, n/2) to shard 0, [n/2, n) to shard 1

    The broker is started if none runs. Raises ValueError (``InvalidArgument``) for a bad
    parameter and ``NameInUse`` (a ValueError) if another sender owns the name.

    A sender whose process left without ``close()`` leaves its stream open: a new sender
    of the same name goes on with it. While that channel has objects queued or receivers
    attached (holding objects or not), the new sender must use the same ``num_shards``,
    ``full_batch`` and ``max_queue_size``; another shape raises ``InvalidArgument`` naming
    what is queued and which receiver holds what. Once its objects are consumed and its
    receivers have left, the channel is gone and the name takes any shape.

    Threads may share a sender: ``get_queue`` and the properties answer while another
    thread's ``send`` waits; sends take turns, each within its own timeout; ``close`` from
    another thread wakes a waiting send with ``EndpointClosed`` and still ends the stream.
    """

    def __init__(
        self,
        address: str | None = None,
        namespace: str = "default",
        num_shards: int = 1,
        dataset_name: str = "dataset",
        full_batch: bool = False,
        max_queue_size: int = 10,
        *,
        inline_threshold: int | None = None,
    ) -> None:
        self._endpoint: Any = None
        self._worker: aio.Worker | None = None  # runs asend's sends and the main thread's, in order
        self._main_waits = False  # the main thread waits in a send of this sender
        self._turn = Turn("this DataSender")
        self._namespace = check_name("namespace", namespace)
        self._dataset_name = check_name("dataset_name", dataset_name)
        self._num_shards = check_int("num_shards", num_shards, 1)
        if not isinstance(full_batch, bool):
            raise InvalidArgument(f"full_batch must be a bool, got {full_batch!r} ({type(full_batch).__name__})")
        self._full_batch = full_batch
        self._max_queue_size = check_int("max_queue_size", max_queue_size, 1)
        rules.check_channel_shape(num_shards, max_queue_size)  # and at most rules.MAX_SHARDS shards
        if inline_threshold is not None:
            check_int("inline_threshold", inline_threshold, 0)
        backend = backend_for(address, inline_threshold=inline_threshold)
        self._address = address
        self._open(lambda made: backend.create_sender(namespace, dataset_name, num_shards, full_batch, max_queue_size,
                                                      made), _leave)

    # -- reference API -------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        """How many shards each object is split into (``sender.num_shards == 2``)."""
        return self._num_shards

    @property
    def full_batch(self) -> bool:
        """Whether every shard gets the whole object instead of a block."""
        return self._full_batch

    def send(self, obj: Any, timeout: float | None = None) -> None:
        """Split ``obj`` row-wise into ``num_shards`` blocks and queue block i for shard i.

        These are split: numpy.ndarray (subclasses too: memmap, recarray, masked arrays),
        list, pandas DataFrame/Series, pyarrow Table/RecordBatch, polars DataFrame, a dense
        CPU or meta torch.Tensor (along dim 0; a block of a tensor requiring grad arrives
        detached, a whole leaf keeps requires_grad), and a dict of equal-length columns
        (each split alike). Any other picklable object is queued whole, which needs
        ``num_shards=1`` or ``full_batch``; with ``full_batch`` every shard gets the whole
        object. Blocks while a shard's queue holds ``max_queue_size`` objects (or the store
        is full), at most ``timeout`` seconds. All shards are queued or none. On the embedded
        backend a send is a copy into shared memory and a few atomic operations: no message
        to the broker, which hears from a sender only when it needs another slab of memory
        (DESIGN.md, "The data path").

        Raises:
            TypeError (``UnsupportedType``): ``obj`` must be split but cannot be (another
                type, a 0-d array or tensor, an empty dict or one holding a non-column);
                or it cannot be pickled, or holds a torch.Tensor that is not on the CPU.
            ValueError: the rows of ``obj`` are not a positive multiple of ``num_shards``
                (of 1 with ``full_batch``), or a dict to be split has columns of unequal lengths.
            TimeoutError: ``timeout`` ran out; nothing was queued (``StoreFullTimeout`` if
                the store stayed full).
            StoreFull: one object is larger than the whole store.
            EndpointClosed: this sender was closed (also by another thread meanwhile).
            ReentrantCall (a RuntimeError): called from a signal handler while its own
                thread is inside a send of this sender.

        Another thread's send of this sender goes first; the wait for it counts against
        ``timeout`` (``TimeoutError`` saying so if it runs out, nothing queued).

        Example::

            sender.send(pd.DataFrame({"x": range(100)}))   # 50 rows to each of 2 shards
            sender.send(batch, timeout=5)                   # TimeoutError if still full after 5 s
        """
        endpoint = self._live()
        timeout = check_timeout("timeout", timeout)
        self._send_parts(endpoint, self._parts(obj), timeout)

    def _send_parts(self, endpoint: Any, parts: list[Any], timeout: float | None, done: Any = None) -> None:
        """Send on the path this thread and backend take; ``done`` runs once the send is
        over, in the thread that made it (whether it went or not)."""
        main = aio.in_main_thread()
        if self._worker is not None or (main and not getattr(endpoint, "interrupt_safe", False)):
            self._deliver_on_worker(endpoint, parts, timeout, done)
        elif main:
            try:
                self._deliver_main(endpoint, parts, timeout)
            finally:
                if done is not None:
                    done()
        else:
            self._deliver(endpoint, parts, timeout, False, done)

    def _deliver_main(self, endpoint: Any, parts: list[Any], timeout: float | None) -> None:
        """A send of the main thread, where interrupts are raised, on a backend whose steps
        are interrupt-safe (embedded: the send is withdrawn if cut short, and queued whole
        or not at all). The turn is a with block on its lock, whose enter and exit are C:
        no interrupt comes between taking it and owning the block. It waits for another
        thread's send without counting that against ``timeout``."""
        self._refuse_reentry("a send")
        with self._turn.lock:
            if self._endpoint is not endpoint:  # closed by another thread while this waited
                raise EndpointClosed(f"{self!r} is closed")
            self._main_waits = True
            try:
                endpoint.send(parts, timeout)
            finally:
                self._main_waits = False

    def _deliver_on_worker(self, endpoint: Any, parts: list[Any], timeout: float | None, done: Any = None) -> None:
        """Send on the worker: after the asend calls still running, in order; and for the
        main thread, so that an interrupt ends only the wait (aio.py). The send is then
        withdrawn: queued whole if the broker took it first, else not at all."""
        main = aio.in_main_thread()
        handing = waits = False  # handing: set just before the job is (the worker runs ``done`` then)
        try:
            if main:
                self._refuse_reentry("a send")  # (the outer call's _main_waits stays as it is)
                self._main_waits = waits = True
            if self._worker is None:
                self._worker = aio.Worker(f"shmchannel {self!r}")
            worker = self._worker
            handing = True
            job = worker.submit(self._deliver, endpoint, parts, timeout, True, done)
            try:
                aio.result(job)
            except BaseException:
                if not job.done():
                    aio.withdraw(job, lambda: endpoint.withdraw(worker.ident), aio.WITHDRAW_TIMEOUT)
                raise
        finally:
            if waits:
                self._main_waits = False
            if not handing and done is not None:
                done()  # never handed over (a reentrant call, no worker): the send is over

    def _deliver(self, endpoint: Any, parts: list[Any], timeout: float | None, handed_over: bool = False,
                 done: Any = None) -> None:
        """One send; ``handed_over``: run by the worker, which runs ``close`` after it -- so
        it is sent though close() began (asend: "once handed over it is sent")."""
        try:
            with self._turn.held(timeout) as left:
                if self._endpoint is not endpoint and not handed_over:  # closed by another thread while this waited
                    raise EndpointClosed(f"{self!r} is closed")
                endpoint.send(parts, left)
        finally:
            if done is not None:
                done()

    def _parts(self, obj: Any) -> list[Any]:
        """The blocks of ``obj`` for the shards (the whole object once if it is not split)."""
        divisor = 1 if self._full_batch else self._num_shards
        if divisor == 1 and type(obj) is np.ndarray and obj.ndim and obj.shape[0]:
            return [obj]  # the most common object, checked as row_count would, without its cost
        if divisor == 1 and not splittable(obj):
            return [obj]  # any picklable object; serialize() names what it cannot carry
        rows = row_count(obj)  # UnsupportedType / InvalidArgument saying why obj cannot be split
        if rows == 0 or rows % divisor:
            what = "the column length of obj" if isinstance(obj, dict) else "len(obj)"  # len(dict) counts keys
            raise InvalidArgument(
                f"{what} must be a positive multiple of num_shards ({divisor}), got {rows}"
                if divisor > 1
                else f"{what} must be positive, got {rows}"
            )
        return [obj] if divisor == 1 else split(obj, self._num_shards)

    def get_queue(self, shard_id: int | None = None) -> Any:
        """Keys not yet received: a list for ``shard_id``, or ``{shard: list}`` for all shards.

        Answers at once, also while another thread's ``send`` of this sender waits for room.

        Example::

            backlog = {shard: len(keys) for shard, keys in sender.get_queue().items()}
        """
        if shard_id is not None:
            check_int("shard_id", shard_id, 0)
            if shard_id >= self._num_shards:
                raise InvalidArgument(f"shard_id must be less than num_shards ({self._num_shards}), got {shard_id}")
        return self._live().queue(shard_id)

    # -- beyond the reference ------------------------------------------------------------

    def empty(self, shape: Any, dtype: Any = np.float64, order: str = "C", *, timeout: float | None = None) -> np.ndarray:
        """A new writable array of ``shape`` and ``dtype`` (C or F ``order``), uninitialized,
        in the store's shared memory: fill it in place, then ``send`` it, and no byte is
        copied on the way -- on the embedded backend.

        A send of this sender references rather than copies every buffer that lies inside
        such an array (another sender copies it):
        the array itself, a row block of it, a ``torch.from_numpy`` tensor over it, a pandas
        DataFrame, dict of columns or pyarrow Table over its memory (a buffer that is not
        one contiguous run of it -- a column of a C-order matrix -- is copied, as is any
        polars DataFrame). With ``num_shards > 1`` each shard references its own rows.
        Receivers get read-only views -- but for torch tensors, which arrive as copies of
        their own: torch has no read-only tensors (as for ``full_batch``).

        After a send the arrays it sent and this array are read-only: writing raises
        ``ValueError: assignment destination is read-only``, as receivers may still read
        the memory. A view taken before the send keeps its flag (numpy does not track
        views), and torch ignores the flag: do not write through those after sending.
        The memory goes back to the store once this array and its views are gone and
        every receiver that got it released it -- also after ``close()``, or if this
        process dies (the broker takes over).

        Costs one round trip to the broker (tens of µs): for batches of ~1 MiB and more;
        small objects are as fast sent by ``send`` as they are. On the Ray backend this
        is ``numpy.empty``: Ray's ``put`` copies a send into its object store whatever
        memory it comes from.

        Raises:
            ValueError (``InvalidArgument``): ``shape`` is not an int >= 0 or a tuple of
                them, ``dtype`` not a numpy dtype or one holding Python objects, ``order``
                not "C" or "F"; ``timeout`` not None or seconds >= 0.
            StoreFull: the array is larger than the whole store.
            TimeoutError (``StoreFullTimeout``): no room within ``timeout`` seconds.
            EndpointClosed: this sender was closed.
            ReentrantCall (a RuntimeError): called from a signal handler that interrupted
                this thread inside this sender's bookkeeping of its loans.

        Example::

            batch = sender.empty((4096, 256), np.float32)
            featurize(rows, out=batch)         # writes in place
            sender.send(batch)                 # no copy; batch is read-only from now on
        """
        endpoint = self._live()
        shape = check_shape("shape", shape)
        dtype = check_dtype("dtype", dtype)
        if order not in ("C", "F"):
            raise InvalidArgument(f'order must be "C" or "F", got {order!r:.40}')
        return self._request(endpoint.empty, shape, dtype, order, check_timeout("timeout", timeout))

    def empty_like(self, array: Any, dtype: Any = None, order: str = "K", shape: Any = None, *,
                   timeout: float | None = None) -> np.ndarray:
        """``empty`` with the shape and dtype of ``array`` (a numpy.ndarray), as
        ``numpy.empty_like``: ``order="K"`` keeps F order for an F-contiguous ``array``,
        C otherwise; ``dtype`` and ``shape`` override.

        Raises: as ``empty``, and ``InvalidArgument`` if ``array`` is not a numpy.ndarray.

        Example::

            out = sender.empty_like(template)
            np.multiply(template, 2, out=out)
            sender.send(out)
        """
        if not isinstance(array, np.ndarray):
            raise InvalidArgument(f"array must be a numpy.ndarray, got {type(array).__name__}")
        if order == "K":
            order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
        elif order == "A":
            order = "F" if array.flags.f_contiguous else "C"
        elif order not in ("C", "F"):
            raise InvalidArgument(f'order must be "K", "A", "C" or "F", got {order!r:.40}')
        return self.empty(array.shape if shape is None else shape, array.dtype if dtype is None else dtype, order,
                          timeout=timeout)

    def _request(self, call: Any, *args: Any) -> Any:
        """``call(*args)``, a request to the broker; in the main thread it counts as a wait
        of this sender's (``_main_waits``): a signal handler's call of it meanwhile raises
        ReentrantCall -- its request would wait for a reply that the interrupted thread's
        connection lock keeps from being routed (found by the random handler test)."""
        if not aio.in_main_thread():
            return call(*args)
        self._refuse_reentry("a call")
        try:
            self._main_waits = True  # (inside the try: set, it is always cleared)
            return call(*args)
        finally:
            self._main_waits = False

    def send_key(self, key: str, timeout: float | None = None) -> None:
        """Queue the object the DataSystem holds under ``key`` -- its buffers referenced,
        not copied (embedded backend) -- split into ``num_shards`` row blocks as ``send``
        splits (or whole, with ``full_batch``). The seed's design: "after the data is
        processed, send the key corresponding to the data".

        The same key may go to several channels (a training and an evaluation stream):
        its memory is held once, and freed when every receiver of every channel released
        it and the key was deleted. Deleting the key right after ``send_key`` is safe.
        An object small enough to be kept inline at the broker (``inline_threshold``) is
        copied instead, as is anything in it that is no view of its memory (pickled
        Python objects). On the Ray backend the object is fetched and sent: a copy.

        Raises:
            KeyError (``ObjectNotFound``): no object under ``key``.
            TypeError / ValueError: as ``send``, naming the key, when the object must be
                split and cannot be -- also a list, whose items would be copied: with
                ``num_shards > 1`` only objects split by views (arrays, frames, tables,
                tensors, dicts of columns) are, or use ``full_batch``.
            TimeoutError, EndpointClosed: as ``send``.

        Example::

            key = ds.put(features)
            train.send_key(key)
            evaluate.send_key(key)         # the same memory, no second copy
            ds.delete(key)                 # freed once both streams are done with it
        """
        endpoint = self._live()
        key = check_name("key", key)
        timeout = check_timeout("timeout", timeout)
        obj, done = self._request(endpoint.borrow, key)
        try:
            divisor = 1 if self._full_batch else self._num_shards
            if divisor > 1 and isinstance(obj, list):
                raise UnsupportedType(
                    f"the object under key {key!r} is a list: its items would be copied to split it into "
                    f"num_shards={divisor} blocks; send_key splits only objects whose blocks are views "
                    "(arrays, frames, tables, tensors, dicts of columns), or use full_batch=True"
                )
            try:
                parts = self._parts(obj)
            except (UnsupportedType, InvalidArgument) as exc:
                raise type(exc)(f"the object under key {key!r}: {exc}") from None
        except BaseException:
            done()
            raise
        self._send_parts(endpoint, parts, timeout, done)

    async def asend(self, obj: Any, timeout: float | None = None) -> None:
        """``send`` for asyncio: waits for room without blocking the event loop.

        Example::

            async for message in kafka_consumer:        # an async producer
                await sender.asend(featurize(message.value))

        Sends run in order, on a thread of this sender. A bad argument raises at once.
        Cancelling the await does not withdraw the object: once handed over it is sent.

        Raises: as ``send``.
        """
        endpoint = self._live()
        timeout = check_timeout("timeout", timeout)
        parts = self._parts(obj)
        if self._worker is None:
            self._worker = aio.Worker(f"shmchannel {self!r}")
        await aio.wait_for(self._worker.submit(self._deliver, endpoint, parts, timeout, True))

    @property
    def max_queue_size(self) -> int:
        """At most this many objects wait in each shard's queue; ``send`` blocks beyond."""
        return self._max_queue_size

    def close(self) -> None:
        """End the stream: receivers get what is queued, then ``ChannelClosed``. Idempotent.

        On the Ray backend it blocks until every object sent is queued, then for up to
        ``SHMCHANNEL_RAY_ADOPT_AFTER`` seconds (1) until receivers took the objects this
        process still owns, then while the holder of this node copies the rest (it adopts
        them), so that they outlive the process (README, "Where things live").

        Raises (Ray backend only; the stream is ended all the same):
            BrokerUnavailable, or the error of an earlier send that returned before the
                channel's actor had answered it (a send with room does not wait): it names
                the objects not queued.
            ObjectLost: the holder could not adopt some objects (its node's holder failed,
                or did not answer within 10 s): they die with this process.

        Example::

            sender = DataSender(dataset_name="clicks")
            try:
                for batch in batches():
                    sender.send(batch)
            finally:
                sender.close()       # or use ``with DataSender(...) as sender:``
        """
        endpoint = self._begin_close()  # an interrupted close() is finished by the next
        if endpoint is not None:
            if self._worker is not None:  # after the sends asend handed over, which are sent
                aio.result(self._worker.submit(endpoint.close, True))
                self._worker.stop()
            else:
                endpoint.close(end_of_stream=True)
            self._end_close()

    def __repr__(self) -> str:
        state = "closed" if self._endpoint is None else "open"
        return (
            f"<DataSender {getattr(self, '_namespace', '?')}/{getattr(self, '_dataset_name', '?')} "
            f"{getattr(self, '_num_shards', '?')} shards{' full_batch' if getattr(self, '_full_batch', False) else ''} {state}>"
        )
