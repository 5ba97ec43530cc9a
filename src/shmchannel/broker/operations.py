"""The broker's operations: decode a request's fields, decide with ``BrokerState``, reply.

Requests that can complete at once return their reply; the others return a coroutine that
waits on the state's signals (see state.py) -- the broker never sleeps to find out whether
something changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable

from ..errors import ChannelError, InvalidArgument, StoreFullTimeout
from ..store.arena import ArenaFile
from . import protocol, rules
from .connection import ClientConnection
from .state import WAIT, BrokerState, Channel, Part, Signal

log = logging.getLogger("shmchannel.broker")

Reply = tuple[dict[str, Any], bytes]


def request_field(msg: dict[str, Any], name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidArgument(f"request field {name!r} must be {kind}, got {type(value).__name__}")
    return value


def _asked(msg: dict[str, Any]) -> Any:
    """The timeout the user gave (a client sends what is left of it as ``timeout``)."""
    return msg.get("asked", msg.get("timeout"))


class Operations:
    """Request handlers; the Server adds the connections and the lifecycle."""

    state: BrokerState
    arena: ArenaFile
    started: float
    idle_timeout: float
    stopping: asyncio.Event

    # -- waiting -------------------------------------------------------------------------

    async def _until(self, signals: list[Signal], attempt: Callable[[], Any], timeout: float | None) -> Any:
        """Retry ``attempt`` each time one of ``signals`` fires, until it stops returning WAIT.

        Raises:
            asyncio.TimeoutError: ``timeout`` seconds passed first.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            # Ask again before waiting: between the caller's first attempt and this task's
            # first step, another client may have changed the state and fired the signal.
            result = attempt()
            if result is not WAIT:
                return result
            future: asyncio.Future[None] = loop.create_future()

            def wake(future: asyncio.Future[None] = future) -> None:
                if not future.done():
                    future.set_result(None)

            for signal in signals:
                signal.add(wake)
            try:
                if deadline is None:
                    await future
                else:
                    await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
            finally:
                for signal in signals:
                    signal.discard(wake)

    def _blocking(
        self, attempt: Callable[[], Any], signals: Callable[[], list[Signal]], msg: dict[str, Any],
        done: Callable[[Any], Reply], on_timeout: Callable[[], ChannelError],
    ) -> Any:
        """Answer now if ``attempt`` can; otherwise a coroutine that waits (or a timeout error)."""
        result = attempt()
        if result is not WAIT:
            return done(result)
        timeout = msg.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise on_timeout()

        async def wait() -> Reply:
            try:
                return done(await self._until(signals(), attempt, timeout))
            except asyncio.TimeoutError:
                raise on_timeout() from None

        return wait()

    # -- operations ----------------------------------------------------------------------

    def _channel(self, msg: dict[str, Any]) -> Channel:
        return self.state.channel(request_field(msg, "namespace", str), request_field(msg, "dataset_name", str))

    def _hello(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        if msg.get("version") != protocol.PROTOCOL_VERSION:
            raise InvalidArgument(
                f"client speaks protocol {msg.get('version')}, this broker {protocol.PROTOCOL_VERSION}: restart it"
            )
        return protocol.ok(pid=os.getpid(), arena=str(self.arena.path), capacity=self.arena.capacity), b""

    def _create(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        channel = self.state.create_channel(
            conn.client,
            request_field(msg, "namespace", str),
            request_field(msg, "dataset_name", str),
            request_field(msg, "num_shards", int),
            bool(msg.get("full_batch")),
            request_field(msg, "max_queue_size", int),
        )
        return protocol.ok(**channel.info()), b""

    def _open(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Any:
        namespace, name = request_field(msg, "namespace", str), request_field(msg, "dataset_name", str)
        shard = request_field(msg, "shard", int)
        return self._blocking(
            lambda: self.state.try_attach_receiver(conn.client, namespace, name, shard),
            lambda: [self.state.channel_created],
            msg,
            lambda channel: (protocol.ok(**channel.info()), b""),
            lambda: rules.not_found(namespace, name, _asked(msg) if msg.get("timeout") else None),
        )

    def _detach(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        channel = self.state.channels.get((request_field(msg, "namespace", str), request_field(msg, "dataset_name", str)))
        if channel is not None:
            self.state.detach(conn.client, channel)
        return protocol.ok(), b""

    def _close(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        self.state.close_channel(conn.client, self._channel(msg))
        return protocol.ok(), b""

    def _alloc(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Any:
        sizes = [int(s) for s in request_field(msg, "sizes", list)]
        if any(s < 0 for s in sizes):
            raise InvalidArgument("alloc sizes must not be negative")
        table = self.state.table

        def attempt() -> Any:
            try:
                return self.state.try_allocate(conn.client, sizes)
            except OSError as exc:  # /dev/shm itself is full: wait for our own frees
                log.warning("cannot reserve shared memory: %s", exc)
                return WAIT

        return self._blocking(
            attempt,
            lambda: [self.state.store_freed],
            msg,
            lambda offsets: (protocol.ok(offsets=offsets), b""),
            lambda: StoreFullTimeout(
                f"store full: asked for {sum(sizes)} bytes, {table.allocator.free} of "
                f"{table.allocator.capacity} free (largest free block {table.allocator.largest_free})"
                f" after waiting {_asked(msg)} s"
            ),
        )

    def _free(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        self.state.free_allocations(conn.client, [int(o) for o in request_field(msg, "offsets", list)])
        return protocol.ok(), b""

    @staticmethod
    def _parts(msg: dict[str, Any], payload: bytes) -> list[Part]:
        parts = []
        for item in request_field(msg, "parts", list):
            if "inline" in item:
                start, length = item["inline"]
                if not (0 <= start and start + length <= len(payload)):
                    raise InvalidArgument("inline part outside the payload")
                parts.append(Part(length, inline=payload[start : start + length]))
            else:
                parts.append(Part(int(item["size"]), offset=int(item["offset"])))
        return parts

    def _send(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Any:
        channel = self._channel(msg)
        parts = self._parts(msg, payload)
        client = conn.client

        def give_back() -> None:  # a send that fails leaves no memory behind
            self.state.free_allocations(client, [p.offset for p in parts if p.inline is None])

        try:
            result = self._blocking(
                lambda: self.state.try_send(client, channel, parts),
                lambda: [channel.space],
                msg,
                lambda _: (protocol.ok(), b""),
                lambda: rules.send_timeout(_asked(msg), channel.label, channel.max_queue_size),
            )
        except BaseException:
            give_back()
            raise
        if isinstance(result, tuple):
            return result

        async def guarded() -> Reply:
            try:
                return await result
            except BaseException:
                give_back()
                raise

        return guarded()

    def _recv(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Any:
        channel = self._channel(msg)
        shard = request_field(msg, "shard", int)
        rules.check_shard(shard, channel.num_shards)
        peek = bool(msg.get("peek"))
        shared = channel.full_batch and channel.num_shards > 1

        def done(obj: Any) -> Reply:
            if obj.inline is not None:
                return protocol.ok(key=obj.key, size=obj.size, shared=shared), obj.inline
            return protocol.ok(key=obj.key, size=obj.size, offset=obj.offset, shared=shared), b""

        return self._blocking(
            lambda: self.state.try_recv(conn.client, channel, shard, peek),
            lambda: [channel.data[shard]],
            msg,
            done,
            lambda: rules.recv_timeout(peek, _asked(msg), shard, channel.label),
        )

    def _queue(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        channel = self._channel(msg)
        shard = request_field(msg, "shard", int, optional=True)
        if shard is not None:
            rules.check_shard(shard, channel.num_shards)
        return protocol.ok(queue=self.state.queue(channel, shard)), b""

    def _put(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        (part,) = self._parts(msg, payload)
        conn.client.datasystem = True
        return protocol.ok(key=self.state.put(conn.client, part)), b""

    def _get(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        obj = self.state.get(conn.client, request_field(msg, "key", str))
        if obj.inline is not None:
            return protocol.ok(key=obj.key, size=obj.size, shared=True), obj.inline
        return protocol.ok(key=obj.key, size=obj.size, offset=obj.offset, shared=True), b""

    def _delete(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        self.state.delete(request_field(msg, "key", str))
        return protocol.ok(), b""

    def _contains(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        return protocol.ok(found=request_field(msg, "key", str) in self.state.pinned), b""

    def _stats(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        return protocol.ok(**vars(self.state.table.stats(self.arena.reserved))), b""

    def _status(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        return (
            protocol.ok(
                pid=os.getpid(),
                started=self.started,
                uptime=time.time() - self.started,
                clients=len(self.state.clients),
                idle_timeout=self.idle_timeout,
                store=vars(self.state.table.stats(self.arena.reserved)),
                channels=[self.state.channel_status(c) for c in self.state.channels.values()],
            ),
            b"",
        )

    def _stop(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        log.info("stop requested by pid %d", conn.client.pid)
        asyncio.get_running_loop().call_soon(self.stopping.set)
        return protocol.ok(pid=os.getpid()), b""
