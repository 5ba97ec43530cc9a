"""The views this process holds of received objects, each counted in its claim-log entry
(queue/log.py: an acknowledged object's block is kept until its last view is gone), and
of DataSystem objects, each a hold of the process's connection (``watch``).

A view's base array carries two weak references. The first to be called back (CPython
calls them newest first) is ``_dead.append`` -- C, not Python, so nothing can cut it: it
queues the view. The second runs ``drain``, which drops the counts of the queued views at
once. A Python callback's first instruction is an interrupt check point, and a
KeyboardInterrupt raised there is swallowed ("unraisable"): had the drop been there, it
would be lost for good. Here the view is queued already, and whatever ``drain`` left
undone is done by the next: at every call of a receiver of this process, and every
``DRAIN_INTERVAL`` by a daemon thread (for a process that stopped receiving). ``drain``
is interrupt-safe by its order of steps: a view's ``done`` flag is set in the same step
as its count drops (no check point between the store and the native call), and the view
leaves the tables only after that, so a drain cut short is finished by the next without
dropping twice.
"""

from __future__ import annotations

import _thread
import collections
import os
import threading
import time
import weakref
from typing import Any, Protocol

from ..queue.log import VIEW, ClaimLog

#: Seconds between the daemon thread's looks at dropped views.
DRAIN_INTERVAL = 0.05

#: Live views: id of the queuing weak reference -> (it, the draining one, log, entry, [done]).
_views: dict[int, tuple[weakref.ref[Any], weakref.ref[Any], Owner, Any, list[bool]]] = {}
#: Weak references whose view is gone, oldest first, for ``drain``.
_dead: collections.deque[weakref.ref[Any]] = collections.deque()
_lock = threading.RLock()  # one drain at a time; re-entered by a signal handler's call
_drainer = False  # the daemon thread runs (in this process: see _forked)


def _forked() -> None:
    # A child's copies of the parent's arrays must not lower the parent's counts, and the
    # parent's drainer thread did not come along.
    global _drainer, _lock
    _views.clear()
    _dead.clear()
    _drainer = False
    _lock = threading.RLock()  # the parent's drainer may have held it as the fork came


os.register_at_fork(after_in_child=_forked)


class Owner(Protocol):
    def drop_view(self, entry: Any, done: list[bool]) -> None:
        """The view of ``entry`` is gone: drop it once, setting ``done[0]`` in the step
        that counts (a drain cut short after it does not drop it again)."""


def count(log: ClaimLog, entry: int, base: Any) -> None:
    """Count a view of ``entry``'s memory whose last array is ``base``. The count and the
    drop to come are made both or neither: the view is registered before the native add,
    with no check point between them (no Python call: a review found one, and an
    interrupt there dropped a count never added -- the block reused under a live array)."""
    _drain_in_time()
    at = log.state_at(entry)
    now = weakref.ref(base, _drain_now)  # made first: called back second
    ref = weakref.ref(base, _dead.append)
    _views[id(ref)] = (ref, now, log, entry, [False])
    log.region.add(at, VIEW)


def watch(owner: Owner, entry: Any, base: Any) -> None:
    """Have ``owner.drop_view(entry, done)`` called once ``base`` is gone: by ``drain``, at
    once or later (a DataSystem get's hold, released by the connection: arena_client.py)."""
    _drain_in_time()
    now = weakref.ref(base, _drain_now)  # made first: called back second
    ref = weakref.ref(base, _dead.append)
    _views[id(ref)] = (ref, now, owner, entry, [False])


def live(owner: Owner) -> bool:
    """Whether a view ``owner`` watches is not dropped yet."""
    return any(found[2] is owner and not found[4][0] for found in list(_views.values()))


def _drain_in_time() -> None:
    global _drainer
    if not _drainer:
        _drainer = True
        _thread.start_new_thread(_drain_forever, ())  # one C call (see aio.Worker)


def _drain_now(_: Any) -> None:
    drain()


def drain() -> None:
    """Drop the counts of the views that are gone (cheap when there are none)."""
    if not _dead:
        return
    with _lock:
        while _dead:
            ref = _dead[0]
            found = _views.get(id(ref))
            if found is not None:
                _, _, log, entry, done = found
                if not done[0]:
                    log.drop_view(entry, done)
                _views.pop(id(ref), None)
            if _dead and _dead[0] is ref:  # (a nested drain may have taken it meanwhile)
                _dead.popleft()


def _drain_forever() -> None:
    while True:
        time.sleep(DRAIN_INTERVAL)
        if _dead:
            try:
                drain()
            except Exception:  # noqa: BLE001 -- shared memory gone (process exiting): nothing to drop
                pass

