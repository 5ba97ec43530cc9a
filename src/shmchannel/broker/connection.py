"""One client's connection to the broker: frames cut from the byte stream as they arrive."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

from . import protocol
from .protocol import FrameError
from .records import Client

if TYPE_CHECKING:
    from .operations import Waiter
    from .server import Server

log = logging.getLogger("shmchannel.broker")


class ClientConnection(asyncio.Protocol):
    """One client connection: frames are cut from the byte stream as they arrive and
    handed to the server synchronously (a Protocol, not StreamReader coroutines: this
    halves the broker's cost per request, which every send and recv pays)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.client: Client  # set when the server accepts the peer
        self.accepted = False
        self.transport: asyncio.Transport | None = None
        self.waiter: Waiter | None = None
        self.waiter_id: Any = None  # the id of the waiting request (see protocol.py)
        self.acted = False  # sent more than looking requests (see Server.OBSERVING)
        # Requests that arrived while ``waiter`` waits: a client may post several requests
        # (pipelining), and they must take effect in the order it sent them.
        self.backlog: collections.deque[tuple[dict[str, Any], bytes]] = collections.deque()
        self._buffer = bytearray()
        self._need = protocol.HEAD.size  # bytes the next step needs
        self._head: tuple[int, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._accept(self, transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= self._need and self.accepted:
            try:
                if self._head is None:
                    self._head = protocol.parse_head(buffer[: protocol.HEAD.size])
                    self._need = protocol.HEAD.size + sum(self._head)
                    continue
                json_len, payload_len = self._head
                body_end = protocol.HEAD.size + json_len
                msg = protocol.parse_body(buffer[protocol.HEAD.size : body_end])
                payload = bytes(buffer[body_end : self._need]) if payload_len else b""
            except FrameError as exc:
                log.warning("client pid %d disconnected: bad frame: %s", self.client.pid, exc)
                self.close()
                return
            del buffer[: self._need]
            self._head, self._need = None, protocol.HEAD.size
            op = msg.get("op")
            if (self.waiter is not None or self.backlog) and op not in protocol.ONE_WAY and op not in protocol.IMMEDIATE:
                self.backlog.append((msg, payload))
            else:
                self.server._dispatch(self, msg, payload)

    def resume(self) -> None:
        """The waiting request finished: handle the requests that queued up behind it."""
        while self.backlog and self.waiter is None and self.accepted:
            msg, payload = self.backlog.popleft()
            self.server._dispatch(self, msg, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.backlog.clear()
        self.server._forget(self, exc)

    def withdraw(self, request_id: Any) -> dict[str, Any] | None:
        """Remove the request ``request_id`` from the backlog; the request, or None if it
        is not there (answered already, or the one waiting)."""
        for entry in self.backlog:
            if entry[0].get("id") == request_id:
                self.backlog.remove(entry)
                return entry[0]
        return None

    def reply(self, msg: dict[str, Any], payload: bytes = b"", confirms: bool = True) -> None:
        """Send a reply. One that ``confirms`` a change (a send, a close...) goes out only
        after the journal holds it; others (recv, alloc...) do not wait for that. A reply
        over the frame bounds becomes an error reply: the client would drop a frame it
        cannot take, and the connection with it."""
        journal = self.server.state.journal
        if confirms and journal is not None:
            journal.flush()
        if self.transport is not None and not self.transport.is_closing():
            try:
                frame = protocol.encode(msg, payload, max_json=protocol.MAX_REPLY_JSON)
            except FrameError as exc:
                log.error("client pid %d: %s", self.client.pid, exc)
                failure = protocol.error("protocol", f"the broker's reply was refused: {exc}")
                frame = protocol.encode({**failure, **{k: msg[k] for k in ("id", "posted") if k in msg}})
            self.transport.writelines(frame)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
