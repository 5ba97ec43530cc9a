"""What a connection's callers and its two threads hand each other (client.py, wire.py):
calls waiting for replies, frames queued for the writer, withdrawals, and the gates they
wait on."""

from __future__ import annotations

import threading
from typing import Any, Callable

from ..errors import Cancelled, ProtocolError
from . import protocol
from .framing import Reply

OnInterrupt = Callable[[dict[str, Any], memoryview], None]

WITHDRAWN: Reply = (
    {"ok": False, "error": Cancelled.code, "message": "withdrawn before it was sent"}, memoryview(b"")
)


class Gate:
    """Something a thread waits for, and that stays done once done: a lock held until then.

    Not a Condition: an interrupt inside ``Condition.wait`` can leave its lock released and
    the with block around it failing with "cannot release un-acquired lock". A lock's
    acquire is one C call: interrupted, it has either taken the lock or not."""

    __slots__ = ("_lock", "done")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.done = False

    def open(self) -> None:
        """Done (call it under the connection's lock: once)."""
        if not self.done:
            self.done = True
            self._lock.release()

    def wait(self, timeout: float | None) -> bool:
        """Wait until done, at most ``timeout`` seconds; whether it is."""
        if self.done:
            return True
        if self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._lock.release()  # done for every later wait too (which look at ``done`` first)
            return True
        return self.done


class Call:
    """A request made and not yet answered: who waits for it, and its reply once read."""

    __slots__ = ("rid", "thread", "reply", "answered", "written", "on_interrupt", "on_reply", "abandoned", "settled")

    def __init__(self, rid: int, on_interrupt: OnInterrupt | None) -> None:
        self.rid = rid
        self.thread = threading.get_ident()
        self.reply: Reply | None = None
        self.answered = Gate()  # reply is set (or the connection failed)
        self.written = False  # the writer wrote its frame: only then may a cancel follow
        self.on_interrupt = on_interrupt
        self.on_reply: OnInterrupt | None = None  # run by the reader on an ok reply, before its caller wakes
        self.abandoned = False  # its caller was interrupted: the reader undoes the reply
        self.settled = Gate()  # abandoned, and the reply undone (or it was never sent)


class Frame:
    """A frame queued for the writer; ``written`` once it is (then its caller returns)."""

    __slots__ = ("parts", "call", "written", "gone")

    def __init__(self, parts: list[Any], call: Call | None) -> None:
        self.parts, self.call, self.written = parts, call, False
        self.gone = Gate()  # the writer is done with it: written, or the connection failed


class Cancel:
    """A queued withdrawal of ``call`` (the writer decides how: see ``_write_cancel``).
    ``abandon``: its caller stopped waiting, and a reply that raced the withdrawal is
    undone; else (``close``, ``withdraw``) the caller still waits and gets that reply."""

    __slots__ = ("call", "abandon")

    def __init__(self, call: Call, abandon: bool) -> None:
        self.call, self.abandon = call, abandon


def encode(msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"") -> list[Any]:
    """A request frame; one the broker would refuse is refused here, before anything is
    queued, so the connection stays in step (callers keep within the bounds: this is the
    last line)."""
    try:
        return protocol.encode(msg, payload)
    except protocol.FrameError as exc:
        raise ProtocolError(f"not sent: {exc}") from None
