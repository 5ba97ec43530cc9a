"""The broker's operations: decode a request's fields, decide with ``BrokerState``, reply.

Requests that can complete at once return their reply; the others return a ``Waiter``
that retries when the state's signals fire (see state.py) -- the broker never sleeps to
find out whether something changed.

This module holds what every request shares -- decoding its fields, waiting -- and the
requests of a client and its channels (hello, create, open, log, detach, close, slab,
unslab, alloc, free, queue); system.py those that name no channel (the DataSystem's,
stats, status, stop).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

from ..errors import Cancelled, ChannelError, InvalidArgument, StoreFullTimeout
from ..store.arena import ArenaFile
from . import protocol, rules
from .connection import ClientConnection
from .records import Channel, Part, Signal
from .state import WAIT, BrokerState

log = logging.getLogger("shmchannel.broker")

Reply = tuple[dict[str, Any], bytes]


def request_field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidArgument(f"request field {name!r} must be {kind}, got {type(value).__name__}")
    return value


def _count(value: Any, what: str) -> int:
    """``value`` as a byte count or offset: an int >= 0 (not a bool, a float or a string)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"{what} must be an int >= 0, got {value!r}")
    return value


def _counts(msg: dict[str, Any], name: str) -> list[int]:
    return [_count(v, f"request field {name!r}") for v in request_field(msg, name, list)]


def _names(msg: dict[str, Any]) -> tuple[str, str]:
    """A request's (namespace, dataset_name), each checked as the API checks it."""
    return (rules.check_name("request field 'namespace'", msg.get("namespace")),
            rules.check_name("request field 'dataset_name'", msg.get("dataset_name")))


def _asked(msg: dict[str, Any]) -> Any:
    """The timeout the user gave (a client sends what is left of it as ``timeout``)."""
    return msg.get("asked", msg.get("timeout"))


class Waiter:
    """A request that cannot complete yet. It is retried when one of its signals fires --
    on the loop's next turn, so a burst of changes (several frees read in one go) costs one
    retry that takes them all -- and answered when it completes, fails, times out or is
    cancelled. A callback, not a task: a wake-up costs one call, not a task's turn.
    """

    def __init__(
        self, attempt: Callable[[], Any], signals: list[Signal], done: Callable[[Any], Reply],
        on_timeout: Callable[[], ChannelError], timeout: float | None, on_fail: Callable[[], None] | None,
    ) -> None:
        self._attempt, self._signals, self._done = attempt, signals, done
        self._on_timeout, self._timeout, self._on_fail = on_timeout, timeout, on_fail
        self._answer: Callable[[Reply | BaseException], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._scheduled = False
        self.finished = False

    def start(self, answer: Callable[[Reply | BaseException], None]) -> None:
        """Wait; ``answer`` gets the reply, or the exception that ended the request."""
        self._answer = answer
        loop = asyncio.get_running_loop()
        for signal in self._signals:
            signal.add(self._poke)
        if self._timeout is not None:
            self._timer = loop.call_later(self._timeout, self._expire)

    def cancel(self) -> None:
        self._end(Cancelled("request cancelled by the client"))

    def _poke(self) -> None:
        if not self._scheduled and not self.finished:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._retry)

    def _retry(self) -> None:
        self._scheduled = False
        if self.finished:
            return
        try:
            result = self._attempt()
            if result is WAIT:
                return
            outcome: Reply | BaseException = self._done(result)
        except Exception as exc:  # the request's error, or a bug: either way its answer
            outcome = exc
        self._end(outcome)

    def _expire(self) -> None:
        self._timer = None
        self._end(self._on_timeout())

    def _end(self, outcome: Reply | BaseException) -> None:
        if self.finished:
            return
        self.finished = True
        for signal in self._signals:
            signal.discard(self._poke)
        if self._timer is not None:
            self._timer.cancel()
        if not isinstance(outcome, tuple) and self._on_fail is not None:
            self._on_fail()
        if self._answer is not None:
            self._answer(outcome)


