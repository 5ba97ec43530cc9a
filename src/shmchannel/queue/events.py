"""Event counts: how a queue's waiters sleep and are woken (queue/ring.py uses them).

A channel's ``data`` and ``space`` futex words are event counts: a waiter announces itself
in the word (``announce``), looks once more, and sleeps on the value it announced; a
publisher (a claimer, for ``space``) that finds a waiter announced starts a new epoch and
wakes them all (``notify``). So a change no one waits for costs one load, and a wake-up
costs one system call however many changes come before the woken run -- with a waiter
count instead, every change until then woke them again (measured: 1.5 wake calls per
object with 8 channels on 2 cores). Why this misses no wake-up is in DESIGN.md
(Ordering 3). Before it announces itself a waiter polls briefly (``spin``: Ordering 6).
"""

from __future__ import annotations

import time
from typing import Callable

from .. import config
from .._native import Region

#: Seconds an empty shard's claimer polls the data word before it sleeps on it. A futex
#: wake-up costs the sleeper tens of microseconds (measured: ``make bench``'s ``wake`` and
#: ``unloaded``) and the publisher a system call; an object that comes within this time is
#: taken at once, with neither. Short, so that an idle receiver costs nothing to speak of.
SPIN = config.spin_seconds()


def spin(probe: Callable[[], int], deadline: float | None) -> bool:
    """Poll ``probe()`` (a counter the awaited change moves) for up to SPIN seconds, not
    past ``deadline``; whether it moved."""
    if SPIN <= 0:
        return False
    clock = time.monotonic  # the clock of deadlines
    until = clock() + SPIN
    if deadline is not None and deadline < until:
        until = deadline
    start = probe()
    while probe() == start:
        if clock() >= until:
            return False
    return True


#: Bit 0 of an event-count futex word: a waiter announced itself (bits 1-31: the epoch).
WAITING = 1
EPOCH_MASK = 0xFFFFFFFE


def announce(region: Region, at: int) -> int:
    """Announce a waiter in the event count at ``at``; the value to sleep on. Any
    ``notify`` after this changes the word, so a sleep on the value returns at once."""
    state = region.load32(at)
    while not state & WAITING:
        found = region.cas32(at, state, state | WAITING)
        if found == state:
            break
        state = found
    return state | WAITING


def notify(region: Region, at: int) -> None:
    """After a change a waiter may wait for: if one announced itself, a new epoch (which
    clears the bit) and a wake-up of all; else nothing but this load."""
    state = region.load32(at)
    while state & WAITING:
        found = region.cas32(at, state, (state + 2) & EPOCH_MASK)
        if found == state:
            region.wake(at, -1)
            return
        state = found


def wake_all_of(region: Region, at: int) -> None:
    """A new epoch and a wake-up of all, waiter announced or not (a close, a withdrawal)."""
    state = region.load32(at)
    while True:
        found = region.cas32(at, state, (state + 2) & EPOCH_MASK)
        if found == state:
            region.wake(at, -1)
            return
        state = found
