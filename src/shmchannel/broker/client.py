"""A blocking connection to the broker, shared by the threads of one endpoint.

Interrupts -- a KeyboardInterrupt, a signal handler's exception -- are raised only in the
main thread, between any two instructions (issue 13: one inside ``sendall`` sent half a
frame, and the broker took the next frame's header as an object's last bytes). So:

- A reader thread reads every reply and hands it to the call it answers (``_route``): no
  interrupt can lose bytes read or a reply.
- Other threads write their own frames, when none is queued before them; the writer
  thread writes the rest (``_drain``), whole and in order.
- The main thread writes a frame of at most ``ATOMIC_FRAME`` bytes itself: Linux queues it
  whole or not at all, but an interrupt as ``sendall`` returns does not say which, so it
  is written again before anything else, and its sequence number (``seq``) makes the
  broker drop the copy if the first went (``_write_from_main``). Larger ones go to the
  writer thread.
- Waits are on per-call locks (``Gate``), locks are taken by ``with`` blocks: neither
  can be left half done.
- An interrupted wait withdraws its request (``_abandon``); what the broker did meanwhile
  is undone by the call's ``on_interrupt``, run by the reader or the writer.

Every call returns once its frame is written (a few one-way notes excepted), so what it
did survives the process's death right after.

Requests are multiplexed: each carries an id that its reply repeats (protocol.py), so a
thread whose request the broker holds back (a put waiting for room, an open waiting for
its channel) never keeps another thread's request from its answer, and the broker answers
looks (``protocol.IMMEDIATE``) on arrival (issue 11).

A request either waits for its reply (``request``) or is *posted*: queued, its reply read
later (``post``, for the frees that undo an interrupted call; ``close`` posts its
farewell). The broker answers a posted request only if it fails; the reader notes that
failure, and the next request or post (a look excepted) raises it.

``close`` withdraws the requests other threads wait in (they raise EndpointClosed) and
refuses new ones. Releases of zero-copy objects are queued by finalizers (holds.py) and
written in front of the next frame.

The threads hold the connection only weakly: a connection dropped without ``close`` (an
interrupt between connecting and keeping it) shuts its socket when collected (not in a
forked child: that would shut the parent's).
"""

from __future__ import annotations

import _thread
import collections
import itertools
import os
import queue
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ..errors import (
    BrokerUnavailable, Cancelled, ChannelError, EndpointClosed, ReentrantCall, from_wire,
)
from . import protocol
from .calls import WITHDRAWN, Call, Cancel, Frame, OnInterrupt, encode
from .framing import Reply
from .holds import Holds
from .wire import ATOMIC_FRAME, RELEASES, STOP, Wire, forget, watch, write_loop

#: How long an interrupted call waits for the broker to withdraw its request before it
#: returns (the reader still undoes what the reply did, whenever it comes).
ABANDON_TIMEOUT = 5.0

