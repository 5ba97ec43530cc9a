"""The embedded backend's side of the arena: this process's mapping of it, its session
with the broker (the claim log its receivers share), and a broker connection that packs
DataSystem objects into blobs (inline, or in arena blocks it allocates) and unpacks get
replies into objects that view the arena (zero-copy, each view holding its block until
dropped). The endpoints (embedded.py, sending.py, receiving.py) say what to do."""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

from ..broker import daemon, protocol
from ..errors import BrokerUnavailable
from ..queue.log import ClaimLog
from ..serialization import deserialize, serialize
from ..store.arena import ArenaMap
from ..store.blob import plan_blob, read_blob, write_blob
from . import views

#: Blobs up to this many bytes travel inline with their key instead of through the arena:
#: below it a socket copy is cheaper than an arena block's extra round trip and release.
INLINE_THRESHOLD = 64 * 1024

#: Most inline bytes one request carries, whatever ``inline_threshold`` says: the frame's
#: payload bound (``protocol.MAX_PAYLOAD``, 256 MiB). Parts past it go through the arena.
INLINE_BUDGET = protocol.MAX_PAYLOAD

_arena_lock = threading.Lock()
_arena: tuple[int, str, ArenaMap] | None = None  # (pid, path, map) of the current broker


def _arena_for(info: dict[str, Any]) -> ArenaMap:
    """This process's mapping of the broker's arena (one per process and broker)."""
    global _arena
    with _arena_lock:
        if _arena is None or _arena[0] != os.getpid() or _arena[1] != info["arena"]:
            # Dropping an old broker's map unmaps it once no view of it is left.
            _arena = (os.getpid(), info["arena"], ArenaMap(info["arena"], int(info["capacity"])))
        return _arena[2]


class Session:
    """This process's standing with one broker: a connection kept open for the life of
    the process, and on it the process's claim log (queue/log.py), which every receiver of
    the process records its claims in. The log must outlive any one receiver: objects it
    received stay valid after its ``close()``, and their references are dropped by this
    process (or by the broker, once this connection closes with the process)."""

    def __init__(self, arena: ArenaMap) -> None:
        self.arena = arena
        # Open receivers using it (see ``leave_session``): weak, so that one whose
        # constructor was interrupted before it was counted is not counted for ever.
        self.receivers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.ending = False
        self.conn = daemon.connect()
        try:
            reply, _ = self.conn.request({"op": "log"})
            view = arena.whole
            self.log = ClaimLog(arena.region, view, int(reply["offset"]), int(reply["capacity"]),
                                int(reply["claimer"]))
        except BaseException:
            self.conn.close()
            raise


_sessions: dict[tuple[int, str], Session] = {}


def session_for(arena: ArenaMap, receiver: Any) -> Session:
    """This process's session with the broker owning ``arena``, now used by ``receiver``
    too (made on first use, made again if that broker's connection was lost or the last
    receiver ended it). The receiver calls ``leave_session`` when it closes or its
    constructor fails."""
    with _arena_lock:
        key = (os.getpid(), arena.path)
        found = _sessions.get(key)
        if found is None or found.ending or found.conn.closed:
            found = _sessions[key] = Session(arena)
        found.receivers.add(receiver)  # in the same step: no one ends it in between
        return found


def leave_session(arena: ArenaMap, receiver: Any) -> None:
    """``receiver`` no longer uses its session. The last one ends the session if nothing
    is left in its log (no claim, no view): its log goes back to the store, and a broker
    with nothing else to do may exit. Otherwise it lasts until the process does (or the
    next last close)."""
    key = (os.getpid(), arena.path)
    with _arena_lock:
        session = _sessions.get(key)
        if session is None:
            return
        session.receivers.discard(receiver)
        if session.receivers or session.log.busy():
            return
        session.ending = True  # handed out no more, though an interrupt cut what follows
        session.log.release()
    # Closed before it leaves the table: a close cut short by an interrupt is done again
    # by the next leave (and a closed session is never handed out: ``session_for``).
    session.conn.close()
    with _arena_lock:
        if _sessions.get(key) is session:
            del _sessions[key]


