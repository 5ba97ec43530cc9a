"""The two threads that own a connection's socket, and what they do for it (client.py
says why): the writer connects, starts the reader, and writes the frames queued for it;
the reader routes every reply to its call. ``Wire`` holds their side of ``Connection``."""

from __future__ import annotations

import _thread
import collections
import functools
import itertools
import logging
import os
import queue
import socket
import threading
import time
import weakref
from typing import Any

from ..errors import BrokerUnavailable, ChannelError, EndpointClosed, ProtocolError, from_wire
from . import protocol
from .calls import WITHDRAWN, Call, Cancel, Frame, encode
from .framing import FrameReader, Reply
from .holds import Holds

log = logging.getLogger(__name__)

STOP = object()  # tells the writer to stop
RELEASES = object()  # tells the writer releases wait: it writes them after RELEASE_DELAY

#: Largest frame the main thread writes itself: Linux queues a Unix stream write of up to
#: about 36 KiB (one skb: SKB_MAX_HEAD + 32 KiB of page fragments) whole or not at all.
ATOMIC_FRAME = 32 * 1024

#: How long the writer lets releases gather before it writes them (unless a frame written
#: meanwhile carries them): a reader of many objects drops them one after another, and a
#: wake-up of the writer per object cost 10-20% of 1 MiB throughput when channel objects
#: were released this way.
RELEASE_DELAY = 0.001


