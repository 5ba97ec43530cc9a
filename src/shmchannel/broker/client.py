"""A blocking connection to the broker: requests in order, releases at any time.

A request either waits for its reply (``request``) or is *posted*: written at once, its
reply read later, before the next request's (``post``; a sender posts sends it knows the
broker can take without waiting). The broker handles a connection's requests in order.

Two locks: ``_request`` serializes requests and the reading of replies, ``_write`` only
guards writing a frame. Releases of zero-copy
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
READ_CHUNK = 64 * 1024


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
        self._posted_failure: ChannelError | None = None  # seen, not raised yet
        self._unconfirmed = False  # posted requests since the last reply
        self._rbuf = bytearray()
        self._scratch = memoryview(bytearray(READ_CHUNK))  # reused: a fresh large buffer per recv costs an mmap
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
            if self._unconfirmed:
                self._poll(self._live())
            self._raise_posted_failure()
            return self._exchange(msg, payload, on_interrupt)

    def post(self, msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
        """Send ``msg`` without waiting: the broker answers it only if it fails, and that
        failure is raised by a later call: one that waits for a reply raises it first thing
        if it has come; a post looks for it after writing (so that its message never waits
        for the look) and leaves it to the next call. Only for requests the broker can
        complete without waiting."""
        with self._request:
            sock = self._live()
            self._raise_posted_failure()
            self._send(protocol.encode({**msg, "posted": True}, payload))
            if self._unconfirmed:  # after the write: a message never waits for this look
                self._poll(sock)
            self._unconfirmed = True

    def _poll(self, sock: socket.socket) -> None:
        """Take in, without waiting, failures of posted requests the broker already sent."""
        if self._receive(sock, socket.MSG_DONTWAIT):
            while len(self._rbuf) >= (end := self._frame_end()):  # nothing is awaited: only failures
                self._take_frame(end)

    def _raise_posted_failure(self) -> None:
        failure, self._posted_failure = self._posted_failure, None
        if failure is not None:
            raise failure

    def _note_posted_failure(self, reply: dict[str, Any]) -> None:
        if self._posted_failure is None:
            self._posted_failure = from_wire(
                str(reply.get("error")),
                f"an earlier call that returned without waiting for the broker failed: {reply.get('message')}",
            )

    def _exchange(
        self, msg: dict[str, Any], payload: bytes | bytearray | memoryview,
        on_interrupt: Callable[[dict[str, Any], bytearray], None] | None,
    ) -> Reply:
        sock = self._live()
        self._send(protocol.encode(msg, payload))
        try:
            reply, data = self._read(sock)
        except ChannelError:
            raise
        except BaseException:
            self._abandon(sock, on_interrupt)
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
            if self._releases:  # in the same write: one system call, and memory back sooner
                parts = self._release_frame() + parts
            try:
                sock.sendall(b"".join(parts))
            except OSError as exc:
                raise self._lost(exc) from exc
        self._flush_releases()

    def _release_frame(self) -> list[Any]:
        """The frame releasing every queued key (call with the write lock held)."""
        keys = []
        while self._releases:
            keys.append(self._releases.popleft())
        return protocol.encode({"op": "release", "keys": keys})

    def _read(self, sock: socket.socket) -> Reply:
        """The next reply (failures of posted requests before it are noted, not returned)."""
        while True:
            self._fill(sock, protocol.HEAD.size)
            end = self._frame_end()
            self._fill(sock, end)
            frame = self._take_frame(end)
            if frame is not None:
                return frame

    def _frame_end(self) -> int:
        """Bytes of the frame at the head of the read buffer (the head's size until it is in)."""
        size = protocol.HEAD.size
        if len(self._rbuf) < size:
            return size
        try:
            json_len, payload_len = protocol.parse_head(self._rbuf[:size])
        except protocol.FrameError as exc:
            raise self._bad_reply(exc) from None
        return size + json_len + payload_len

    def _take_frame(self, end: int) -> Reply | None:
        """Remove the frame at the head of the read buffer, whole (``end`` bytes, from
        ``_frame_end``), and return it; None for a posted request's failure, which is noted
        instead. A frame leaves the buffer only whole: an interrupted read stays in sync."""
        size = protocol.HEAD.size
        json_len = protocol.HEAD.unpack(self._rbuf[:size])[0]
        try:
            msg = protocol.parse_body(self._rbuf[size : size + json_len], request=False)
        except protocol.FrameError as exc:
            raise self._bad_reply(exc) from None
        data = self._rbuf[size + json_len : end] if end > size + json_len else bytearray()
        del self._rbuf[:end]
        if msg.get("posted"):  # not a reply anyone waits for: a posted request failed
            self._note_posted_failure(msg)
            return None
        self._unconfirmed = False
        return msg, data

    def _bad_reply(self, exc: protocol.FrameError) -> ProtocolError:
        self._shutdown()  # the stream cannot be resynchronized
        return ProtocolError(f"bad reply from the broker: {exc}")

    def _fill(self, sock: socket.socket, n: int) -> None:
        """Read until the buffer holds ``n`` bytes (more if they came: one recv often
        brings several replies)."""
        while len(self._rbuf) < n:
            self._receive(sock)

    def _receive(self, sock: socket.socket, flags: int = 0) -> bool:
        """One read into the buffer; False if nothing was waiting (with MSG_DONTWAIT)."""
        try:
            k = sock.recv_into(self._scratch, 0, flags)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._shutdown()
            raise self._lost(exc) from exc
        if not k:
            self._shutdown()
            raise self._lost(None)
        self._rbuf += self._scratch[:k]
        return True

    def _lost(self, exc: OSError | None) -> ChannelError:
        """The error for a socket that failed: our own close() from another thread, or the broker."""
        if self._closing:
            return EndpointClosed("closed by close() from another thread while waiting")
        if exc is None:
            return BrokerUnavailable(f"the broker at {self.path} closed the connection (it stopped or died)")
        return BrokerUnavailable(f"lost the broker at {self.path}: {exc}")

    def _abandon(
        self, sock: socket.socket, on_interrupt: Callable[[dict[str, Any], bytearray], None] | None
    ) -> None:
        """After an interrupted wait: cancel at the broker and consume its one reply."""
        try:
            self._send(protocol.encode({"op": "cancel"}))
            sock.settimeout(5.0)
            try:
                reply, data = self._read(sock)
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
                try:
                    sock.sendall(b"".join(self._release_frame()))
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
        failure: ChannelError | None = None
        if self._sock is not None:
            if self._request.acquire(blocking=False):
                try:
                    # A reply comes after the failures of the requests posted before it.
                    if farewell is None and self._unconfirmed:
                        farewell = {"op": "sync"}
                    if farewell is not None:
                        self._exchange(farewell, b"", None)
                except ChannelError:
                    pass  # the broker is gone: it has forgotten us anyway
                finally:
                    failure, self._posted_failure = self._posted_failure, None
                    self._request.release()
            else:
                try:
                    self._send(protocol.encode({"op": "cancel"}))
                except ChannelError:
                    pass
        if self._holds <= 0:
            self._shutdown()
        if failure is not None:
            raise failure

    def _shutdown(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it
            except OSError:
                pass
            sock.close()
