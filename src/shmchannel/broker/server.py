"""The broker's asyncio server on its Unix socket: accepts clients, routes their frames to
the operations (operations.py, system.py), answers, and exits when told or idle.

One reader per client handles every frame as it arrives, so one-way messages (release,
cancel) are handled even while that client's blocking request waits; a waiting request is
a Waiter (operations.py), and the client's later requests queue behind it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from typing import Any, Callable

from ..errors import Cancelled, ChannelError, InvalidArgument
from ..store.arena import ArenaFile
from . import protocol
from .connection import ClientConnection
from .operations import Reply, Waiter, request_field
from .state import BrokerState
from .system import SystemOperations

log = logging.getLogger("shmchannel.broker")

#: Seconds between looks at orphaned slabs and returns waiting for room (``_sweep``).
SWEEP_INTERVAL = 0.02


class Server(SystemOperations):
    #: Requests that only look: a client sending nothing else (``shmchannel status --watch``)
    #: does not put off the idle exit.
    OBSERVING = frozenset({"hello", "status", "stats", "sync"})

    def __init__(
        self, state: BrokerState, arena: ArenaFile, socket_path: str, idle_timeout: float
    ) -> None:
        self.state = state
        self.arena = arena
        self.socket_path = socket_path
        self.idle_timeout = idle_timeout
        self.started = time.time()
        self.stopping = asyncio.Event()
        self._conns: set[ClientConnection] = set()
        self._all_gone: asyncio.Event | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._active = time.monotonic()  # when a client last did more than look
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._ops: dict[str, Callable[[ClientConnection, dict[str, Any], bytes], Any]] = {
            "hello": self._hello,
            "create": self._create,
            "open": self._open,
            "detach": self._detach,
            "close": self._close,
            "log": self._claim_log,
            "slab": self._slab,
            "unslab": self._unslab,
            "alloc": self._alloc,
            "loan": self._loan,
            "free": self._free,
            "queue": self._queue,
            "put": self._put,
            "get": self._get,
            "lend": self._lend,
            "delete": self._delete,
            "contains": self._contains,
            "stats": self._stats,
            "status": self._status,
            "stop": self._stop,
            "sync": lambda conn, msg, payload: (protocol.ok(), b""),  # answered after what came before
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
            self._idle_handle = None
        if self.state.idle():
            loop = asyncio.get_running_loop()
            left = self._active + self.idle_timeout - time.monotonic()
            self._idle_handle = loop.call_later(max(0.0, left), self._idle_check)

    def _idle_check(self) -> None:
        self._idle_handle = None
        if not self.state.idle():
            return
        if time.monotonic() < self._active + self.idle_timeout:
            self._arm_idle_timer()
        else:
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
        if conn.acted:
            self._active = time.monotonic()
        if conn.waiter is not None:
            conn.waiter.cancel()
        self._conns.discard(conn)
        self.state.disconnect(conn.client)
        self._after_change()
        if self._all_gone is not None and not self._conns:
            self._all_gone.set()

    def _dispatch(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> None:
        op = msg["op"]
        posted = msg.get("posted") is True  # answered only if it fails
        rid = msg.get("id")  # repeated in the reply: replies of IMMEDIATE requests may overtake
        if op not in self.OBSERVING:
            conn.acted = True
            self._active = time.monotonic()
        try:
            if op in protocol.ONE_WAY:  # never answered, not even with an error
                self._one_way(conn, op, msg, payload)
                return
            handler = self._ops.get(op)
            if handler is None:
                raise InvalidArgument(f"unknown operation {op!r}")
            result = handler(conn, msg, payload)
        except Exception as exc:
            if op in protocol.ONE_WAY:
                log.warning("client pid %d: %s failed: %r", conn.client.pid, op, exc)
            else:
                self._answer(conn, op, posted, rid, exc)
            return
        if isinstance(result, Waiter):
            conn.waiter, conn.waiter_id = result, rid
            result.start(lambda outcome: self._answer(conn, op, posted, rid, outcome))
        else:
            self._answer(conn, op, posted, rid, result)
        if op in ("detach", "unslab", "close"):
            self._after_change()

    def _answer(self, conn: ClientConnection, op: str, posted: bool, rid: Any, outcome: Reply | BaseException) -> None:
        """Reply with ``outcome`` (a reply, or the exception that ended the request); a
        posted request is answered only if it failed, with a reply marked as such."""
        waited = conn.waiter is not None and conn.waiter.finished
        if waited:
            conn.waiter = conn.waiter_id = None
        if isinstance(outcome, tuple):
            if not posted:
                reply, payload = outcome
                conn.reply({**reply, "id": rid} if rid is not None else reply, payload, confirms=op in protocol.CONFIRMS)
        else:
            if isinstance(outcome, ChannelError):
                failure = protocol.error(outcome.code, str(outcome))
            elif isinstance(outcome, (KeyError, TypeError, ValueError, IndexError)):
                log.warning("client pid %d sent a malformed %r request: %r", conn.client.pid, op, outcome)
                failure = protocol.error("invalid", f"malformed {op!r} request: {outcome!r}")
            else:  # a bug: answer and keep serving everyone else
                log.error("%r request of client pid %d failed", op, conn.client.pid, exc_info=outcome)
                failure = protocol.error("error", f"broker error in {op!r}: {outcome!r}")
            if rid is not None:
                failure["id"] = rid
            conn.reply({**failure, "posted": True} if posted else failure)
        if waited:  # requests that queued behind it go now (others: their reader goes on)
            conn.resume()

    def _one_way(self, conn: ClientConnection, op: str, msg: dict[str, Any], payload: bytes) -> None:
        if op == "release":
            self.state.release(conn.client, [k for k in request_field(msg, "keys", list) if isinstance(k, str)])
        elif op == "cancel":  # the request named by id (any waiting one without)
            rid = msg.get("id")
            if conn.waiter is not None and (rid is None or rid == conn.waiter_id):
                conn.waiter.cancel()
            elif rid is not None and (withdrawn := conn.withdraw(rid)) is not None:
                self._answer(conn, str(withdrawn["op"]), withdrawn.get("posted") is True, rid, Cancelled("request cancelled by the client"))
        self._after_change()

    # -- what clients leave behind ---------------------------------------------------------

    def _after_change(self) -> None:
        """Sweep (state.sweep) now and then again every SWEEP_INTERVAL while orphaned memory
        or returns wait: blocks are freed in shared memory by receivers, who tell no one."""
        if self._sweep_handle is None and self.state.left_behind:
            self._sweep_handle = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)
        if self.state.idle():
            self._arm_idle_timer()

    def _sweep(self) -> None:
        self._sweep_handle = None
        self.state.sweep()
        self._after_change()
