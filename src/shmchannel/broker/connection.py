"""One client's connection to the broker: frames cut from the byte stream as they arrive.

What a connection makes the broker hold is bounded (issue 13): besides the frame being
read (at most ``protocol.MAX_PAYLOAD`` plus ``protocol.MAX_JSON``), its unsent replies and
the requests queued behind its waiting one. Past ``WRITE_HIGH_WATER`` bytes of replies the
client does not read (asyncio's ``pause_writing``), the broker handles none of its frames
and reads no more of its socket until they drain; past ``BACKLOG_LIMIT`` bytes of queued
requests it reads no more until the wait ends. The client's own writes then block in its
kernel socket buffer: backpressure, with nothing lost, and other clients unaffected.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Protocol

from . import protocol
from .protocol import FrameError
from .records import Client



class Host(Protocol):
    """What a connection needs of the server that accepted it (server.py) -- named here,
    so that this module imports neither the server nor its operations."""

    state: Any  # its ``journal`` (None, or flushed before a reply that confirms a change)

    def _accept(self, conn: ClientConnection, sock: Any) -> None: ...

    def _dispatch(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> None: ...

    def _forget(self, conn: ClientConnection, exc: Exception | None) -> None: ...


class Pending(Protocol):
    """A request of the connection that waits (operations.py: ``Waiter``)."""

    @property
    def finished(self) -> bool: ...

    def cancel(self) -> None: ...

log = logging.getLogger("shmchannel.broker")

#: Bytes of replies waiting to be written to a client above which the broker stops
#: handling and reading that client's frames (resumed at a quarter of it). Above one
#: reply in flight, so that a client that reads its replies is never held up by it.
WRITE_HIGH_WATER = 1 << 20

#: Bytes of requests queued behind a connection's waiting request (frame sizes) above
#: which the broker reads no more of that connection until the wait ends. Large: a
#: request it cannot read may be the ``delete`` another thread's waiting ``put`` needs.
BACKLOG_LIMIT = 64 << 20


class ClientConnection(asyncio.Protocol):
    """One client connection: frames are cut from the byte stream as they arrive and
    handed to the server synchronously (a Protocol, not StreamReader coroutines: this
    halves the broker's cost per request, which every send and recv pays)."""

    def __init__(self, server: Host) -> None:
        self.server = server
        self.client: Client  # set when the server accepts the peer
        self.accepted = False
        self.transport: asyncio.Transport | None = None
        self.waiter: Pending | None = None
        self.waiter_id: Any = None  # the id of the waiting request (see protocol.py)
        self.acted = False  # sent more than looking requests (see Server.OBSERVING)
        # Requests that arrived while ``waiter`` waits: a client may post several requests
        # (pipelining), and they must take effect in the order it sent them.
        # Each with its frame's size, counted in ``_backlog_bytes``.
        self.backlog: collections.deque[tuple[dict[str, Any], bytes, int]] = collections.deque()
        self._backlog_bytes = 0
        self.last_seq = 0  # the highest frame sequence number taken: a frame at or below it is a copy
        self._writing_paused = False  # replies pile up unread: handle nothing until they drain
        self._reading_paused = False
        self._buffer = bytearray()
        self._need = protocol.HEAD.size  # bytes the next step needs
        self._head: tuple[int, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.server._accept(self, transport.get_extra_info("socket"))

    def pause_writing(self) -> None:
        """The transport holds more than WRITE_HIGH_WATER bytes of replies: stop."""
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        """The replies drained: handle what waited, then read on."""
        self._writing_paused = False
        self.resume()
        self._take_frames()

    def _update_reading(self) -> None:
        """Read the socket unless replies or queued requests are over their bounds."""
        pause = self._writing_paused or self._backlog_bytes > BACKLOG_LIMIT
        transport = self.transport
        if pause == self._reading_paused or transport is None or transport.is_closing():
            return
        self._reading_paused = pause
        if pause:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._take_frames()

    def _take_frames(self) -> None:
        """Handle (or queue) the whole frames in the buffer, until replies pile up."""
        buffer = self._buffer
        while len(buffer) >= self._need and self.accepted and not self._writing_paused:
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
            size = self._need
            del buffer[:size]
            self._head, self._need = None, protocol.HEAD.size
            seq = msg.get("seq")
            if isinstance(seq, int) and not isinstance(seq, bool):
                if seq <= self.last_seq:
                    continue  # written again by a client that could not know it went (client.py: _unsure)
                self.last_seq = seq
            op = msg.get("op")
            if (self.waiter is not None or self.backlog) and op not in protocol.ONE_WAY and op not in protocol.IMMEDIATE:
                self.backlog.append((msg, payload, size))
                self._backlog_bytes += size
            else:
                self.server._dispatch(self, msg, payload)
        self._update_reading()

    def resume(self) -> None:
        """The waiting request finished: handle the requests that queued up behind it
        (until one waits, or replies pile up)."""
        while self.backlog and self.waiter is None and self.accepted and not self._writing_paused:
            msg, payload, size = self.backlog.popleft()
            self._backlog_bytes -= size
            self.server._dispatch(self, msg, payload)
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.backlog.clear()
        self._backlog_bytes = 0
        self.server._forget(self, exc)

    def withdraw(self, request_id: Any) -> dict[str, Any] | None:
        """Remove the request ``request_id`` from the backlog; the request, or None if it
        is not there (answered already, or the one waiting)."""
        for entry in self.backlog:
            if entry[0].get("id") == request_id:
                self.backlog.remove(entry)
                self._backlog_bytes -= entry[2]
                self._update_reading()
                return entry[0]
        return None

    def reply(self, msg: dict[str, Any], payload: bytes = b"", confirms: bool = True) -> None:
        """Send a reply. One that ``confirms`` a change (a create, a close...) goes out only
        after the journal holds it; others (get, alloc...) do not wait for that. A reply
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
