"""A blocking connection to the broker: one request at a time, releases at any time.

Two locks: ``_request`` serializes request/reply pairs (the protocol allows one outstanding
request per connection), ``_write`` only guards writing a frame. Releases of zero-copy
objects come from finalizers, which may run in any thread at any allocation -- including
inside this module's own code in the same thread. A finalizer therefore only queues the key
and *tries* the write lock; whoever holds it flushes the queue right after letting go, so a
release is never lost, never interleaved into another frame, and never deadlocks.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import BrokerUnavailable, Cancelled, ChannelError, EndpointClosed, ProtocolError, from_wire
from . import protocol

Reply = tuple[dict[str, Any], bytearray]


class Connection:
    """A client connection; ``info`` holds the broker's hello (pid, arena, capacity)."""

    def __init__(self, path: Path | str) -> None:
        self.pid = os.getpid()
        self.path = str(path)
        self._sock: socket.socket | None = None
        self._request = threading.Lock()
        self._write_lock = threading.Lock()
        self._releases: collections.deque[str] = collections.deque()
        self._holds = 0
        self._holds_lock = threading.Lock()  # finalizers of other threads release concurrently
        self._closing = False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise BrokerUnavailable(f"cannot connect to the broker at {self.path}: {exc.strerror or exc}") from exc
        self._sock = sock
        try:
            self.info, _ = self.request({"op": "hello", "version": protocol.PROTOCOL_VERSION})
        except BaseException:
            self._shutdown()
            raise

    @property
    def closed(self) -> bool:
        return self._sock is None or self._closing

    # -- requests ------------------------------------------------------------------------

    def request(
        self, msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"",
        on_interrupt: Callable[[dict[str, Any], bytearray], None] | None = None,
    ) -> Reply:
        """Send ``msg`` and return the broker's reply; its error code raises its class.

        If the wait is interrupted (KeyboardInterrupt, a signal handler's exception), the
        request is cancelled at the broker; a reply that raced the cancel is passed to
        ``on_interrupt`` so that, e.g., a received object can be put back in its queue.
        """
        with self._request:
            return self._exchange(msg, payload, on_interrupt)

    def _exchange(
        self, msg: dict[str, Any], payload: bytes | bytearray | memoryview,
        on_interrupt: Callable[[dict[str, Any], bytearray], None] | None,
    ) -> Reply:
        sock = self._live()
        self._send(protocol.encode(msg, payload))
        started = [False]
        try:
            reply, data = self._read(sock, started)
        except ChannelError:
            raise
        except BaseException:
            self._abandon(sock, started[0], on_interrupt)
            raise
        if not reply.get("ok"):
            if reply.get("error") == Cancelled.code and self._closing:
                raise EndpointClosed("closed by close() from another thread while waiting")
            raise from_wire(str(reply.get("error")), str(reply.get("message")))
        return reply, data

    def one_way(self, msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
        self._live()
        self._send(protocol.encode(msg, payload))

    def _live(self) -> socket.socket:
        if os.getpid() != self.pid:
            raise ChannelError(
                f"this connection was made in process {self.pid}; create senders and receivers "
                f"in the process that uses them (this is {os.getpid()})"
            )
        if self._sock is None:
            raise BrokerUnavailable(f"connection to the broker at {self.path} is closed")
        return self._sock

    def _send(self, parts: list[Any]) -> None:
        sock = self._live()
        with self._write_lock:
            try:
                sock.sendall(b"".join(parts))
            except OSError as exc:
                raise self._lost(exc) from exc
        self._flush_releases()

    def _read(self, sock: socket.socket, started: list[bool]) -> Reply:
        head = self._exact(sock, protocol.HEAD.size, started)
        try:
            json_len, payload_len = protocol.parse_head(head)
            msg = protocol.parse_body(self._exact(sock, json_len, started), request=False)
        except protocol.FrameError as exc:
            self._shutdown()
            raise ProtocolError(f"bad reply from the broker: {exc}") from None
        data = self._exact(sock, payload_len, started) if payload_len else bytearray()
        return msg, data

    def _exact(self, sock: socket.socket, n: int, started: list[bool]) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = sock.recv_into(view[got:])
            except OSError as exc:
                self._shutdown()
                raise self._lost(exc) from exc
            if k == 0:
                self._shutdown()
                raise self._lost(None)
            got += k
            started[0] = True
        return buf

    def _lost(self, exc: OSError | None) -> ChannelError:
        """The error for a socket that failed: our own close() from another thread, or the broker."""
        if self._closing:
            return EndpointClosed("closed by close() from another thread while waiting")
        if exc is None:
            return BrokerUnavailable(f"the broker at {self.path} closed the connection (it stopped or died)")
        return BrokerUnavailable(f"lost the broker at {self.path}: {exc}")

    def _abandon(
        self, sock: socket.socket, started: bool,
        on_interrupt: Callable[[dict[str, Any], bytearray], None] | None,
    ) -> None:
        """After an interrupted wait: cancel at the broker and consume its one reply."""
        if started:  # the reply was half read: the stream cannot be resynchronized
            self._shutdown()
            return
        try:
            self._send(protocol.encode({"op": "cancel"}))
            sock.settimeout(5.0)
            try:
                reply, data = self._read(sock, [False])
            finally:
                if self._sock is not None:
                    sock.settimeout(None)
            if reply.get("ok") and on_interrupt is not None:
                on_interrupt(reply, data)
            elif not reply.get("ok") and reply.get("error") != Cancelled.code:
                pass  # the request failed on its own; nothing to undo
        except BaseException:
            self._shutdown()

    # -- zero-copy holds -----------------------------------------------------------------

    def hold(self) -> None:
        """Count one object this process holds through this connection."""
        with self._holds_lock:
            self._holds += 1

    def release(self, key: str) -> None:
        """Give back a held object (called by a finalizer; any thread, never raises)."""
        if os.getpid() != self.pid:
            return
        with self._holds_lock:
            self._holds -= 1
        self._releases.append(key)
        self._flush_releases()
        if self._closing and self._holds <= 0:
            self._shutdown()

    def _flush_releases(self) -> None:
        while self._releases:
            sock = self._sock
            if sock is None or not self._write_lock.acquire(blocking=False):
                return  # the holder flushes when it lets go
            try:
                keys = []
                while self._releases:
                    keys.append(self._releases.popleft())
                try:
                    sock.sendall(b"".join(protocol.encode({"op": "release", "keys": keys})))
                except OSError:
                    return  # broker gone: it freed everything of ours with the connection
            finally:
                self._write_lock.release()

    # -- closing -------------------------------------------------------------------------

    def close(self, farewell: dict[str, Any] | None = None) -> None:
        """Say ``farewell`` (a last request), then close -- at once, or while zero-copy
        objects are held, once the last is released: holding the socket keeps the broker
        from reusing memory those objects view. A request another thread is waiting in is
        woken with EndpointClosed.
        """
        if os.getpid() != self.pid or self._closing:
            return
        self._closing = True
        if self._sock is not None:
            if self._request.acquire(blocking=False):
                try:
                    if farewell is not None:
                        self._exchange(farewell, b"", None)
                except ChannelError:
                    pass  # the broker is gone: it has forgotten us anyway
                finally:
                    self._request.release()
            else:
                try:
                    self._send(protocol.encode({"op": "cancel"}))
                except ChannelError:
                    pass
        if self._holds <= 0:
            self._shutdown()

    def _shutdown(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
            except OSError:
                pass
            sock.close()
