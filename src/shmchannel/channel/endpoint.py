"""What DataSender, DataReceiver and DataSystem share: a backend endpoint that ``close()``
lets go of, ``with`` blocks, and (for the two ends of a channel) the channel's name and
the turn its calls that move objects take."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, TypeVar

from ..errors import ChannelTimeout, EndpointClosed, ReentrantCall
from .checks import warn_unclosed

E = TypeVar("E", bound="Endpoint")


class Endpoint:
    _endpoint: Any
    _finalizer: weakref.finalize
    _closing: Any = None  # the backend endpoint of a close() an interrupt cut short

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._endpoint is None

    def close(self) -> None:
        raise NotImplementedError

    def _begin_close(self) -> Any:
        """The backend endpoint to close -- also one whose close an interrupt cut short
        (``close()`` again finishes it) -- marked closed for every other call first."""
        endpoint = self._endpoint if self._endpoint is not None else self._closing
        self._closing = endpoint
        self._endpoint = None
        return endpoint

    def _end_close(self) -> None:
        """The close went through: no warning at collection, then no retry (in this order:
        an interrupt between them leaves a retry, which does nothing twice)."""
        self._finalizer.detach()
        self._closing = None

    def _open(self, make: Callable[[list[Any]], object], close: Callable[[Any], None], name: str | None = None) -> Any:
        """Make the backend endpoint and return it: ``make(made)`` appends it to ``made`` as
        its last step (backends/base.py), so that it counts though an interrupt comes
        before ``make`` returns. The finalizer warning of a forgotten ``close`` (which it
        then does, with ``close``) is registered first, with ``made``; a constructor that
        fails or is cut short closes what was made and empties ``made``, and nothing then
        warns: the object never was. ``name`` names it in the warning (default: its repr,
        taken again once it is open: it says "open" then)."""
        made: list[Any] = []
        label = [name or repr(self)]
        self._finalizer = weakref.finalize(self, warn_unclosed, label, made, close)
        try:
            make(made)
            self._endpoint = made[0]
            self._opened(self._endpoint)
            label[0] = name or repr(self)
        except BaseException:
            self._endpoint = None
            while made:
                close(made[-1])
                made.pop()
            raise
        return self._endpoint

    def _opened(self, endpoint: Any) -> None:
        """What the owner takes from its new backend endpoint (before its repr is taken)."""

    def _live(self) -> Any:
        if self._endpoint is None:
            raise EndpointClosed(f"{self!r} is closed")
        return self._endpoint

    def __enter__(self: E) -> E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChannelEnd(Endpoint):
    _namespace: str
    _dataset_name: str
    _main_waits: bool  # the main thread is inside a send/recv/peek of this end

    def _refuse_reentry(self, what: str, why: str = "it would wait for itself") -> None:
        """Raise ReentrantCall if the main thread is inside ``what`` of this end: this call
        comes from a signal handler run in the middle of it."""
        if self._main_waits:
            raise ReentrantCall(
                f"a call re-entered {self!r} while the main thread is inside {what} of it (from a signal "
                f"handler?); {why}: call it from another thread, or after the outer call"
            )

    @property
    def namespace(self) -> str:
        """The channel's namespace."""
        return self._namespace

    @property
    def dataset_name(self) -> str:
        """The channel's name within its namespace."""
        return self._dataset_name


class Turn:
    """One endpoint's calls that move objects (send, recv, peek), one thread at a time.

    They share the endpoint's state (the room a sender counts, a receiver's prefetched
    objects) and its order. A call waiting its turn waits at most its own timeout, counted
    from when it was made -- not from when an earlier call lets go. Calls that only look
    (``get_queue``, properties) take no turn: they answer while another thread's call waits
    (issue 11). The thread holding the turn cannot take it again (a signal handler run
    while it waits): that raises ``ReentrantCall`` at once instead of waiting for itself.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._lock = threading.Lock()
        self._owner: int | None = None

    @property
    def lock(self) -> threading.Lock:
        """The lock itself, for the main thread's ``with turn.lock:`` (receiver.py:
        ``_recv_main``), whose enter and exit no interrupt can come between."""
        return self._lock

    def held(self, timeout: float | None) -> _Held:
        """``with turn.held(timeout) as left:`` -- the turn for the block, ``left`` what is
        left of ``timeout`` (see ``take``). A with block, so that an interrupt between taking
        the turn and entering the block still gives it back."""
        return _Held(self, timeout)

    def take(self, timeout: float | None) -> float | None:
        """Wait for the turn; return what is left of ``timeout``.

        Raises:
            ReentrantCall: this thread holds the turn already.
            ChannelTimeout: another thread held the turn for all of ``timeout`` seconds.
        """
        me = threading.get_ident()
        if self._owner == me:
            raise ReentrantCall(
                f"a call re-entered {self._what} while its own thread was inside a send/recv/peek of it "
                "(from a signal handler?); it would wait for itself: call it from another thread, or after"
            )
        got = False
        try:
            if self._lock.acquire(blocking=False):  # the usual case: the timeout stays as asked
                got = True
                self._owner = me
                return timeout
            start = time.monotonic()
            got = self._lock.acquire(timeout=-1 if timeout is None else timeout)
            if not got:
                raise ChannelTimeout(
                    f"timed out after {timeout} s waiting for another thread's call on {self._what}; nothing was done"
                )
            self._owner = me
            return None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        except BaseException:
            if got:  # interrupted after taking it: give it back
                self._owner = None
                self._lock.release()
            raise

    def try_take(self) -> bool:
        """Take the turn if it is free, without waiting."""
        if self._owner != threading.get_ident() and self._lock.acquire(blocking=False):
            self._owner = threading.get_ident()
            return True
        return False

    def give(self) -> None:
        self._owner = None
        self._lock.release()


class _Held:
    """The turn for one with block (see ``Turn.held``)."""

    __slots__ = ("_turn", "_timeout")

    def __init__(self, turn: Turn, timeout: float | None) -> None:
        self._turn, self._timeout = turn, timeout

    def __enter__(self) -> float | None:
        return self._turn.take(self._timeout)

    def __exit__(self, *exc: object) -> None:
        self._turn.give()



def close_endpoint(endpoint: Any) -> None:
    """The finalizer's way to close a backend endpoint (and a failed constructor's)."""
    endpoint.close()