class Wire:
    """The writer's and the reader's side of a ``Connection`` (whose state this is)."""

    path: str
    _sock: socket.socket
    _box: list[socket.socket]
    _wake: queue.SimpleQueue[Any]
    _lock: threading.RLock
    _write_lock: threading.Lock
    _queued: collections.deque[Frame | Cancel]
    _calls: dict[int, Call]
    _holds: Holds
    _failure: ChannelError | None
    _closing: bool
    _unsure: bytes | None
    _seqs: itertools.count[int]
    _main_writing: bool
    _posted_failure: ChannelError | None
    _unconfirmed: bool
    _release_alarm: bool
    _writer: int | None
    _reader: int | None

    def _raise_failure(self) -> None:
        raise NotImplementedError

    def _write_from_main(self, msg: dict[str, Any], payload: bytes | bytearray | memoryview, call: Call | None) -> bool:
        """Write a small frame from the main thread itself (False: it must go to the writer).

        A frame of at most ATOMIC_FRAME bytes is one system call that queues all of it or
        nothing; but an interrupt raised as ``sendall`` returns does not say which. So the
        frame stays ``_unsure`` until that is known, and is written again before anything
        else if an interrupt came: its sequence number makes the broker drop the copy if
        the first one went (connection.py)."""
        with self._write_lock:
            self._main_writing = True
            try:
                if self._queued or self._holds.pending() or self._sock is None or self._failure is not None:
                    return False  # (releases queued: the writer sends them first, then this)
                if call is not None and call.reply is not None:
                    return True  # withdrawn before it went: it must not go
                self._write_unsure()
                data = b"".join(encode({**msg, "seq": next(self._seqs)}, payload))
                if len(data) > ATOMIC_FRAME:
                    return False
                if call is not None:
                    call.written = True
                self._unsure = data
                self._sock.sendall(data)
                self._unsure = None
            except OSError as exc:
                self._fail(self._lost(exc))
                self._raise_failure()
            finally:
                self._main_writing = False
        return True

    def _write_unsure(self) -> None:
        """Write again the frame an interrupt cut the main thread's write of (see
        ``_write_from_main``); the caller holds the write lock."""
        data = self._unsure
        if data is not None and self._failure is None:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._fail(self._lost(exc))
            self._unsure = None

    def _drain(self, sock: socket.socket) -> None:
        """Write what is queued, in order, then the releases queued (the writer thread)."""
        with self._write_lock:
            self._write_unsure()
            while self._queued:
                item = self._queued[0]
                if isinstance(item, Cancel):
                    parts = self._write_cancel(item.call, item.abandon)
                    if parts is not None:
                        self._write_frame(parts, None)
                else:
                    item.written = self._write_frame(item.parts, item.call)
                    with self._lock:
                        item.gone.open()
                self._queued.popleft()  # only now: a thread finding the queue empty writes its own
            if self._holds.pending():
                self._write_frame([], None)

    def _write_frame(self, parts: list[Any], call: Call | None) -> bool:
        """Write one frame after the releases queued (one system call, and memory back
        sooner); whether it was written. The caller holds the write lock."""
        if self._failure is not None or (call is not None and call.reply is not None):
            return False  # (a call answered before its frame went was withdrawn: it must not go)
        if self._holds.pending():
            parts = self._holds.frame() + parts
        if call is not None:
            call.written = True
        try:
            self._sock.sendall(b"".join(parts))
        except OSError as exc:
            self._fail(self._lost(exc))
            return False
        return True

    def _write_cancel(self, call: Call, abandon: bool) -> list[Any] | None:
        """How to withdraw ``call``: a cancel frame if its request went out and is not
        answered; else nothing to send. A call never written (it cannot be queued after
        its cancel: the queue is in order) is answered "withdrawn"; an abandoned call's
        reply, if it came, is undone here."""
        with self._lock:
            if abandon:
                call.abandoned = True
            if call.reply is None and call.written:
                return encode({"op": "cancel", "id": call.rid})
            reply = call.reply
            if reply is None:
                call.reply = WITHDRAWN
            if not abandon:
                call.answered.open()
                return None
            self._calls.pop(call.rid, None)
        if reply is not None:
            self._undo(call, reply)
        self._settle(call)
        return None

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
                raise protocol.FrameError(f"reply to request {rid!r}, which is not waiting")
            call.reply = frame
            self._unconfirmed = False
            undo = call.abandoned  # else, if abandoned from now on, _write_cancel undoes it
            if undo:
                self._calls.pop(call.rid, None)
        if call.on_reply is not None and msg.get("ok"):
            call.on_reply(*frame)
        with self._lock:
            call.answered.open()
        if undo:
            self._undo(call, frame)
            self._settle(call)

    def _undo(self, call: Call, reply: Reply) -> None:
        """Undo what an abandoned call's reply did (its ``on_interrupt``); off the caller's
        thread, so it completes whatever interrupts the caller."""
        if reply[0].get("ok") and call.on_interrupt is not None:
            try:
                call.on_interrupt(*reply)
            except ChannelError:
                pass  # the connection is lost: the broker undid it all with the connection
            except Exception:  # never let it stop the reader or writer: every call would hang
                log.exception("undoing an interrupted %r failed", reply[0].get("op"))

    def _settle(self, call: Call) -> None:
        with self._lock:
            call.settled.open()

    def _fail(self, failure: ChannelError) -> None:
        """The connection is lost: every waiting call raises ``failure``, new ones too."""
        with self._lock:
            if self._failure is None:
                self._failure = failure
            for call in self._calls.values():
                call.answered.open()
                call.settled.open()
            for item in self._queued:
                if isinstance(item, Frame):
                    item.gone.open()
        abort(self._box, self._wake)

    def _lost(self, exc: OSError | None) -> ChannelError:
        """The error for a socket that failed: our own close, or the broker's."""
        if self._closing:
            return EndpointClosed("closed by close() from another thread while waiting")
        if exc is None:
            return BrokerUnavailable(f"the broker at {self.path} closed the connection (it stopped or died)")
        return BrokerUnavailable(f"lost the broker at {self.path}: {exc}")


