"""What the interrupted loops share: object sizes, how long a loop runs, how a received
object is checked, how a loop reports errors, closes its endpoints and counts the
connections it left. The parent side checks with the same sizes, ``seq_of`` and
``error_text``; the exact-instant tests with ``in_futex_wait`` and ``store_left``."""

from __future__ import annotations

import gc
import threading
from typing import Any

import numpy as np

from shmchannel import DataSystem
from shmchannel.broker import daemon
from shmchannel.testing import broker_connections, wait_until

SECONDS = 2.0  # how long each time-bound interrupted loop runs

# Sizes in int64 elements: 24 KB, 60 KB (inline by default), 160 KB, 600 KB, 2 MB (arena).
SMALL, INLINE, MEDIUM, LARGE_INLINE, ARENA = 3_000, 7_500, 20_000, 75_000, 250_000


def in_futex_wait(thread: threading.Thread) -> bool:
    """Whether ``thread`` sleeps in the kernel on a futex (True if the kernel does not say)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/wchan") as f:
            wchan = f.read()
    except OSError:
        return True
    return wchan in ("", "0") or "futex" in wchan


def store_left(address: str) -> str | None:
    """What is wrong if the store of the broker at ``address`` does not empty within 10 s."""
    with DataSystem(address) as ds:
        try:
            wait_until(lambda: (s := ds.stats()).objects == 0 and s.used == 0, 10, "the store to empty")
        except AssertionError:
            return f"the store did not empty: {ds.stats()}"
    return None


def seq_of(obj: Any, sizes: Any) -> tuple[int | None, str | None]:
    """(seq, None) for ``np.full(n, seq)`` with ``n`` in ``sizes``; else (None, what is wrong),
    showing the bytes from the first wrong element on (a stray frame header shows there)."""
    if not isinstance(obj, np.ndarray) or obj.dtype != np.int64 or obj.ndim != 1 or len(obj) not in sizes:
        what = f"{type(obj).__name__} {getattr(obj, 'dtype', '')} {getattr(obj, 'shape', '')}"
        return None, f"not an int64 array of {sorted(sizes)} elements: {what} {repr(obj)[:80]}"
    value = int(obj[0])
    wrong = np.flatnonzero(obj != value)
    if wrong.size:
        tail = obj[int(wrong[0]):].tobytes()[:160]
        return None, f"array of seq {value} ({len(obj)} elements) differs from element {int(wrong[0])} on: {tail!r}"
    return value, None


def error_text(exc: BaseException) -> str:
    """``"<exception class>: <message>"``, as a summary reports it (and the traceback on
    the child's stderr, where a failing test shows it)."""
    import traceback

    traceback.print_exception(exc)
    return f"{type(exc).__name__}: {exc}"


def close_all(*endpoints: Any) -> list[str]:
    """Close each of ``endpoints``; what each close() raised, described."""
    errors = []
    for endpoint in endpoints:
        try:
            endpoint.close()
        except Exception as exc:  # noqa: BLE001 -- reported
            errors.append(f"close() of {endpoint!r} raised {error_text(exc)}")
    return errors


def connections_left(expected: int = 0) -> int:
    """How many connections the broker holds once ours have had time to go (``expected``)."""
    gc.collect()
    status = daemon.status()
    assert status is not None
    pid = int(status["pid"])
    try:
        wait_until(lambda: broker_connections(pid) == expected, 5, "connections to close")
    except AssertionError:
        pass
    return broker_connections(pid)