class Connection(Wire):
    """A client connection; ``info`` holds the broker's hello (pid, arena, capacity)."""

    def __init__(self, path: Path | str) -> None:
        self.pid = os.getpid()
        self.path = str(path)
        self._lock = threading.RLock()  # guards the state below; reentrant: a signal handler may call in
        self._calls: dict[int, Call] = {}  # by request id
        self._ids = itertools.count(1)
        self._queued: collections.deque[Frame | Cancel] = collections.deque()  # the writer's; left once written
        self._wake: queue.SimpleQueue[Any] = queue.SimpleQueue()  # the writer's alarm: None, or STOP
        self._write_lock = threading.Lock()  # one writer at a time: the writer thread, or another thread
        self._main = threading.main_thread().ident
        self._holds = Holds()
        self._failure: ChannelError | None = None  # the connection is lost: every wait raises it
        self._closing = False  # close() began: new requests are refused
        self._finished = False  # close() said its farewell: the last release shuts the socket
        self._stopped = False  # the writer was told to stop
        self._release_alarm = False  # the writer was told that releases wait
        self._leaving = False  # withdraw(None): the endpoint closes, its waiting calls end with EndpointClosed
        self._seqs = itertools.count(1)  # numbers of frames the main thread writes (see _write_from_main)
        self._unsure: bytes | None = None  # a frame whose write an interrupt cut: written again next
        self._main_writing = False  # the main thread holds the write lock
        self._posted_failure: ChannelError | None = None  # seen, not raised yet
        self._unconfirmed = False  # posted requests since the last reply
        self._writer: int | None = None  # the writer thread's id, which it sets
        self._reader: int | None = None  # the reader thread's id, which it sets
        # The writer makes and connects the socket: made here, an interrupt could leave it
        # half made, and unclosed. Until the hello is answered only the writer uses it.
        self._sock: socket.socket = None  # type: ignore[assignment]
        self._box = box = []  # type: list[socket.socket]
        # Dropped without close(): end the threads and let the broker see us leave.
        self._watch = watch(self, box, self._wake, self.pid)
        try:
            # One C call, not Thread.start (see aio.Worker); the writer starts the reader.
            mine: weakref.ref[Wire] = weakref.ref(self)
            _thread.start_new_thread(write_loop, (mine, box, self._wake))
            self.info, _ = self.request({"op": "hello", "version": protocol.PROTOCOL_VERSION})
        except BaseException:
            self._shutdown()
            raise

    @property
    def closed(self) -> bool:
        return self._closing or self._failure is not None or self._stopped

    # -- requests ------------------------------------------------------------------------

    def request(
        self, msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"",
        on_interrupt: OnInterrupt | None = None, *, look: bool = False, on_reply: OnInterrupt | None = None,
        track: list[Any] | None = None,
    ) -> Reply:
        """Send ``msg`` and return the broker's reply; its error code raises its class.

        Other threads may make requests meanwhile; each gets its own reply. If the wait is
        interrupted (KeyboardInterrupt, a signal handler's exception), the request is
        withdrawn at the broker; a reply that raced the withdrawal is passed to
        ``on_interrupt`` (by the reader thread: it may only queue frames) so that, e.g., a
        received object goes back to its queue. A ``look`` (a queue listing) leaves the
        failure of an earlier post to the call that acts next: it is the poster's, not an
        observer's. ``on_reply`` takes in an ok reply on the reader thread, before the
        caller wakes: what it does is done however the caller is interrupted. ``track``
        gets the call first thing, for ``unsent`` to say after an interrupt whether the
        broker can have it.

        Raises:
            EndpointClosed: close() was called (from another thread).
            BrokerUnavailable: the connection is lost.
        """
        if not look:
            self._raise_posted_failure()
        return self._call(msg, payload, on_interrupt, on_reply=on_reply, track=track)

    def post(self, msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"", *, quiet: bool = False) -> None:
        """Send ``msg`` without waiting: the broker answers it only if it fails, and that
        failure is raised by the next request or post made after it came. Only for requests the broker can complete without waiting,
        and only from a thread that no other thread's request of this connection can
        overtake. ``quiet``: leave a failure already noted to the caller's next call (an
        ``on_interrupt`` undoing a call)."""
        if not quiet:
            self._raise_posted_failure()
        self._unconfirmed = True  # before queueing: a sync at close may be one too many, never one too few
        self._queue({**msg, "posted": True, "id": next(self._ids)}, payload)

    @staticmethod
    def unsent(track: list[Any]) -> bool:
        """After a ``request(track=...)`` raised: whether its request never reached the
        broker (so what it names is still the caller's to free)."""
        return not track or not track[0].written or track[0].reply is WITHDRAWN

    def withdraw(self, thread: int | None) -> None:
        """Withdraw the requests ``thread`` waits in (they raise ``Cancelled``): for a
        caller that stops waiting for a call another thread makes on its behalf. None: the
        requests of every other thread, which raise ``EndpointClosed`` (a close begins)."""
        me = threading.get_ident()
        with self._lock:
            calls = list(self._calls.values())  # one C step: a signal handler's request cannot change it midway
            if thread is None:
                self._leaving = True
        waiting = [c for c in calls if (c.thread == thread or thread is None and c.thread != me) and not c.abandoned]
        for call in waiting:
            self._hand_over(Cancel(call, abandon=False))

    def _call(self, msg: dict[str, Any], payload: bytes | bytearray | memoryview,
              on_interrupt: OnInterrupt | None, farewell: bool = False, on_reply: OnInterrupt | None = None,
              track: list[Any] | None = None) -> Reply:
        call = Call(next(self._ids), on_interrupt)
        if track is not None:
            track.append(call)
        call.on_reply = on_reply
        try:
            with self._lock:
                if self._closing and not farewell:
                    raise EndpointClosed("closed by close() from another thread")
                self._calls[call.rid] = call
            self._queue({**msg, "id": call.rid}, payload, call)
            answer = self._await(call, None)
            assert answer is not None  # no deadline
            reply, data = answer
            if not reply.get("ok"):
                if reply.get("error") == Cancelled.code and (self._closing or self._leaving):
                    raise EndpointClosed("closed by close() from another thread while waiting")
                raise from_wire(str(reply.get("error")), str(reply.get("message")))
            return reply, data  # (an interrupt up to here is undone: see _abandon)
        except ChannelError:
            self._forget(call)
            raise
        except BaseException:
            self._abandon(call)
            raise

    def _queue(self, msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"",
               call: Call | None = None) -> None:
        """Write one frame, or hand it to the writer; return once it is written (a request:
        once it is queued)."""
        self._live()
        me = threading.get_ident()
        if me == self._writer:  # undoing an interrupted call: its loop writes this next
            self._queued.append(Frame(encode(msg, payload), call))
            return
        if me == self._reader:  # undoing one too: it must never wait for the writer (who may
            self._hand_over(Frame(encode(msg, payload), call))  # wait for the broker, who waits for it)
            return
        if me == self._main:
            if self._main_writing:
                raise ReentrantCall(
                    "a call re-entered a shmchannel connection while the main thread writes to it (from a "
                    "signal handler?); it would wait for itself: call it from another thread, or after"
                )
            if len(payload) <= ATOMIC_FRAME and self._write_from_main(msg, payload, call):
                return
        elif self._sock is not None:
            with self._write_lock:
                if not self._queued:  # nothing goes before it: no handover
                    self._write_unsure()
                    if not self._write_frame(encode(msg, payload), call) and self._failure is not None:
                        self._raise_failure()
                    return
        frame = Frame(encode(msg, payload), call)
        self._hand_over(frame)
        if call is not None:
            return
        while not frame.gone.wait(1.0) and self._failure is None:
            pass  # (a frame queued as the writer left for a failure is never gone: the failure says it)
        if not frame.written:
            self._raise_failure()

    def _raise_failure(self) -> None:
        """Raise the connection's failure: a new exception each time, chained to it -- the
        same object raised again would grow its traceback by every raise."""
        failure = self._failure
        assert failure is not None
        raise type(failure)(str(failure)) from failure

    def _hand_over(self, item: Frame | Cancel) -> None:
        self._queued.append(item)
        self._wake.put(None)

    def _forget(self, call: Call) -> None:
        with self._lock:
            self._calls.pop(call.rid, None)

    def _await(self, call: Call, deadline: float | None) -> Reply | None:
        """The reply to ``call`` (None if ``deadline`` passes first)."""
        call.answered.wait(None if deadline is None else deadline - time.monotonic())
        with self._lock:
            if call.reply is None:
                if self._failure is not None:
                    self._raise_failure()
                return None
            self._calls.pop(call.rid, None)
            return call.reply

    def _abandon(self, call: Call) -> None:
        """After an interrupted call: withdraw it at the broker (the reader undoes a reply
        that raced the withdrawal), and wait a little for that to be done, so that, e.g.,
        a recv's objects go back before this thread's next recv asks for more."""
        self._hand_over(Cancel(call, abandon=True))
        call.settled.wait(ABANDON_TIMEOUT)

    def _raise_posted_failure(self) -> None:
        with self._lock:
            failure, self._posted_failure = self._posted_failure, None
        if failure is not None:
            raise failure

    def _live(self) -> None:
        if os.getpid() != self.pid:
            raise ChannelError(
                f"this connection was made in process {self.pid}; create senders and receivers "
                f"in the process that uses them (this is {os.getpid()})"
            )
        if self._failure is not None:
            self._raise_failure()
        if self._stopped:
            if self._closing:
                raise EndpointClosed("closed by close() from another thread while waiting")
            raise BrokerUnavailable(f"connection to the broker at {self.path} is closed")

    # -- the writer's side ----------------------------------------------------------------

    # -- the reader's side (its thread only) ----------------------------------------------

    # -- zero-copy holds -----------------------------------------------------------------

    def hold(self) -> None:
        """Count one object this process holds through this connection."""
        self._holds.hold()

    def release(self, key: str) -> None:
        """Give back a held object (called by a finalizer; any thread, never raises, never
        blocks: SimpleQueue.put is reentrant)."""
        if os.getpid() != self.pid:
            return
        self._holds.release(key)
        if not self._release_alarm:  # one alarm per batch of releases: they come one per object
            self._release_alarm = True
            self._wake.put(RELEASES)
        if self._finished and self._holds.count <= 0:
            self._shutdown()

    def holds_done(self) -> None:
        """The owner of this connection's holds has none left, whatever the count says (a
        release an interrupt cut short): a closed connection may shut now."""
        self._holds.clear()
        if self._finished:
            self._shutdown()

    # -- closing -------------------------------------------------------------------------

    def close(self, farewell: dict[str, Any] | None = None) -> None:
        """Say ``farewell`` (a last request), then close -- at once, or while zero-copy
        objects are held, once the last is released: holding the socket keeps the broker
        from reusing memory those objects view. Requests other threads wait in are
        withdrawn first (they raise EndpointClosed), and new ones are refused.

        The withdrawals and the farewell are queued for the writer by one step, together
        with the mark that close began: an interrupt cannot leave a close begun without its
        farewell (a receiver still attached, holding its objects). A ``sync`` then waits
        for the broker to have taken them; interrupted, they still go."""
        if os.getpid() != self.pid:
            return
        parts = [] if farewell is None else [encode({**farewell, "posted": True, "id": next(self._ids)})]
        began = False
        failure: ChannelError | None = None
        try:
            with self._lock:
                if self._closing:
                    return
                calls = list(self._calls.values())  # one C step: a signal handler's request cannot change it midway
                items: list[Frame | Cancel] = [Cancel(c, abandon=False) for c in calls if not c.abandoned]
                items += [Frame(p, None) for p in parts]
                self._closing = began = True
                self._queued.extend(items)
            self._wake.put(None)
            if parts or self._unconfirmed:
                # Its reply comes after the failures of the requests posted before it.
                self._call({"op": "sync"}, b"", None, farewell=True)
        except ChannelError:
            pass  # the broker is gone: it has forgotten us anyway
        finally:
            if began:  # (also if interrupted: what close queued must go, and the socket end)
                self._wake.put(None)
                self._finished = True
                if self._holds.count <= 0:
                    self._shutdown()
                failure, self._posted_failure = self._posted_failure, None
        if failure is not None:
            raise failure

    def _shutdown(self) -> None:
        """Stop the writer after what is queued; it then closes the socket's both ways."""
        if not self._stopped:
            self._stopped = True
            self._wake.put(STOP)
            forget(self._watch)
