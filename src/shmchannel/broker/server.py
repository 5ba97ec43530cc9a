"""The broker's asyncio server on its Unix socket: accepts clients, routes their frames to
the operations (operations.py), answers, and exits when told or idle.

One reader per client handles every frame as it arrives, so one-way messages (release,
cancel) are handled even while that client's blocking request waits; a waiting request is
one task per client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from typing import Any, Awaitable, Callable

from ..errors import ChannelError, InvalidArgument
from ..store.arena import ArenaFile
from . import protocol
from .connection import ClientConnection
from .operations import Operations, Reply, request_field
from .state import BrokerState

log = logging.getLogger("shmchannel.broker")


class Server(Operations):
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
        self._conns: set[ClientConnection] = set()
        self._all_gone: asyncio.Event | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._ops: dict[str, Callable[[ClientConnection, dict[str, Any], bytes], Any]] = {
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
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: ClientConnection(self), path=self.socket_path)
        os.chmod(self.socket_path, 0o600)
        self._arm_idle_timer()
        if on_ready is not None:
            on_ready()
        async with server:
            await self.stopping.wait()
            os.unlink(self.socket_path)  # first, so that no new client finds a dying broker
        if self._conns:
            self._all_gone = asyncio.Event()
            for conn in list(self._conns):
                conn.close()  # connection_lost follows and cleans up
            try:
                await asyncio.wait_for(self._all_gone.wait(), 5.0)
            except asyncio.TimeoutError:
                log.warning("%d connections did not close in time", len(self._conns))

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

    def _accept(self, conn: ClientConnection, sock: socket.socket) -> None:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            log.warning("refused pid %d of uid %d: only uid %d may use this broker", pid, uid, os.getuid())
            conn.reply(protocol.error("permission", f"this broker belongs to uid {os.getuid()}, you are uid {uid}"))
            conn.close()
            return
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        conn.client = self.state.connect(pid)
        conn.accepted = True
        self._conns.add(conn)

    def _forget(self, conn: ClientConnection, exc: Exception | None) -> None:
        if conn not in self._conns:
            return
        log.debug("client pid %d left%s", conn.client.pid, f": {exc}" if exc else "")
        if conn.task is not None:
            conn.task.cancel()
        self._conns.discard(conn)
        self.state.disconnect(conn.client)
        self._arm_idle_timer()
        if self._all_gone is not None and not self._conns:
            self._all_gone.set()

    def _dispatch(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> None:
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

    async def _finish(self, conn: ClientConnection, pending: Awaitable[Reply]) -> None:
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

    def _one_way(self, conn: ClientConnection, op: str, msg: dict[str, Any], payload: bytes) -> None:
        if op == "release":
            self.state.release(conn.client, [k for k in request_field(msg, "keys", list) if isinstance(k, str)])
        elif op == "cancel":
            if conn.task is not None:
                conn.task.cancel()
        elif op == "requeue":
            channel = self._channel(msg)
            shard = request_field(msg, "shard", int)
            if not 0 <= shard < channel.num_shards:
                raise InvalidArgument(f"shard {shard} out of range")
            inline = bytes(payload) if msg.get("inline") else None
            self.state.requeue(conn.client, channel, shard, request_field(msg, "key", str), inline)
        if self.state.idle():
            self._arm_idle_timer()