def tell_next_broker(msg: dict[str, Any]) -> None:
    """Send ``msg`` to the broker running now, if one does (none is started): for an
    endpoint whose broker died, to give back what it had from it (the next broker took
    over its arena: daemon.py)."""
    try:
        conn = daemon.connect()
    except BrokerUnavailable:
        return
    try:
        conn.request(msg)
    except Exception:  # noqa: BLE001 -- its own broker is gone: nothing more to do
        pass
    finally:
        conn.close()


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Releases:
    """Gives back a connection's hold of a DataSystem object once its view is gone."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.closing = False

    def drop_view(self, key: str, done: list[bool]) -> None:
        done[0] = True  # first: cut short before the release, the hold is kept (never dropped twice)
        self.conn.release(key)
        if self.closing:
            self.settle()

    def settle(self) -> None:
        """After close: with no view left, a release an interrupt cut short must not keep
        the connection open (its count says one more hold than there is)."""
        if not views.live(self):
            self.conn.holds_done()


class ArenaClient:
    """A connection plus the arena: packs objects into blobs and unpacks replies."""

    def __init__(self, inline_threshold: int) -> None:
        self.inline_threshold = inline_threshold
        self.conn = daemon.ensure_running()
        self.releases = _Releases(self.conn)
        try:
            self.arena = _arena_for(self.conn.info)
        except BaseException:
            self.conn.close()
            raise

    def pack(
        self, objs: list[Any], timeout: float | None, deadline: float | None,
    ) -> tuple[list[dict[str, Any]], bytearray]:
        """Write ``objs`` as DataSystem blobs: (part descriptions, inline payload). Blobs go
        inline up to ``inline_threshold`` bytes each and ``INLINE_BUDGET`` in all; the others
        into arena blocks the broker allocates. Frees on failure."""
        serialized = [serialize(obj) for obj in objs]
        plans = [plan_blob(len(s.header), [int(b.nbytes) for b in s.buffers]) for s in serialized]
        inline, budget = [], INLINE_BUDGET
        for plan in plans:
            inline.append(plan.size <= min(self.inline_threshold, budget))
            budget -= plan.size if inline[-1] else 0
        big = [p.size for p, small in zip(plans, inline) if not small]
        offsets: list[int] = []
        try:  # from before the alloc: no interrupt point between its reply and the try
            if big:
                reply, _ = self.conn.request(
                    {"op": "alloc", "sizes": big, "timeout": remaining(deadline), "asked": timeout},
                    on_interrupt=self._free_granted,
                )
                offsets = reply["offsets"]
            payload = bytearray(INLINE_BUDGET - budget)
            inline_view = memoryview(payload)
            parts: list[dict[str, Any]] = []
            pos, arena_offsets = 0, iter(offsets)
            for s, plan, small in zip(serialized, plans, inline):
                if small:
                    write_blob(inline_view[pos : pos + plan.size], plan, s.header, s.buffers)
                    parts.append({"inline": [pos, plan.size]})
                    pos += plan.size
                else:
                    offset = next(arena_offsets)
                    write_blob(self.arena.view(offset, plan.size), plan, s.header, s.buffers)
                    parts.append({"offset": offset, "size": plan.size})
        except BaseException:
            if offsets and not self.conn.closed:
                self.conn.request({"op": "free", "offsets": offsets})
            raise
        return parts, payload

    def _free_granted(self, reply: dict[str, Any], data: memoryview) -> None:
        """Free the blocks of an alloc whose caller was interrupted as they came."""
        offsets = list(reply.get("offsets", []))
        if offsets:
            self.conn.post({"op": "free", "offsets": offsets}, quiet=True)

    def unpack(self, item: dict[str, Any], data: memoryview) -> Any:
        """The DataSystem object a get's reply names, read-only whatever its size (others
        may get it too); arena data is viewed, not copied."""
        if "offset" not in item:
            header, buffers = read_blob(memoryview(data).toreadonly())
            return deserialize(header, buffers)
        base = item.get("_base")
        if base is None:
            base = self.view(item)
        header, buffers = read_blob(memoryview(base))
        return deserialize(header, buffers)

    def view(self, item: dict[str, Any]) -> Any:
        """The read-only array viewing an arena item's block, with this process's hold on
        it, released when the array goes (a finalizer). Made as the reply arrives, on the
        connection's reader thread, and kept in the item (``_base``): no interrupt can come
        between counting the hold and arming its release."""
        base = self.arena.array(int(item["offset"]), int(item["size"]))
        base.flags.writeable = False  # others read the same memory
        self.conn.hold()
        # Not weakref.finalize: its callback is Python, and an interrupt at its first
        # instruction would lose the release (views.py queues the death in C first).
        views.watch(self.releases, item["key"], base)
        return base
