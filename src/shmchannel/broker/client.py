"""A blocking connection to the broker, shared by the threads of one endpoint.

Requests are multiplexed: each carries an id that its reply repeats (protocol.py). A thread
waiting for a reply either reads the socket itself -- one reader at a time, which routes
every reply it reads to the thread that asked -- or sleeps until the reader hands its reply
over. So a thread whose request the broker holds back (a send waiting for room, a recv
waiting for data) never keeps another thread's request from its answer: the broker answers
looks (``protocol.IMMEDIATE``) on arrival, and the reader passes them on. Before, one lock
covered a request and its whole wait, and a monitoring thread's ``get_queue`` hung behind a
producer thread's blocked ``send`` for good (issue 11).

A request either waits for its reply (``request``) or is *posted*: written at once, its
reply read later (``post``; a sender posts sends it knows the broker can take without
waiting). The broker answers a posted request only if it fails; that failure is raised by
the next call that waits for a reply, or by a later post.

A call cannot re-enter the connection from its own thread (a signal handler that runs
while its thread waits here): the outer call is the reader, or waits for it, and cannot go
on until the handler returns. Such a call raises ``ReentrantCall`` at once.

``close`` from another thread withdraws the requests other threads wait in (they raise
EndpointClosed) and refuses new ones; a request is registered and written under the write
lock, so a withdrawal never reaches the broker before the request it names.

Releases of zero-copy objects are queued by finalizers (holds.py) and written in front
of the next frame, or at once when the write lock is free.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import (
    BrokerUnavailable, Cancelled, ChannelError, EndpointClosed, ProtocolError, ReentrantCall, from_wire,
)
from . import protocol
from .framing import FrameReader, Reply, wait_readable
from .holds import Holds

#: How long an interrupted call waits for the broker to withdraw its request.
ABANDON_TIMEOUT = 5.0


class _Call:
    """A request sent and not yet answered: the thread that waits for it, its reply once read."""

    __slots__ = ("thread", "reply")

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.reply: Reply | None = None


class Connection:
    """A client connection; ``info`` holds the broker's hello (pid, arena, capacity)."""

    def __init__(self, path: Path | str) -> None:
        self.pid = os.getpid()
        self.path = str(path)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # guards the routing state below; held only briefly
        self._arrived = threading.Condition(self._lock)  # a reply was routed, or the reader left
        self._calls: dict[int, _Call] = {}  # by request id
        self._reading = False  # a thread reads the socket; the others wait on _arrived
        self._sleepers = 0  # threads waiting on _arrived
        self._frames = FrameReader()
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._writer: int | None = None  # the thread holding the write lock
        self._holds = Holds()
        self._closing = False  # close() began: new requests are refused
        self._finished = False  # close() said its farewell: the last release shuts the socket
        self._posted_failure: ChannelError | None = None  # seen, not raised yet
        self._unconfirmed = False  # posted requests since the last reply
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
        on_interrupt: Callable[[dict[str, Any], memoryview], None] | None = None, *, look: bool = False,
    ) -> Reply:
        """Send ``msg`` and return the broker's reply; its error code raises its class.

        Other threads may make requests meanwhile; each gets its own reply. If the wait is
        interrupted (KeyboardInterrupt, a signal handler's exception), the request is
        withdrawn at the broker; a reply that raced the withdrawal is passed to
        ``on_interrupt`` so that, e.g., a received object can be put back in its queue.
        A ``look`` (a queue listing) leaves the failure of an earlier post to the call
        that acts next: it is the poster's, not an observer's.

        Raises:
            ReentrantCall: this thread already waits in a request of this connection.
            EndpointClosed: close() was called (from another thread).
        """
        self._check_reentry()
        if not look:
            if self._unconfirmed:
                self._poll()
            self._raise_posted_failure()
        return self._call(msg, payload, on_interrupt)

    def post(self, msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
        """Send ``msg`` without waiting: the broker answers it only if it fails, and that
        failure is raised by a later call: one that waits for a reply raises it first thing
        if it has come; a post looks for it after writing (so that its message never waits
        for the look) and leaves it to the next call. Only for requests the broker can
        complete without waiting, and only from a thread that no other thread's request
        of this connection can overtake (the sender posts under its endpoint's turn)."""
        self._check_reentry()
        self._raise_posted_failure()
        self._send(_encode({**msg, "posted": True, "id": next(self._ids)}, payload))
        if self._unconfirmed:  # after the write: a message never waits for this look
            self._poll()
        self._unconfirmed = True

    def one_way(self, msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> None:
        self._send(_encode(msg, payload))

    def _check_reentry(self) -> None:
        if not self._calls:  # nothing outstanding: the usual case, no lock needed
            return
        me = threading.get_ident()
        with self._lock:
            if any(call.thread == me for call in self._calls.values()):
                raise ReentrantCall(
                    "a call re-entered a shmchannel endpoint its own thread is inside (from a signal "
                    "handler?); it would wait for itself: call it from another thread, or after the outer call"
                )

    def _call(
        self, msg: dict[str, Any], payload: bytes | bytearray | memoryview,
        on_interrupt: Callable[[dict[str, Any], memoryview], None] | None, farewell: bool = False,
    ) -> Reply:
        rid = next(self._ids)
        frame = _encode({**msg, "id": rid}, payload)
        try:
            self._send(frame, rid, farewell)
            answer = self._await(rid, None)
        except ChannelError:
            self._forget(rid)
            raise
        except BaseException:
            with self._lock:
                sent = rid in self._calls  # else it was interrupted before its frame was written
            if sent:
                self._abandon(rid, on_interrupt)
            raise
        assert answer is not None  # no deadline
        reply, data = answer
        if not reply.get("ok"):
            if reply.get("error") == Cancelled.code and self._closing:
                raise EndpointClosed("closed by close() from another thread while waiting")
            raise from_wire(str(reply.get("error")), str(reply.get("message")))
        return reply, data

    def _forget(self, rid: int) -> None:
        with self._lock:
            self._calls.pop(rid, None)

    def _await(self, rid: int, deadline: float | None) -> Reply | None:
        """The reply to request ``rid`` (None if ``deadline`` passes first): read by this
        thread if no other reads, else handed over by the reader."""
        reader = False
        try:
            with self._lock:
                while True:
                    call = self._calls[rid]
                    if call.reply is not None:
                        del self._calls[rid]
                        return call.reply
                    if not self._reading:
                        self._reading = reader = True
                        break
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._sleepers += 1
                    try:
                        self._arrived.wait(left)
                    finally:
                        self._sleepers -= 1
            while True:
                if not self._read_frames(deadline):
                    return None
                with self._lock:
                    call = self._calls[rid]
                    if call.reply is not None:
                        del self._calls[rid]
                        return call.reply
        finally:
            if reader:
                with self._lock:
                    self._reading = False
                    self._wake()  # another waiter reads now

    def _poll(self) -> None:
        """Take in, without waiting, the frames that came (failures of posted requests);
        nothing if another thread reads: it takes them in."""
        reader = False
        try:
            with self._lock:
                if self._reading:
                    return
                self._reading = reader = True
            self._read_frames(0.0)
        finally:
            if reader:
                with self._lock:
                    self._reading = False
                    self._wake()

    def _wake(self) -> None:
        """Wake the threads waiting for a reply (call with the lock held). Skipped when none
        sleeps: Condition.notify_all is Python code, a few us on every request."""
        if self._sleepers:
            self._arrived.notify_all()

    def _raise_posted_failure(self) -> None:
        with self._lock:
            failure, self._posted_failure = self._posted_failure, None
        if failure is not None:
            raise failure

    def _live(self) -> socket.socket:
        if os.getpid() != self.pid:
            raise ChannelError(
                f"this connection was made in process {self.pid}; create senders and receivers "
                f"in the process that uses them (this is {os.getpid()})"
            )
        sock = self._sock
        if sock is None:
            if self._closing:
                raise EndpointClosed("closed by close() from another thread while waiting")
            raise BrokerUnavailable(f"connection to the broker at {self.path} is closed")
        return sock

    def _send(self, parts: list[Any], rid: int | None = None, farewell: bool = False) -> None:
        """Write one frame (after any queued releases); with ``rid``, register the request
        under the same lock, unless close() began (its farewell excepted)."""
        sock = self._live()
        me = threading.get_ident()
        if self._writer == me:  # a signal handler interrupted our own write
            raise ReentrantCall("a call re-entered a shmchannel endpoint while its own thread was writing to the broker")
        with self._write_lock:
            self._writer = me
            try:
                if rid is not None:
                    with self._lock:
                        if self._closing and not farewell:
                            raise EndpointClosed("closed by close() from another thread")
                        self._calls[rid] = _Call()
                if self._holds.pending():  # in the same write: one system call, and memory back sooner
                    parts = self._holds.frame() + parts
                sock.sendall(b"".join(parts))
            except OSError as exc:
                raise self._lost(exc) from exc
            finally:
                self._writer = None
        self._flush_releases()

    # -- reading (by the one reader) -------------------------------------------------------

    def _read_frames(self, deadline: float | None) -> bool:
        """Read and route at least one whole frame, plus any others already in; False if
        ``deadline`` passed first (0: route only what already came)."""
        sock = self._live()
        routed = False
        while True:
            try:
                frame = self._frames.next_frame()
            except protocol.FrameError as exc:
                raise self._bad_reply(exc) from None
            if frame is not None:
                self._route(frame)
                routed = True
            elif routed:
                return True
            elif deadline is not None and not wait_readable(sock, deadline):
                return False
            else:
                self._receive(sock)

    def _receive(self, sock: socket.socket) -> None:
        try:
            n = self._frames.fill(sock)
        except OSError as exc:
            self._shutdown()
            raise self._lost(exc) from exc
        if not n:
            self._shutdown()
            raise self._lost(None)

    def _route(self, frame: Reply) -> None:
        """Hand a reply to the call it answers (a posted request's failure is noted)."""
        msg = frame[0]
        with self._lock:
            if msg.get("posted"):  # not a reply anyone waits for: a posted request failed
                if self._posted_failure is None:
                    self._posted_failure = from_wire(
                        str(msg.get("error")),
                        f"an earlier call that returned without waiting for the broker failed: {msg.get('message')}",
                    )
                return
            rid = msg.get("id")
            if rid is None and self._calls:  # the broker refused the connection: the first call hears it
                rid = min(self._calls)
            call = self._calls.get(rid) if isinstance(rid, int) else None
            if call is None or call.reply is not None:
                raise self._bad_reply(protocol.FrameError(f"reply to request {rid!r}, which is not waiting"))
            call.reply = frame
            self._unconfirmed = False
            self._wake()

    def _bad_reply(self, exc: protocol.FrameError) -> ProtocolError:
        self._shutdown()  # the stream cannot be resynchronized
        return ProtocolError(f"bad reply from the broker: {exc}")

    def _lost(self, exc: OSError | None) -> ChannelError:
        """The error for a socket that failed: our own close() from another thread, or the broker."""
        if self._closing:
            return EndpointClosed("closed by close() from another thread while waiting")
        if exc is None:
            return BrokerUnavailable(f"the broker at {self.path} closed the connection (it stopped or died)")
        return BrokerUnavailable(f"lost the broker at {self.path}: {exc}")

    def _abandon(self, rid: int, on_interrupt: Callable[[dict[str, Any], memoryview], None] | None) -> None:
        """After an interrupted wait: withdraw request ``rid`` at the broker and take its
        one reply before this thread's next call, so that, e.g., a recv's objects go back
        before the next recv asks for more; if that fails, the connection is closed (it
        could not be kept in step)."""
        try:
            self._send(_encode({"op": "cancel", "id": rid}))
            answer = self._await(rid, time.monotonic() + ABANDON_TIMEOUT)
            if answer is None:
                raise TimeoutError(f"the broker did not withdraw request {rid} in {ABANDON_TIMEOUT} s")
            reply, data = answer
            if reply.get("ok") and on_interrupt is not None:
                on_interrupt(reply, data)
        except BaseException:
            self._forget(rid)
            self._shutdown()

    # -- zero-copy holds -----------------------------------------------------------------

    def hold(self) -> None:
        """Count one object this process holds through this connection."""
        self._holds.hold()

    def release(self, key: str) -> None:
        """Give back a held object (called by a finalizer; any thread, never raises)."""
        if os.getpid() != self.pid:
            return
        self._holds.release(key)
        self._flush_releases()
        if self._finished and self._holds.count <= 0:
            self._shutdown()

    def _flush_releases(self) -> None:
        while self._holds.pending():
            sock = self._sock
            if sock is None or not self._write_lock.acquire(blocking=False):
                return  # the holder flushes when it lets go
            self._writer = threading.get_ident()
            try:
                try:
                    sock.sendall(b"".join(self._holds.frame()))
                except OSError:
                    return  # broker gone: it freed everything of ours with the connection
            finally:
                self._writer = None
                self._write_lock.release()

    # -- closing -------------------------------------------------------------------------

    def close(self, farewell: dict[str, Any] | None = None) -> None:
        """Say ``farewell`` (a last request), then close -- at once, or while zero-copy
        objects are held, once the last is released: holding the socket keeps the broker
        from reusing memory those objects view. Requests other threads wait in are
        withdrawn first (they raise EndpointClosed), and new ones are refused. From a
        signal handler whose thread waits in a request, the farewell is skipped (it would
        wait for that request)."""
        if os.getpid() != self.pid:
            return
        me = threading.get_ident()
        with self._lock:
            if self._closing:
                return
            self._closing = True
            waiting = list(self._calls)
            reentrant = any(call.thread == me for call in self._calls.values())
        failure: ChannelError | None = None
        try:
            for rid in waiting:
                self._send(_encode({"op": "cancel", "id": rid}))
            # A reply comes after the failures of the requests posted before it.
            if farewell is None and self._unconfirmed:
                farewell = {"op": "sync"}
            if farewell is not None and not reentrant:
                self._call(farewell, b"", None, farewell=True)
        except ChannelError:
            pass  # the broker is gone (it has forgotten us anyway), or we interrupted our own write
        finally:
            with self._lock:
                failure, self._posted_failure = self._posted_failure, None
            self._finished = True
            if self._holds.count <= 0:
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


def _encode(msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> list[Any]:
    """A request frame; one the broker would refuse is refused here, before anything is
    written, so the connection stays in step (callers keep within the bounds: this is the
    last line)."""
    try:
        return protocol.encode(msg, payload)
    except protocol.FrameError as exc:
        raise ProtocolError(f"not sent: {exc}") from None
