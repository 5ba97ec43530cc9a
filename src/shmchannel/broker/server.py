"""The broker's asyncio server on its Unix socket: frames in, decisions by ``BrokerState``, replies out.

One reader loop per client reads every frame as it arrives, so one-way messages (release,
cancel) are handled even while that client's blocking request waits. Requests that can
complete at once are answered inline; the others become one task per client that waits on
the state's signals (see state.py) -- the broker never sleeps to find out whether
something changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from typing import Any, Awaitable, Callable

from ..errors import ChannelError, ChannelNotFound, ChannelTimeout, InvalidArgument, StoreFullTimeout
from ..store.arena import ArenaFile
from . import protocol
from .protocol import FrameError
from .state import WAIT, BrokerState, Channel, Client, Part, Signal

log = logging.getLogger("shmchannel.broker")

Reply = tuple[dict[str, Any], bytes]


class _Conn:
    __slots__ = ("client", "writer", "task")

    def __init__(self, client: Client, writer: asyncio.StreamWriter) -> None:
        self.client = client
        self.writer = writer
        self.task: asyncio.Task[None] | None = None

    def reply(self, msg: dict[str, Any], payload: bytes = b"") -> None:
        if not self.writer.is_closing():
            self.writer.writelines(protocol.encode(msg, payload))


def _arg(msg: dict[str, Any], name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidArgument(f"request field {name!r} must be {kind}, got {type(value).__name__}")
    return value


def _asked(msg: dict[str, Any]) -> Any:
    """The timeout the user gave (a client sends what is left of it as ``timeout``)."""
    return msg.get("asked", msg.get("timeout"))


class Server:
    def __init__(
        self, state: BrokerState, arena: ArenaFile, socket_path: str, idle_timeout: float, memory: int
    ) -> None:
        self.state = state
        self.arena = arena
        self.socket_path = socket_path
        self.idle_timeout = idle_timeout
        self.memory = memory
        self.started = time.time()
        self.stopping = asyncio.Event()
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._idle_handle: asyncio.TimerHandle | None = None
        self._ops: dict[str, Callable[[_Conn, dict[str, Any], bytes], Any]] = {
            "hello": self._hello,
            "create": self._create,
            "open": self._open,
            "detach": self._detach,
            "close": self._close,
            "alloc": self._alloc,
            "free": self._free,
            "send": self._send,
            "recv": self._recv,
            "queue": self._queue,
            "put": self._put,
            "get": self._get,
            "delete": self._delete,
            "contains": self._contains,
            "stats": self._stats,
            "status": self._status,
            "stop": self._stop,
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        server = await asyncio.start_unix_server(self._handle, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)
        self._arm_idle_timer()
        if on_ready is not None:
            on_ready()
        async with server:
            await self.stopping.wait()
            os.unlink(self.socket_path)  # first, so that no new client finds a dying broker
        for conn in list(self._conns):
            conn.writer.close()  # each handler sees EOF and cleans up
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5.0)

    def _arm_idle_timer(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self.state.idle():
            loop = asyncio.get_running_loop()
            self._idle_handle = loop.call_later(self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        if self.state.idle():
            log.info("idle for %.1f s with no channels, objects or clients: exiting", self.idle_timeout)
            self.stopping.set()

    # -- connections ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            log.warning("refused pid %d of uid %d: only uid %d may use this broker", pid, uid, os.getuid())
            writer.writelines(
                protocol.encode(protocol.error("permission", f"this broker belongs to uid {os.getuid()}, you are uid {uid}"))
            )
            writer.close()
            return
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        conn = _Conn(self.state.connect(pid), writer)
        self._conns.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        reason = "closed its connection"
        try:
            while True:
                head = await reader.readexactly(protocol.HEAD.size)
                json_len, payload_len = protocol.parse_head(head)
                body = await reader.readexactly(json_len)
                payload = await reader.readexactly(payload_len) if payload_len else b""
                self._dispatch(conn, protocol.parse_body(body), payload)
        except asyncio.IncompleteReadError:
            pass
        except ConnectionError as exc:
            reason = f"connection error: {exc}"
        except FrameError as exc:
            reason = f"bad frame: {exc}"
            log.warning("client pid %d disconnected: %s", pid, exc)
        finally:
            log.debug("client pid %d %s", pid, reason)
            if conn.task is not None:
                conn.task.cancel()
            self._conns.discard(conn)
            if task is not None:
                self._handlers.discard(task)
            self.state.disconnect(conn.client)
            writer.close()
            self._arm_idle_timer()

    def _dispatch(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> None:
        op = msg["op"]
        answer = op not in protocol.ONE_WAY  # a one-way message must never get a reply
        try:
            if not answer:
                self._one_way(conn, op, msg, payload)
                return
            handler = self._ops.get(op)
            if handler is None:
                raise InvalidArgument(f"unknown operation {op!r}")
            result = handler(conn, msg, payload)
        except ChannelError as exc:
            failure = protocol.error(exc.code, str(exc))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            log.warning("client pid %d sent a malformed %r request: %r", conn.client.pid, op, exc)
            failure = protocol.error("invalid", f"malformed {op!r} request: {exc!r}")
        except Exception as exc:  # a bug: answer and keep serving everyone else
            log.exception("%r request of client pid %d failed", op, conn.client.pid)
            failure = protocol.error("error", f"broker error in {op!r}: {exc!r}")
        else:
            if isinstance(result, tuple):
                conn.reply(*result)
            else:
                conn.task = asyncio.ensure_future(self._finish(conn, result))
            return
        if answer:
            conn.reply(failure)
        else:
            log.warning("client pid %d: %s failed: %s", conn.client.pid, op, failure["message"])

    async def _finish(self, conn: _Conn, pending: Awaitable[Reply]) -> None:
        try:
            conn.reply(*(await pending))
        except asyncio.CancelledError:
            conn.reply(protocol.error("cancelled", "request cancelled by the client"))
        except ChannelError as exc:
            conn.reply(protocol.error(exc.code, str(exc)))
        except Exception as exc:  # a bug: say so to the client rather than hang it
            log.exception("request failed")
            conn.reply(protocol.error("error", f"broker error: {exc!r}"))
        finally:
            conn.task = None

    def _one_way(self, conn: _Conn, op: str, msg: dict[str, Any], payload: bytes) -> None:
        if op == "release":
            self.state.release(conn.client, [k for k in _arg(msg, "keys", list) if isinstance(k, str)])
        elif op == "cancel":
            if conn.task is not None:
                conn.task.cancel()
        elif op == "requeue":
            channel = self._channel(msg)
            shard = _arg(msg, "shard", int)
            if not 0 <= shard < channel.num_shards:
                raise InvalidArgument(f"shard {shard} out of range")
            inline = bytes(payload) if msg.get("inline") else None
            self.state.requeue(conn.client, channel, shard, _arg(msg, "key", str), inline)
        if self.state.idle():
            self._arm_idle_timer()

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
        return self.state.channel(_arg(msg, "namespace", str), _arg(msg, "dataset_name", str))

    def _hello(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        if msg.get("version") != protocol.PROTOCOL_VERSION:
            raise InvalidArgument(
                f"client speaks protocol {msg.get('version')}, this broker {protocol.PROTOCOL_VERSION}: restart it"
            )
        return protocol.ok(pid=os.getpid(), arena=str(self.arena.path), capacity=self.arena.capacity), b""

    def _create(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        channel = self.state.create_channel(
            conn.client,
            _arg(msg, "namespace", str),
            _arg(msg, "dataset_name", str),
            _arg(msg, "num_shards", int),
            bool(msg.get("full_batch")),
            _arg(msg, "max_queue_size", int),
        )
        return protocol.ok(**channel.info()), b""

    def _open(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Any:
        namespace, name = _arg(msg, "namespace", str), _arg(msg, "dataset_name", str)
        shard = _arg(msg, "shard", int)
        return self._blocking(
            lambda: self.state.try_attach_receiver(conn.client, namespace, name, shard),
            lambda: [self.state.channel_created],
            msg,
            lambda channel: (protocol.ok(**channel.info()), b""),
            lambda: ChannelNotFound(
                f"no sender has created dataset_name {name!r} in namespace {namespace!r}"
                + (f" (waited {_asked(msg)} s)" if msg.get("timeout") else "")
            ),
        )

    def _detach(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        channel = self.state.channels.get((_arg(msg, "namespace", str), _arg(msg, "dataset_name", str)))
        if channel is not None:
            self.state.detach(conn.client, channel)
        return protocol.ok(), b""

    def _close(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        self.state.close_channel(conn.client, self._channel(msg))
        return protocol.ok(), b""

    def _alloc(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Any:
        sizes = [int(s) for s in _arg(msg, "sizes", list)]
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

    def _free(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        self.state.free_allocations(conn.client, [int(o) for o in _arg(msg, "offsets", list)])
        return protocol.ok(), b""

    @staticmethod
    def _parts(msg: dict[str, Any], payload: bytes) -> list[Part]:
        parts = []
        for item in _arg(msg, "parts", list):
            if "inline" in item:
                start, length = item["inline"]
                if not (0 <= start and start + length <= len(payload)):
                    raise InvalidArgument("inline part outside the payload")
                parts.append(Part(length, inline=payload[start : start + length]))
            else:
                parts.append(Part(int(item["size"]), offset=int(item["offset"])))
        return parts

    def _send(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Any:
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
                lambda: ChannelTimeout(
                    f"send timed out after {_asked(msg)} s: a queue of {channel.label} stayed full "
                    f"(max_queue_size={channel.max_queue_size}); nothing was enqueued"
                ),
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

    def _recv(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Any:
        channel = self._channel(msg)
        shard = _arg(msg, "shard", int)
        if not 0 <= shard < channel.num_shards:
            raise InvalidArgument(f"shard_id must be less than num_shards ({channel.num_shards}), got {shard}")
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
            lambda: ChannelTimeout(
                f"{'peek' if peek else 'recv'} timed out after {_asked(msg)} s: "
                f"shard {shard} of {channel.label} stayed empty"
            ),
        )

    def _queue(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        channel = self._channel(msg)
        shard = _arg(msg, "shard", int, optional=True)
        if shard is not None and not 0 <= shard < channel.num_shards:
            raise InvalidArgument(f"shard_id must be less than num_shards ({channel.num_shards}), got {shard}")
        return protocol.ok(queue=self.state.queue(channel, shard)), b""

    def _put(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        (part,) = self._parts(msg, payload)
        conn.client.datasystem = True
        return protocol.ok(key=self.state.put(conn.client, part)), b""

    def _get(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        obj = self.state.get(conn.client, _arg(msg, "key", str))
        if obj.inline is not None:
            return protocol.ok(key=obj.key, size=obj.size, shared=True), obj.inline
        return protocol.ok(key=obj.key, size=obj.size, offset=obj.offset, shared=True), b""

    def _delete(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        self.state.delete(_arg(msg, "key", str))
        return protocol.ok(), b""

    def _contains(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        return protocol.ok(found=_arg(msg, "key", str) in self.state.pinned), b""

    def _stats(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        return protocol.ok(**vars(self.state.table.stats(self.arena.reserved))), b""

    def _status(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
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

    def _stop(self, conn: _Conn, msg: dict[str, Any], payload: bytes) -> Reply:
        log.info("stop requested by pid %d", conn.client.pid)
        asyncio.get_running_loop().call_soon(self.stopping.set)
        return protocol.ok(pid=os.getpid()), b""