class Operations:
    """The channels' request handlers, and what all handlers share; ``SystemOperations``
    (system.py) adds the others, the Server the connections and the lifecycle."""

    state: BrokerState
    arena: ArenaFile

    # -- waiting -------------------------------------------------------------------------

    def _blocking(
        self, attempt: Callable[[], Any], signals: Callable[[], list[Signal]], msg: dict[str, Any],
        done: Callable[[Any], Reply], on_timeout: Callable[[], ChannelError],
        on_fail: Callable[[], None] | None = None,
    ) -> Reply | Waiter:
        """Answer now if ``attempt`` can; otherwise a Waiter (or a timeout error at once)."""
        result = attempt()
        if result is not WAIT:
            return done(result)
        timeout = msg.get("timeout")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout:
                raise InvalidArgument(f"request field 'timeout' must be null or a number of seconds, got {timeout!r}")
            if timeout <= 0:
                raise on_timeout()
            if rules.no_limit(timeout):  # JSON's 1e400 is inf; the loop's timer takes neither
                timeout = None
        return Waiter(attempt, signals(), done, on_timeout, timeout, on_fail)

    def _store_full(self, nbytes: int, msg: dict[str, Any]) -> StoreFullTimeout:
        table = self.state.table
        return StoreFullTimeout(
            f"store full: asked for {nbytes} bytes, {max(0, table.free)} of {table.capacity} free "
            f"(largest free block {table.allocator.largest_free}) after waiting {_asked(msg)} s"
        )

    # -- operations ----------------------------------------------------------------------

    def _channel(self, msg: dict[str, Any]) -> Channel:
        return self.state.channel(*_names(msg))

    def _hello(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        if msg.get("version") != protocol.PROTOCOL_VERSION:
            raise InvalidArgument(
                f"client speaks protocol {msg.get('version')}, this broker {protocol.PROTOCOL_VERSION}: restart it"
            )
        # ``capacity`` is what a client maps: the whole file, the control space included.
        return protocol.ok(pid=os.getpid(), arena=str(self.arena.path), capacity=self.arena.size), b""

    def _create(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        namespace, name = _names(msg)
        num_shards, max_queue_size = request_field(msg, "num_shards", int), request_field(msg, "max_queue_size", int)
        rules.check_channel_shape(num_shards, max_queue_size)
        channel = self.state.create_channel(
            conn.client, namespace, name, num_shards, bool(msg.get("full_batch")), max_queue_size
        )
        return protocol.ok(**channel.info()), b""

    def _open(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Any:
        namespace, name = _names(msg)
        shard = request_field(msg, "shard", int)
        return self._blocking(
            lambda: self.state.try_attach_receiver(conn.client, namespace, name, shard),
            lambda: [self.state.channel_created],
            msg,
            lambda channel: (protocol.ok(**channel.info()), b""),
            lambda: rules.not_found(namespace, name, _asked(msg) if msg.get("timeout") else None),
        )

    def _claim_log(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        """The claim log of the asking process: sent on its session connection, which
        stays open for the life of the process (backends/session.py)."""
        log = self.state.grant_log(conn.client)
        return protocol.ok(offset=log.base, capacity=log.capacity, claimer=log.claimer), b""

    def _detach(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        channel = self.state.channels.get(_names(msg))
        if channel is not None:
            claimer = request_field(msg, "claimer", int, optional=True)
            receiver = request_field(msg, "receiver", int, optional=True)
            shard = request_field(msg, "shard", int, optional=True)
            self.state.detach(conn.client, channel, claimer, receiver, shard)
        return protocol.ok(), b""

    def _close(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        self.state.close_channel(conn.client, self._channel(msg))
        return protocol.ok(), b""

    def _slab(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Any:
        """A slab for a sender's blocks (store/slabs.py) of ``size`` bytes, or less -- down
        to ``need`` -- in a small store: no slab takes more than an eighth of it unless one
        block needs more. Waits up to ``timeout`` for the store to have room."""
        want = _count(request_field(msg, "size", int), "request field 'size'")
        need = _count(msg.get("need", want), "request field 'need'")
        if not 0 < need <= want or want % 64 or need % 64:
            raise InvalidArgument(f"request fields 'need' <= 'size' must be positive multiples of 64, got {need}, {want}")
        table = self.state.table
        table.check_fits([need])
        size = max(need, min(want, table.capacity // 8 // 64 * 64))
        tmpfs_full: list[OSError] = []

        def attempt() -> Any:
            """The slab as large as asked for, else as small as needed (a full store or
            file system may have room for that much)."""
            tmpfs_full.clear()
            for candidate in dict.fromkeys((size, need)):
                try:
                    offset = self.state.try_grant_slab(conn.client, candidate)
                except OSError as exc:  # the tmpfs itself is full: wait for our own frees
                    log.warning("cannot reserve shared memory in %s: %s", self.arena.path.parent, exc)
                    tmpfs_full[:] = [exc]
                    continue
                if offset is not WAIT:
                    return offset, candidate
            return WAIT

        def full() -> StoreFullTimeout:
            if tmpfs_full:
                return StoreFullTimeout(
                    f"no room in {self.arena.path.parent} for the store's pages: asked for {need} bytes, "
                    f"{tmpfs_full[0].strerror or tmpfs_full[0]} (the store has {max(0, table.free)} of "
                    f"{table.capacity} bytes free) after waiting {_asked(msg)} s"
                )
            return self._store_full(need, msg)

        return self._blocking(attempt, lambda: [self.state.store_freed], msg,
                              lambda got: (protocol.ok(offset=got[0], size=got[1]), b""), full)

    def _unslab(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        self.state.return_slabs(conn.client, _counts(msg, "offsets"))
        return protocol.ok(), b""

    def _alloc(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Any:
        return self._allocating(msg, _counts(msg, "sizes"), lambda sizes: self.state.try_allocate(conn.client, sizes),
                                lambda offsets: (protocol.ok(offsets=offsets), b""))

    def _loan(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Any:
        """A block of the store held by this client until it releases it (a sender's loan,
        issue 15): an object without a key pinning it."""
        return self._allocating(msg, [_count(msg.get("size"), "request field 'size'")],
                                lambda sizes: self.state.try_loan(conn.client, sizes[0]),
                                lambda obj: (protocol.ok(key=obj.key, offset=obj.offset), b""))

    def _allocating(self, msg: dict[str, Any], sizes: list[int], try_: Callable[[list[int]], Any],
                    reply: Callable[[Any], Reply]) -> Any:
        """Wait (within the request's timeout) until ``try_`` finds room for ``sizes``."""
        table = self.state.table
        tmpfs_full: list[OSError] = []  # why the last attempt failed, if the tmpfs was the limit

        def attempt() -> Any:
            tmpfs_full.clear()
            try:
                return try_(sizes)
            except OSError as exc:  # the tmpfs itself is full: wait for our own frees
                log.warning("cannot reserve shared memory in %s: %s", self.arena.path.parent, exc)
                tmpfs_full.append(exc)
                return WAIT

        def full() -> StoreFullTimeout:
            if tmpfs_full:
                return StoreFullTimeout(
                    f"no room in {self.arena.path.parent} for the store's pages: asked for {sum(sizes)} bytes, "
                    f"{tmpfs_full[0].strerror or tmpfs_full[0]} (the store has {max(0, table.free)} of "
                    f"{table.capacity} bytes free) after waiting {_asked(msg)} s"
                )
            return self._store_full(sum(sizes), msg)

        return self._blocking(attempt, lambda: [self.state.store_freed], msg, reply, full)

    def _free(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        self.state.free_allocations(conn.client, _counts(msg, "offsets"))
        return protocol.ok(), b""

    @staticmethod
    def _parts(msg: dict[str, Any], payload: bytes) -> list[Part]:
        parts = []
        for item in request_field(msg, "parts", list):
            if "inline" in item:
                start, length = (_count(v, "an inline part's start and length") for v in item["inline"])
                if start + length > len(payload):
                    raise InvalidArgument("inline part outside the payload")
                parts.append(Part(length, inline=payload[start : start + length]))
            else:
                parts.append(Part(_count(item["size"], "a part's size"), offset=_count(item["offset"], "a part's offset")))
        return parts

    def _queue(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        channel = self._channel(msg)
        shard = request_field(msg, "shard", int, optional=True)
        if shard is not None:
            rules.check_shard(shard, channel.num_shards)
        return protocol.ok(queue=self.state.queue(channel, shard)), b""
