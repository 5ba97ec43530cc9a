"""The public API: DataSender, DataReceiver, DataSystem (``mindpandas.channel`` compatible).

Each class checks its arguments once, here, and delegates to a backend endpoint chosen by
``address``; what it adds to the reference is keyword-only.
"""

from __future__ import annotations

import asyncio
import os
import warnings
import weakref
import functools
from typing import Any, AsyncIterator, Callable, Iterator

from . import aio

from .backends import backend_for
from .broker import rules
from .errors import ChannelClosed, ChannelTimeout, EndpointClosed, InvalidArgument
from .serialization import row_count, split, splittable
from .store.table import StoreStats

MAX_NAME = 1024
#: Objects a receiver fetches per round trip when that many are queued (see DataReceiver).
PREFETCH = int(os.environ.get("SHMCHANNEL_PREFETCH", 8))


def _check_name(param: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{param} must be a str, got {value!r} ({type(value).__name__})")
    if not value or len(value) > MAX_NAME or "\x00" in value:
        raise InvalidArgument(f"{param} must be 1 to {MAX_NAME} characters without NUL, got {value[:40]!r} (length {len(value)})")
    return value


def _check_int(param: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise InvalidArgument(f"{param} must be {what}, got {value!r} ({type(value).__name__})")
    return value


def _check_timeout(param: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidArgument(f"{param} must be None or a number of seconds >= 0, got {value!r} ({type(value).__name__})")
    return float(value)


def _never() -> ChannelTimeout:
    raise AssertionError("waited without a timeout")


def _warn_unclosed(what: str, close: Callable[[], None]) -> None:
    """Finalizer of a forgotten endpoint: warn, then leave the channel without ending it."""
    warnings.warn(f"{what} was never closed; call close() or use it in a with block", ResourceWarning, stacklevel=2)
    try:
        close()
    except Exception:
        pass


class DataSender:
    """The producing end of a channel: splits each object into shards and queues them.

    Example::

        with DataSender(address="127.0.0.1", dataset_name="clicks", num_shards=2) as sender:
            sender.send(df)        # rows [0, n/2) to shard 0, [n/2, n) to shard 1

    The broker is started if none runs. Raises ValueError (``InvalidArgument``) for a bad
    parameter and ``NameInUse`` (a ValueError) if another sender owns the name.
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
        self._worker: aio.Worker | None = None  # runs asend's sends, in order
        self._namespace = _check_name("namespace", namespace)
        self._dataset_name = _check_name("dataset_name", dataset_name)
        self._num_shards = _check_int("num_shards", num_shards, 1)
        if not isinstance(full_batch, bool):
            raise InvalidArgument(f"full_batch must be a bool, got {full_batch!r} ({type(full_batch).__name__})")
        self._full_batch = full_batch
        self._max_queue_size = _check_int("max_queue_size", max_queue_size, 1)
        rules.check_channel_shape(num_shards, max_queue_size)  # and at most rules.MAX_SHARDS shards
        if inline_threshold is not None:
            _check_int("inline_threshold", inline_threshold, 0)
        backend = backend_for(address, inline_threshold=inline_threshold)
        self._address = address
        self._endpoint = backend.create_sender(namespace, dataset_name, num_shards, full_batch, max_queue_size)
        self._finalizer = weakref.finalize(
            self, _warn_unclosed, repr(self), functools.partial(self._endpoint.close, end_of_stream=False)
        )

    # -- reference API -------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return self._num_shards

    @property
    def full_batch(self) -> bool:
        return self._full_batch

    def send(self, obj: Any, timeout: float | None = None) -> None:
        """Split ``obj`` row-wise into ``num_shards`` blocks and queue block i for shard i.

        These are split: numpy.ndarray, list, pandas DataFrame/Series, pyarrow Table/RecordBatch,
        polars DataFrame, CPU torch.Tensor (along dim 0, detached), and a dict of equal-length
        columns (each split alike). Any other picklable object is queued whole, which needs
        ``num_shards=1`` or ``full_batch``; with ``full_batch`` every shard gets the whole
        object. Blocks while a shard's queue holds ``max_queue_size`` objects (or the store
        is full), at most ``timeout`` seconds. All shards are queued or none. On the embedded
        backend a send the queue is known to have room for returns without waiting for the
        broker's answer; should the broker still refuse it, a later call of this sender
        raises that error.

        Raises:
            TypeError (``UnsupportedType``): ``obj`` must be split but cannot be (another
                type, a 0-d array or tensor, an empty dict or one holding a non-column);
                or it cannot be pickled, or holds a torch.Tensor that is not on the CPU.
            ValueError: the rows of ``obj`` are not a positive multiple of ``num_shards``
                (of 1 with ``full_batch``), or a dict to be split has columns of unequal lengths.
            TimeoutError: ``timeout`` ran out; nothing was queued (``StoreFullTimeout`` if
                the store stayed full).
            StoreFull: one object is larger than the whole store.
            EndpointClosed: this sender was closed.
        """
        endpoint = self._live()
        timeout = _check_timeout("timeout", timeout)
        parts = self._parts(obj)
        if self._worker is not None:  # after the asend calls still running, in order
            self._worker.submit(endpoint.send, parts, timeout).result()
        else:
            endpoint.send(parts, timeout)

    def _parts(self, obj: Any) -> list[Any]:
        """The blocks of ``obj`` for the shards (the whole object once if it is not split)."""
        divisor = 1 if self._full_batch else self._num_shards
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
        """Keys not yet received: a list for ``shard_id``, or ``{shard: list}`` for all shards."""
        if shard_id is not None:
            _check_int("shard_id", shard_id, 0)
            if shard_id >= self._num_shards:
                raise InvalidArgument(f"shard_id must be less than num_shards ({self._num_shards}), got {shard_id}")
        return self._live().queue(shard_id)

    # -- beyond the reference ------------------------------------------------------------

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
        timeout = _check_timeout("timeout", timeout)
        parts = self._parts(obj)
        if self._worker is None:
            self._worker = aio.Worker(f"shmchannel {self!r}")
        await aio.wait_for(self._worker.submit(endpoint.send, parts, timeout), None, _never)

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def dataset_name(self) -> str:
        return self._dataset_name

    @property
    def max_queue_size(self) -> int:
        return self._max_queue_size

    @property
    def closed(self) -> bool:
        return self._endpoint is None

    def close(self) -> None:
        """End the stream: receivers get what is queued, then ``ChannelClosed``. Idempotent."""
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            self._finalizer.detach()
            if self._worker is not None:  # after the sends asend handed over, which are sent
                self._worker.submit(endpoint.close, True).result()
                self._worker.stop()
            else:
                endpoint.close(end_of_stream=True)

    def _live(self) -> Any:
        if self._endpoint is None:
            raise EndpointClosed(f"{self!r} is closed")
        return self._endpoint

    def __enter__(self) -> DataSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._endpoint is None else "open"
        return (
            f"<DataSender {getattr(self, '_namespace', '?')}/{getattr(self, '_dataset_name', '?')} "
            f"{getattr(self, '_num_shards', '?')} shards{' full_batch' if getattr(self, '_full_batch', False) else ''} {state}>"
        )


class DataReceiver:
    """The consuming end of one shard of a channel.

    Example::

        with DataReceiver(address="127.0.0.1", dataset_name="clicks", shard_id=0, wait=30) as rx:
            for part in rx:          # ends after the sender's close() and the queue drained
                train(part)

    Received arrays (and the numeric columns of DataFrames) are views of shared memory,
    writable unless the object is shared with other shards (``full_batch``); the memory
    returns to the store when the last of them is dropped.
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

        ``recv`` fetches up to ``prefetch`` queued objects in one round trip to the broker
        and hands them out in order: they leave the queue (making room for the sender) but
        stay this receiver's, put back at the head of the queue by ``close`` if not handed
        out, and by the broker if this process dies. ``prefetch=1`` fetches one at a time.

        Raises:
            ChannelNotFound (ValueError): no sender created it (within ``wait``).
            ValueError: a bad parameter, or ``shard_id >= num_shards`` of the channel.
        """
        self._endpoint: Any = None
        self._worker: aio.Worker | None = None  # runs arecv's recv calls
        self._pending: aio.Job | None = None  # a recv whose awaiting arecv gave up (see aio.py)
        self._async_lock: asyncio.Lock | None = None
        self._namespace = _check_name("namespace", namespace)
        self._dataset_name = _check_name("dataset_name", dataset_name)
        self._shard_id = _check_int("shard_id", shard_id, 0)
        wait = _check_timeout("wait", wait)
        prefetch = _check_int("prefetch", prefetch, 1)
        backend = backend_for(address)
        self._endpoint = backend.open_receiver(namespace, dataset_name, shard_id, wait, prefetch)
        self._num_shards = self._endpoint.num_shards
        self._finalizer = weakref.finalize(self, _warn_unclosed, repr(self), self._endpoint.close)

    @property
    def shard_id(self) -> int:
        return self._shard_id

    @property
    def num_shards(self) -> int:
        return self._num_shards

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def dataset_name(self) -> str:
        return self._dataset_name

    @property
    def closed(self) -> bool:
        return self._endpoint is None

    def recv(self, timeout: float | None = None) -> Any:
        """Remove and return the oldest object of this shard; block while it is empty.

        Acknowledges the objects received before (see ``ack``).

        Raises:
            TimeoutError (``ChannelTimeout``): nothing arrived within ``timeout`` seconds.
            ChannelClosed: the sender closed the channel and this shard is drained.
            EndpointClosed: this receiver was closed.
        """
        endpoint = self._live()
        timeout = _check_timeout("timeout", timeout)
        if self._pending is not None:
            return self._pending_result(timeout, keep=False)
        return endpoint.recv(timeout, False)

    def peek(self, timeout: float | None = None) -> Any:
        """Like ``recv`` but leave the object in the queue."""
        endpoint = self._live()
        timeout = _check_timeout("timeout", timeout)
        if self._pending is not None:
            return self._pending_result(timeout, keep=True)
        return endpoint.recv(timeout, True)

    async def arecv(self, timeout: float | None = None) -> Any:
        """``recv`` for asyncio: waits without blocking the event loop.

        Example::

            rx = DataReceiver("127.0.0.1", dataset_name="events", wait=30)
            first = await rx.arecv(timeout=5)
            async for batch in rx:      # until the sender closes the channel
                await handle(batch)

        Cancelling it (or its ``timeout`` running out) loses nothing: the object that then
        arrives is the one the next ``recv``/``arecv`` returns, or ``close`` puts it back.
        Concurrent ``arecv`` calls on one receiver are served one after the other.

        Raises: as ``recv``.
        """
        self._live()
        timeout = _check_timeout("timeout", timeout)
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:
            job = self._pending
            if job is None:
                endpoint = self._live()
                if self._worker is None:
                    self._worker = aio.Worker(f"shmchannel {self!r}")
                job = self._pending = self._worker.submit(endpoint.recv, None, False)
            try:
                obj = await aio.wait_for(job, timeout, lambda: self._expired(timeout))
            except asyncio.CancelledError:
                raise  # the job stays pending: its object goes to the next call
            except BaseException:
                if job.done() and self._pending is job:
                    self._pending = None
                raise
            self._pending = None
            return obj

    def __aiter__(self) -> AsyncIterator[Any]:
        """``async for obj in receiver``: ``arecv`` until the end of the stream."""
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        while True:
            try:
                obj = await self.arecv()
            except ChannelClosed:
                return
            yield obj
            del obj  # as in __iter__

    def _pending_result(self, timeout: float | None, keep: bool) -> Any:
        job = self._pending
        assert job is not None
        try:
            obj = aio.result(job, timeout, lambda: self._expired(timeout))
        except BaseException:
            if job.done() and self._pending is job:
                self._pending = None
            raise
        if not keep:
            self._pending = None
        return obj

    def _expired(self, timeout: float | None) -> ChannelTimeout:
        return ChannelTimeout(
            f"recv timed out after {timeout} s: shard {self._shard_id} of {self._namespace}/{self._dataset_name} stayed empty"
        )

    def ack(self) -> None:
        """Acknowledge the objects received so far: they are consumed, and their memory
        returns to the store once they are dropped.

        Without it the next ``recv``/``peek`` or ``close`` acknowledges them. Until then
        the broker (or Ray channel actor) keeps them, and if this process dies they go back
        to the head of the queue for the next receiver of this shard (at-least-once).
        """
        self._live().ack()

    def get_queue(self, shard_id: int | None = None) -> Any:
        """Keys not yet received: a list for ``shard_id``, or ``{shard: list}`` for all shards."""
        if shard_id is not None:
            _check_int("shard_id", shard_id, 0)
        return self._live().queue(shard_id)

    def __iter__(self) -> Iterator[Any]:
        """Receive until the end of the stream (``ChannelClosed``)."""
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
        """
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            self._finalizer.detach()
            job, self._pending = self._pending, None
            give_back = job is not None and job.done() and job.exception() is None
            del job
            endpoint.close(give_back_last=give_back)  # also ends a recv blocked on the worker
            if self._worker is not None:
                self._worker.stop()

    def _live(self) -> Any:
        if self._endpoint is None:
            raise EndpointClosed(f"{self!r} is closed")
        return self._endpoint

    def __enter__(self) -> DataReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._endpoint is None else "open"
        shards = getattr(self, "_num_shards", "?")
        return (
            f"<DataReceiver {getattr(self, '_namespace', '?')}/{getattr(self, '_dataset_name', '?')} "
            f"shard {getattr(self, '_shard_id', '?')}/{shards} {state}>"
        )


class DataSystem:
    """A key-value store whose values live in shared memory, owned by the broker.

    Example::

        with DataSystem(address="127.0.0.1") as ds:
            key = ds.put(np.arange(10))
            view = ds.get(key)       # read-only view of shared memory
            ds.delete(key)
    """

    def __init__(self, address: str | None = None, *, inline_threshold: int | None = None) -> None:
        self._endpoint: Any = None
        if inline_threshold is not None:
            _check_int("inline_threshold", inline_threshold, 0)
        self._endpoint = backend_for(address, inline_threshold=inline_threshold).data_system()
        self._finalizer = weakref.finalize(self, _warn_unclosed, "DataSystem", self._endpoint.close)

    def put(self, obj: Any, *, timeout: float | None = None) -> str:
        """Store any picklable object; return its key. The object stays until ``delete``.

        Raises:
            StoreFull / StoreFullTimeout: no room (within ``timeout`` seconds).
        """
        return str(self._live().put(obj, _check_timeout("timeout", timeout)))

    def get(self, key: str) -> Any:
        """The object under ``key``; its arrays are read-only views of shared memory.

        Raises:
            KeyError (``ObjectNotFound``): no object under ``key``.
        """
        return self._live().get(_check_name("key", key))

    def delete(self, key: str) -> None:
        """Remove ``key``; views already handed out stay valid until dropped.

        Raises:
            KeyError (``ObjectNotFound``): no object under ``key``.
        """
        self._live().delete(_check_name("key", key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(key) and bool(self._live().contains(key))

    def stats(self) -> StoreStats:
        """Capacity, bytes used and object count of the store."""
        stats: StoreStats = self._live().stats()
        return stats

    @property
    def closed(self) -> bool:
        return self._endpoint is None

    def close(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            self._finalizer.detach()
            endpoint.close()

    def _live(self) -> Any:
        if self._endpoint is None:
            raise EndpointClosed("this DataSystem is closed")
        return self._endpoint

    def __enter__(self) -> DataSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DataSystem {'closed' if self._endpoint is None else 'open'}>"