def write_loop(ref: weakref.ref[Wire], box: list[socket.socket], wake: queue.SimpleQueue[Any]) -> None:
    """The writer thread: connects, starts the reader, writes what is queued at each alarm
    until told to stop (or the connection is dropped), then what is left; then closes."""
    conn = ref()
    if conn is None:
        return
    conn._writer = threading.get_ident()
    try:
        box.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        # Linux cuts a stream write into chunks of up to half the send buffer: at least
        # 2 * ATOMIC_FRAME, for the main thread's frames to go whole or not at all.
        box[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * ATOMIC_FRAME)
        box[0].connect(conn.path)
    except OSError as exc:
        failure = BrokerUnavailable(f"cannot connect to the broker at {conn.path}: {exc.strerror or exc}")
        failure.__cause__ = exc
        conn._fail(failure)
        return
    sock = conn._sock = box[0]
    del conn
    try:
        _thread.start_new_thread(read_loop, (ref, sock))
        while (token := wake.get()) is not STOP:
            if token is RELEASES:
                time.sleep(RELEASE_DELAY)
            conn = ref()
            if conn is None:
                return
            if token is RELEASES:
                conn._release_alarm = False  # before writing them: a later release alarms again
            conn._drain(sock)
            del conn, token
        conn = ref()
        if conn is not None:
            conn._drain(sock)
        del conn
    finally:
        abort(box, wake)


def read_loop(ref: weakref.ref[Wire], sock: socket.socket) -> None:
    """The reader thread: reads and routes replies until the socket ends."""
    conn = ref()
    if conn is not None:
        conn._reader = threading.get_ident()
    del conn
    frames = FrameReader()
    failure: ChannelError | None = None
    while failure is None:
        try:
            n = frames.fill(sock)
        except OSError as exc:
            conn = ref()
            if conn is not None:
                failure = conn._lost(exc)
            break
        conn = ref()
        if conn is None:
            return
        if not n:
            failure = conn._lost(None)
            break
        try:
            while (frame := frames.next_frame()) is not None:
                conn._route(frame)
        except protocol.FrameError as exc:  # the stream cannot be resynchronized
            failure = ProtocolError(f"bad reply from the broker: {exc}")
        except BaseException as exc:  # a bug, or MemoryError: fail every call rather than leave them waiting
            failure = ProtocolError(f"reading the broker's replies failed: {exc!r}")
        del conn
    conn = ref()
    if conn is not None and failure is not None:
        conn._fail(failure)


def abort(box: list[socket.socket], wake: queue.SimpleQueue[Any], pid: int | None = None) -> None:
    """End both threads of a connection and close its socket (in ``box`` once made): the
    writer stops, the reader sees EOF. Shut down first: a read in progress then returns;
    the close only frees the descriptor (the socket object forgets it, so no later call
    can use another file's). Nothing in a forked child (``pid``): shutting a socket down
    acts on the parent's too."""
    if pid is not None and os.getpid() != pid:
        return
    wake.put(STOP)
    for sock in box:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


# -- aborting dropped connections ----------------------------------------------------------
#
# A connection dropped without close() is aborted (``abort``) by a thread of its own, woken
# by a weakref callback that is a C call chain (a partial of SimpleQueue.put): no Python
# code runs in the thread that dropped it, so an interrupt there cannot cut the abort short
# (weakref.finalize runs Python code of its own, and an interrupt landing in it left the
# socket open: found by the random-interrupt tests).

_dropped: queue.SimpleQueue[Any] = queue.SimpleQueue()
_watched: dict[int, Any] = {}  # key -> the weakref (kept alive here until fired or forgotten)
_keys = itertools.count()
_reaper_pid = 0
_reaper_lock = threading.Lock()


def watch(owner: Any, box: list[socket.socket], wake: queue.SimpleQueue[Any], pid: int) -> int:
    """Abort the connection of ``owner`` once it is garbage; a key for ``forget``."""
    global _reaper_pid
    with _reaper_lock:
        if _reaper_pid != os.getpid():  # first use, or a forked child: no reaper thread yet
            _thread.start_new_thread(_reap, ())
            _reaper_pid = os.getpid()
    key = next(_keys)
    _watched[key] = weakref.ref(owner, functools.partial(_dropped.put, (key, box, wake, pid)))
    return key


def forget(key: int) -> None:
    """``owner`` was closed: no abort (the weakref goes, and its callback with it)."""
    _watched.pop(key, None)


def _reap() -> None:
    while True:
        key, box, wake, pid = _dropped.get()
        _watched.pop(key, None)
        try:
            abort(box, wake, pid)
        except Exception:  # noqa: BLE001 -- a socket already gone: nothing left to do
            pass
