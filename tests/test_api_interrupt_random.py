"""Interrupts at random instants, over many iterations: whatever a blocking call was doing
when a signal (or an asyncio cancel) hit it, nothing sent is lost or corrupted, nothing
arrives twice beyond what at-least-once allows, the endpoint stays usable, nothing leaks
(store empty, no connection left, no ResourceWarning) and nothing hangs.

Each interrupted loop runs in a child interpreter (``sys.executable -c``), so no SIGINT
reaches pytest; it is killed (after dumping its stacks) if it outlives ``HANG``, and prints
a JSON summary as the last line of its stdout for the test to check. The instants and sizes
come from a seed named in every failure: ``SHMCHANNEL_TEST_SEED=<seed>`` replays it (as far
as timing allows).

In a child, the SIGINT (or SIGALRM) handler raises KeyboardInterrupt only while a call made
through ``Interrupts.call`` runs, only in a frame of that call (never in this file's own
bookkeeping) and at most once per call; a signal landing elsewhere is counted and dropped.
So every KeyboardInterrupt a loop sees came from inside the shmchannel call it retries, and
the loop's own state (which seq was sent, what was received) is exact -- as for a user whose
Ctrl-C lands in the library, which is what the library must survive.

Before the fix (the issue's report): a send interrupted mid-write left half a frame on the
socket, so receivers got arrays whose tail held the next frame's header JSON, the broker
then dropped the sender, and sends that had returned were never delivered.
"""

from __future__ import annotations

import asyncio
import collections
import faulthandler
import gc
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from shmchannel import (
    ChannelClosed, ChannelError, ChannelNotFound, ChannelTimeout, DataReceiver, DataSender, DataSystem, EndpointClosed,
    ReentrantCall,
)
from shmchannel.broker import daemon
from shmchannel.testing import broker_connections, wait_until

from .conftest import ADDRESS
from .test_api_threads import Background

HANG = 45.0  # seconds a child may run before it counts as hung (killed, the test fails)
SECONDS = 2.0  # how long each time-bound interrupted loop runs
SEED_ENV = "SHMCHANNEL_TEST_SEED"
ROOT = Path(__file__).resolve().parents[1]
CHILD = "from tests.test_api_interrupt_random import _child_main; _child_main()"
_THIS_FILE = (lambda: None).__code__.co_filename  # what frames of this module carry

# Sizes in int64 elements: 24 KB, 60 KB (inline by default), 160 KB, 600 KB, 2 MB (arena).
SMALL, INLINE, MEDIUM, LARGE_INLINE, ARENA = 3_000, 7_500, 20_000, 75_000, 250_000


# ============================================================================================
# Child side: the interrupted loops
# ============================================================================================


class Interrupts:
    """Signals at random instants, turned into KeyboardInterrupt inside ``call`` only.

    Sources: ``every()`` a thread sends the main thread ``signum`` every ``low..high`` s;
    ``timer()`` an interval timer (SIGALRM) re-armed at random from its handler;
    ``on_kick()`` one signal ``low..high`` s after each ``kick()``.
    """

    def __init__(self, seed: int, low: float, high: float, signum: int = signal.SIGINT) -> None:
        self._rng = random.Random(seed)
        self._low, self._high, self._signum = low, high, signum
        self._main = threading.get_ident()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self._timer = False
        self.armed = False
        self.raised = 0  # KeyboardInterrupts raised inside a call
        self.dropped = 0  # signals that landed outside one
        signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self._timer and not self._stop.is_set():
            signal.setitimer(signal.ITIMER_REAL, self._rng.uniform(self._low, self._high))
        if self.armed and frame is not None and frame.f_code.co_filename != _THIS_FILE:
            self.armed = False  # once per call: the call's own clean-up runs undisturbed
            self.raised += 1
            raise KeyboardInterrupt
        self.dropped += 1

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, which a signal may interrupt (KeyboardInterrupt)."""
        self.armed = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.armed = False

    def every(self) -> Interrupts:
        def run() -> None:
            while not self._stop.wait(self._rng.uniform(self._low, self._high)):
                signal.pthread_kill(self._main, self._signum)

        return self._start(run)

    def on_kick(self) -> Interrupts:
        def run() -> None:
            while self._kick.wait() and not self._stop.is_set():
                self._kick.clear()
                time.sleep(self._rng.uniform(self._low, self._high))
                signal.pthread_kill(self._main, self._signum)

        return self._start(run)

    def kick(self) -> None:
        self._kick.set()

    def timer(self) -> Interrupts:
        self._timer = True
        signal.setitimer(signal.ITIMER_REAL, self._rng.uniform(self._low, self._high))
        return self

    def _start(self, run: Callable[[], None]) -> Interrupts:
        self._thread = threading.Thread(target=run, name="interrupter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if self._thread is not None:
            self._thread.join(10)

    def counts(self) -> dict[str, int]:
        return {"raised": self.raised, "dropped": self.dropped}


def _seq_of(obj: Any, sizes: Any) -> tuple[int | None, str | None]:
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


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _close_all(*endpoints: Any) -> list[str]:
    errors = []
    for endpoint in endpoints:
        try:
            endpoint.close()
        except Exception as exc:  # noqa: BLE001 -- reported
            errors.append(f"close() of {endpoint!r} raised {_error(exc)}")
    return errors


def _connections_left(expected: int = 0) -> int:
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


def child_send(name: str, seed: int, sizes: list[int], inline_threshold: int | None, max_queue_size: int,
               low: float, high: float) -> dict[str, Any]:
    """Send ``np.full(n, seq)`` for SECONDS under interrupts; an interrupted send is retried
    with the same seq (the issue's loop)."""
    rng = random.Random(seed)
    sender = DataSender(ADDRESS, dataset_name=name, inline_threshold=inline_threshold, max_queue_size=max_queue_size)
    interrupts = Interrupts(seed, low, high).every()
    interrupted: list[int] = []  # the seq of each interrupted send
    seq, error = 0, None
    deadline = time.monotonic() + SECONDS
    obj = np.full(rng.choice(sizes), seq)
    try:
        while time.monotonic() < deadline:
            try:
                interrupts.call(sender.send, obj, timeout=30)
            except KeyboardInterrupt:
                interrupted.append(seq)
                continue
            seq += 1
            obj = np.full(rng.choice(sizes), seq)
    except Exception as exc:  # noqa: BLE001 -- reported
        error = f"send of seq {seq} raised {_error(exc)}"
    finally:
        interrupts.stop()
    return {"sent": seq, "interrupted": interrupted, "error": error, "close_errors": _close_all(sender),
            **interrupts.counts()}


def child_recv(name: str, seed: int, sizes: list[int], prefetch: int | None, mode: str,
               low: float, high: float) -> dict[str, Any]:
    """Receive until the end of the stream under interrupts (after every 10th object, or at
    random instants of an interval timer); an interrupted recv is simply called again."""
    receiver = DataReceiver(ADDRESS, dataset_name=name, wait=30, **({} if prefetch is None else {"prefetch": prefetch}))
    interrupts = Interrupts(seed, low, high, signal.SIGINT if mode == "every10" else signal.SIGALRM)
    interrupts.on_kick() if mode == "every10" else interrupts.timer()
    got: list[int] = []
    after: list[bool] = []  # whether an interrupted recv came just before each object
    corrupt: list[str] = []
    errors: list[str] = []
    interrupted = False
    try:
        while len(corrupt) < 10:
            try:
                obj = interrupts.call(receiver.recv, timeout=30)
            except KeyboardInterrupt:
                interrupted = True
                continue
            except ChannelClosed:
                break
            seq, problem = _seq_of(obj, sizes)
            del obj
            if problem is not None:
                corrupt.append(f"object {len(got) + len(corrupt)}: {problem}")
                continue
            got.append(seq)  # type: ignore[arg-type]
            after.append(interrupted)
            interrupted = False
            if mode == "every10" and len(got) % 10 == 0:
                interrupts.kick()
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"recv after {len(got)} objects raised {_error(exc)}")
    finally:
        interrupts.stop()
    errors += _close_all(receiver)
    return {"got": got, "after": after, "corrupt": corrupt, "errors": errors, **interrupts.counts()}


def child_peek(name: str, seed: int, sizes: list[int], low: float, high: float) -> dict[str, Any]:
    """peek, then recv, each interrupted at random and called again; what peek showed must be
    what recv then returns."""
    receiver = DataReceiver(ADDRESS, dataset_name=name, wait=30)
    interrupts = Interrupts(seed, low, high).every()
    got: list[int] = []
    after: list[bool] = []
    corrupt: list[str] = []
    errors: list[str] = []
    interrupted = False
    try:
        while len(corrupt) + len(errors) < 10:
            try:
                head = interrupts.call(receiver.peek, timeout=30)
            except KeyboardInterrupt:
                interrupted = True
                continue
            except ChannelClosed:
                break
            peeked, problem = _seq_of(head, sizes)
            del head
            if problem is not None:
                corrupt.append(f"peek: {problem}")
            while True:
                try:
                    obj = interrupts.call(receiver.recv, timeout=30)
                    break
                except KeyboardInterrupt:
                    interrupted = True
            seq, problem = _seq_of(obj, sizes)
            del obj
            if problem is not None:
                corrupt.append(f"recv: {problem}")
                continue
            if seq != peeked:
                errors.append(f"peek showed seq {peeked}, the recv after it returned seq {seq}")
            got.append(seq)  # type: ignore[arg-type]
            after.append(interrupted)
            interrupted = False
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"peek/recv after {len(got)} objects raised {_error(exc)}")
    finally:
        interrupts.stop()
    errors += _close_all(receiver)
    return {"got": got, "after": after, "corrupt": corrupt, "errors": errors, **interrupts.counts()}


def child_get_queue(name: str, seed: int, low: float, high: float) -> dict[str, Any]:
    """get_queue of a sender and of a receiver, interrupted at random: each answer that comes
    is the queue's (which does not change), and afterwards both ends work in step."""
    rng = random.Random(seed)
    sender = DataSender(ADDRESS, dataset_name=name, max_queue_size=50)
    for i in range(20):
        sender.send(np.full(MEDIUM if i % 2 else SMALL, i))
    receiver = DataReceiver(ADDRESS, dataset_name=name, prefetch=1)
    keys = sender.get_queue(0)
    looks: list[tuple[str, Callable[[], Any], Any]] = [
        ("sender.get_queue(0)", lambda: sender.get_queue(0), keys),
        ("sender.get_queue()", lambda: sender.get_queue(), {0: keys}),
        ("receiver.get_queue(0)", lambda: receiver.get_queue(0), keys),
        ("receiver.get_queue()", lambda: receiver.get_queue(), {0: keys}),
    ]
    errors: list[str] = []
    calls = interrupted = 0
    interrupts = Interrupts(seed, low, high).every()
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline and len(errors) < 10:
            what, look, expected = rng.choice(looks)
            calls += 1
            try:
                answer = interrupts.call(look)
            except KeyboardInterrupt:
                interrupted += 1
                continue
            if answer != expected:
                errors.append(f"{what} answered {repr(answer)[:200]}, expected {repr(expected)[:200]}")
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"get_queue raised {_error(exc)}")
    finally:
        interrupts.stop()
    try:  # both ends still in step: every object in order, then one more, then the end
        got = [_seq_of(receiver.recv(timeout=10), (SMALL, MEDIUM)) for _ in range(20)]
        if got != [(i, None) for i in range(20)]:
            errors.append(f"after the interrupted looks, recv returned {got}")
        sender.send(np.full(SMALL, 20), timeout=10)
        if (last := _seq_of(receiver.recv(timeout=10), (SMALL,))) != (20, None):
            errors.append(f"a send after the interrupted looks arrived as {last}")
        sender.close()
        try:
            receiver.recv(timeout=10)
            errors.append("recv after the sender's close() returned an object")
        except ChannelClosed:
            pass
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"using the endpoints after the interrupted looks raised {_error(exc)}")
    errors += _close_all(receiver, sender)
    return {"calls": calls, "interrupted": interrupted, "errors": errors, "connections": _connections_left(),
            **interrupts.counts()}


def child_sender_ctor(name: str, seed: int, low: float, high: float) -> dict[str, Any]:
    """DataSender(...) interrupted at random (a fresh channel name each time); each one made
    sends its seq and closes; afterwards each of those channels holds its object, then ends."""
    interrupts = Interrupts(seed, low, high).every()
    made: list[int] = []
    errors: list[str] = []
    interrupted = 0
    i = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            try:
                sender = interrupts.call(DataSender, ADDRESS, dataset_name=f"{name}-{i}")
            except KeyboardInterrupt:
                interrupted += 1
                i += 1
                continue
            sender.send(np.full(SMALL, i), timeout=10)
            sender.close()
            made.append(i)
            i += 1
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"DataSender #{i} (or its send/close) raised {_error(exc)}")
    finally:
        interrupts.stop()
    gc.collect()
    for i in made:
        try:
            with DataReceiver(ADDRESS, dataset_name=f"{name}-{i}", wait=5) as receiver:
                if (seq := _seq_of(receiver.recv(timeout=5), (SMALL,))) != (i, None):
                    errors.append(f"channel {name}-{i} held {seq}")
                try:
                    receiver.recv(timeout=5)
                    errors.append(f"channel {name}-{i} held a second object")
                except ChannelClosed:
                    pass
        except Exception as exc:  # noqa: BLE001 -- reported
            errors.append(f"reading channel {name}-{i} raised {_error(exc)}")
    return {"made": len(made), "interrupted": interrupted, "errors": errors[:20],
            "connections": _connections_left(), **interrupts.counts()}


def child_receiver_ctor(name: str, seed: int, low: float, high: float) -> dict[str, Any]:
    """DataReceiver(...) interrupted at random, called again until it is made; each one made
    receives the one object just sent and closes: it must be that object."""
    rng = random.Random(seed)
    sender = DataSender(ADDRESS, dataset_name=name, max_queue_size=4)
    interrupts = Interrupts(seed, low, high).every()
    errors: list[str] = []
    interrupted = made = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline and len(errors) < 10:
            sender.send(np.full(rng.choice((SMALL, MEDIUM)), made), timeout=10)
            while True:
                try:
                    receiver = interrupts.call(DataReceiver, ADDRESS, dataset_name=name, wait=5,
                                               prefetch=rng.choice((1, 8)))
                    break
                except KeyboardInterrupt:
                    interrupted += 1
            seq = _seq_of(receiver.recv(timeout=10), (SMALL, MEDIUM))
            receiver.close()
            if seq != (made, None):
                errors.append(f"receiver #{made} got {seq}, expected seq {made}")
            made += 1
        last = DataReceiver(ADDRESS, dataset_name=name, wait=5)  # before the close: a drained channel
        sender.close()                                            # goes once nobody is attached
        with last:
            try:
                errors.append(f"after the last object the channel still held {_seq_of(last.recv(timeout=5), (SMALL, MEDIUM))}")
            except ChannelClosed:
                pass
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"receiver #{made} (or its recv/close) raised {_error(exc)}")
    finally:
        interrupts.stop()
    errors += _close_all(sender)
    return {"made": made, "interrupted": interrupted, "errors": errors, "connections": _connections_left(),
            **interrupts.counts()}


def child_data_system(seed: int, target: str, low: float, high: float) -> dict[str, Any]:
    """DataSystem.put and get, ``target`` of them interrupted at random (and called again, for
    get); every object read back whole, then deleted: the store must end empty."""
    rng = random.Random(seed)
    ds = DataSystem(ADDRESS)
    interrupts = Interrupts(seed, low, high).every()
    errors: list[str] = []
    interrupted = done = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline and len(errors) < 10:
            size = rng.choice((SMALL, MEDIUM, ARENA))
            if target == "put":
                try:
                    key = interrupts.call(ds.put, np.full(size, done), timeout=10)
                except KeyboardInterrupt:
                    interrupted += 1
                    continue
                seq = _seq_of(ds.get(key), (size,))
            else:
                key = ds.put(np.full(size, done), timeout=10)
                while True:
                    try:
                        seq = _seq_of(interrupts.call(ds.get, key), (size,))
                        break
                    except KeyboardInterrupt:
                        interrupted += 1
            if seq != (done, None):
                errors.append(f"get of object #{done} returned {seq}")
            ds.delete(key)
            done += 1
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"put/get/delete of object #{done} raised {_error(exc)}")
    finally:
        interrupts.stop()
    gc.collect()
    stats = ds.stats()
    errors += _close_all(ds)
    return {"done": done, "interrupted": interrupted, "errors": errors, "objects": stats.objects, "used": stats.used,
            "connections": _connections_left(), **interrupts.counts()}


def child_close(name: str, seed: int, low: float, high: float) -> dict[str, Any]:
    """A receiver's close() and then the sender's interrupted at random, each then called
    again; a receiver attached in between must get the rest of the objects, then the end of
    the stream (it is attached before the sender closes: a channel whose objects are all
    consumed goes once its sender and receivers have left)."""
    rng = random.Random(seed)
    interrupts = Interrupts(seed, low, high).every()
    errors: list[str] = []
    rounds = interrupted = 0
    deadline = time.monotonic() + SECONDS
    sizes = (SMALL, MEDIUM)
    try:
        while time.monotonic() < deadline and len(errors) < 10:
            channel = f"{name}-{rounds}"
            sender = DataSender(ADDRESS, dataset_name=channel, max_queue_size=8)
            k = rng.randint(1, 6)
            for s in range(k):
                sender.send(np.full(rng.choice(sizes), s), timeout=10)
            receiver = DataReceiver(ADDRESS, dataset_name=channel, prefetch=4)
            j = rng.randint(0, k)
            first = [_seq_of(receiver.recv(timeout=10), sizes)[0] for _ in range(j)]
            cut: dict[str, bool] = {}
            again = None
            for what, endpoint in (("receiver", receiver), ("sender", sender)):
                try:
                    interrupts.call(endpoint.close)
                    cut[what] = False
                except KeyboardInterrupt:
                    cut[what] = True
                    interrupted += 1
                endpoint.close()  # again: idempotent, and must not raise
                if not endpoint.closed:
                    errors.append(f"round {rounds}: {endpoint!r} is not closed after close()")
                if again is None:
                    again = DataReceiver(ADDRESS, dataset_name=channel, wait=5)
            try:
                sender.send(np.full(SMALL, 99))
                errors.append(f"round {rounds}: send after close() worked")
            except EndpointClosed:
                pass
            rest: list[Any] = []
            assert again is not None
            with again:
                while True:
                    try:
                        rest.append(_seq_of(again.recv(timeout=5), sizes)[0])
                    except ChannelClosed:
                        break
                    except ChannelTimeout:
                        errors.append(f"round {rounds}: no end of stream after an {'interrupted ' if cut['sender'] else ''}"
                                      f"sender close() (received {rest} of {k} after {first})")
                        break
            # The last object the first receiver got comes again if its close was cut before
            # it acknowledged it (at-least-once): once, anywhere among the rest.
            again_once = list(rest)
            if cut["receiver"] and j and again_once.count(j - 1) == 1:
                again_once.remove(j - 1)
            if first != list(range(j)) or again_once != list(range(j, k)):
                errors.append(f"round {rounds} ({k} sent, close interrupted: {cut}): the first receiver got "
                              f"{first}, the next {rest}; expected {list(range(j))} then {list(range(j, k))}"
                              f"{f' (and {j - 1} again)' if cut['receiver'] and j else ''}")
            rounds += 1
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"round {rounds} raised {_error(exc)}")
    finally:
        interrupts.stop()
    return {"rounds": rounds, "interrupted": interrupted, "errors": errors, "connections": _connections_left(),
            **interrupts.counts()}


async def _cancel_at_random(task: asyncio.Future[Any], rng: random.Random) -> None:
    """Let ``task`` start, then cancel it at once, or after up to 0.3 ms or 2 ms."""
    await asyncio.sleep(0)
    delay = rng.choice((0.0, rng.uniform(0, 0.0003), rng.uniform(0, 0.002)))
    if delay:
        await asyncio.sleep(delay)
    task.cancel()


def child_arecv(name: str, seed: int, sizes: list[int], prefetch: int | None) -> dict[str, Any]:
    """arecv cancelled at a random instant (sometimes a plain recv instead), until the end of
    the stream."""
    rng = random.Random(seed)

    async def main() -> dict[str, Any]:
        receiver = DataReceiver(ADDRESS, dataset_name=name, wait=30,
                                **({} if prefetch is None else {"prefetch": prefetch}))
        got: list[int] = []
        corrupt: list[str] = []
        errors: list[str] = []
        cancelled = 0
        try:
            while len(corrupt) < 10:
                try:
                    if rng.random() < 0.8:
                        task = asyncio.ensure_future(receiver.arecv(timeout=30))
                        await _cancel_at_random(task, rng)
                        try:
                            obj = await task
                        except asyncio.CancelledError:
                            cancelled += 1
                            continue
                    else:
                        obj = receiver.recv(timeout=30)
                except ChannelClosed:
                    break
                seq, problem = _seq_of(obj, sizes)
                del obj
                if problem is not None:
                    corrupt.append(problem)
                else:
                    got.append(seq)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 -- reported
            errors.append(f"arecv/recv after {len(got)} objects raised {_error(exc)}")
        errors += _close_all(receiver)
        return {"got": got, "corrupt": corrupt, "errors": errors, "cancelled": cancelled}

    return asyncio.run(main())


def child_asend(name: str, seed: int, sizes: list[int]) -> dict[str, Any]:
    """asend cancelled at a random instant for SECONDS; each cancelled one is still sent (as
    documented), so no seq is sent twice."""
    rng = random.Random(seed)

    async def main() -> dict[str, Any]:
        sender = DataSender(ADDRESS, dataset_name=name, max_queue_size=4)
        cancelled = seq = 0
        error = None
        deadline = time.monotonic() + SECONDS
        try:
            while time.monotonic() < deadline:
                task = asyncio.ensure_future(sender.asend(np.full(rng.choice(sizes), seq), timeout=30))
                await _cancel_at_random(task, rng)  # it started: the object was handed over
                seq += 1
                try:
                    await task
                except asyncio.CancelledError:
                    cancelled += 1
        except Exception as exc:  # noqa: BLE001 -- reported
            error = f"asend of seq {seq} raised {_error(exc)}"
        return {"sent": seq, "interrupted": [], "cancelled": cancelled, "error": error,
                "close_errors": _close_all(sender)}

    return asyncio.run(main())


def child_handler_sends(name: str, seed: int, low: float, high: float) -> dict[str, Any]:
    """The main thread sends in a loop (max_queue_size=4), a thread receives, and a SIGALRM
    handler at random instants sends on the same sender: it works, or raises ReentrantCall at
    once."""
    rng = random.Random(seed)
    sender = DataSender(ADDRESS, dataset_name=name, max_queue_size=4)
    receiver = DataReceiver(ADDRESS, dataset_name=name, wait=10)
    got: list[Any] = []
    errors: list[str] = []

    def read() -> None:
        try:
            got.extend(list(obj) for obj in receiver)
        except Exception as exc:  # noqa: BLE001 -- reported
            errors.append(f"the reader raised {_error(exc)}")

    reader = threading.Thread(target=read, name="reader", daemon=True)
    reader.start()
    alarm_sent: list[int] = []
    reentrant: list[float] = []
    calls = itertools.count()
    stopping = False

    def handler(signum: int, frame: Any) -> None:
        if stopping:
            return
        j = next(calls)
        start = time.monotonic()
        try:
            sender.send(("alarm", j), timeout=5)
            alarm_sent.append(j)
        except ReentrantCall:
            reentrant.append(time.monotonic() - start)
        except Exception as exc:  # noqa: BLE001 -- reported, not raised into the main thread's send
            errors.append(f"the handler's send #{j} raised {_error(exc)} after {time.monotonic() - start:.3f} s")
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(low, high))

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, rng.uniform(low, high))
    main_sent = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            sender.send(("main", main_sent), timeout=30)
            main_sent += 1
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"the main thread's send #{main_sent} raised {_error(exc)}")
    finally:
        stopping = True
        signal.setitimer(signal.ITIMER_REAL, 0)
    errors += _close_all(sender)
    reader.join(30)
    if reader.is_alive():
        errors.append("the reader did not see the end of the stream within 30 s")
    errors += _close_all(receiver)
    return {"main_sent": main_sent, "alarm_sent": alarm_sent, "reentrant": reentrant, "got": got, "errors": errors}


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    f.__name__[len("child_"):]: f
    for f in (child_send, child_recv, child_peek, child_get_queue, child_sender_ctor, child_receiver_ctor,
              child_data_system, child_close, child_arecv, child_asend, child_handler_sends)
}


def _child_main() -> None:
    """Entry point of a child: ``-c CHILD <scenario> <json params>``; prints the summary."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks before killing
    scenario, params = sys.argv[1], json.loads(sys.argv[2])
    unraisable: list[str] = []
    sys.unraisablehook = lambda u: unraisable.append(f"unraisable in {u.object!r}: {u.exc_type.__name__}: {u.exc_value}")
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        summary = SCENARIOS[scenario](**params)
        gc.collect()
    seen = collections.Counter(re.sub(r"fd=\d+", "fd=N", text) for text in
                               [f"{w.category.__name__}: {w.message}" for w in warned] + unraisable)
    summary["warnings"] = [f"{text} (x{n})" for text, n in seen.most_common(5)]
    print(json.dumps(summary), flush=True)


# ============================================================================================
# Parent side
# ============================================================================================


@pytest.fixture
def seed() -> int:
    """The seed of the random instants and sizes (``SHMCHANNEL_TEST_SEED`` replays one)."""
    value = int(os.environ.get(SEED_ENV) or random.randrange(1 << 32))
    print(f"seed {value}: replay with {SEED_ENV}={value}")
    return value


class Child:
    """A child interpreter running one scenario, its output in files (a full pipe never
    stalls it); ``summary()`` waits for it within HANG of its start."""

    def __init__(self, tmp_path: Path, scenario: str, seed: int, **params: Any) -> None:
        self.scenario, self.seed = scenario, seed
        self._out, self._err = tmp_path / f"{scenario}.out", tmp_path / f"{scenario}.err"
        self.deadline = time.monotonic() + HANG
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD, scenario, json.dumps({"seed": seed, **params})],
                                         cwd=ROOT, stdout=out, stderr=err)

    def where(self) -> str:
        return f"[{self.scenario}, seed {self.seed}: replay with {SEED_ENV}={self.seed}]"

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def stderr(self) -> str:
        return self._err.read_text()[-6000:]

    def summary(self) -> dict[str, Any]:
        try:
            self.proc.wait(max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack
            try:
                wait_until(lambda: "Current thread" in self.stderr(), 5, "the child's stacks")
            finally:
                self.proc.kill()
                self.proc.wait(10)
            raise AssertionError(
                f"{self.where()} hung: still running after {HANG} s, killed; its stacks:\n{self.stderr()}"
            ) from None
        assert self.proc.returncode == 0, f"{self.where()} exited with {self.proc.returncode}:\n{self.stderr()}"
        lines = self._out.read_text().splitlines()
        assert lines, f"{self.where()} printed no summary:\n{self.stderr()}"
        summary: dict[str, Any] = json.loads(lines[-1])
        return summary


def _open_receiver(child: Child, name: str) -> DataReceiver:
    """A receiver of the channel the child creates (as soon as it exists)."""
    while True:
        try:
            return DataReceiver(ADDRESS, dataset_name=name, wait=0.5)
        except ChannelNotFound:
            assert not child.exited(), f"{child.where()} exited before creating {name}:\n{child.stderr()}"
            assert time.monotonic() < child.deadline, f"{child.where()} did not create {name} within {HANG} s"


def _receive_all(child: Child, name: str, sizes: Any) -> tuple[list[int], list[str]]:
    """Everything the child sends, received here until the end of the stream: (the seqs,
    problems: corrupt objects, errors, no end of stream)."""
    got: list[int] = []
    problems: list[str] = []
    with _open_receiver(child, name) as receiver:
        quiet = 0  # timeouts in a row since the child exited
        while len(problems) < 10:
            try:
                obj = receiver.recv(timeout=1)
            except ChannelClosed:
                return got, problems
            except ChannelTimeout:
                quiet = quiet + 1 if child.exited() else 0
                if quiet >= 2:
                    problems.append(f"no end of stream: the sender exited, {len(got)} objects received")
                    break
                if time.monotonic() > child.deadline:
                    problems.append(f"no end of stream within {HANG} s, {len(got)} objects received")
                    break
                continue
            except ChannelError as exc:
                problems.append(f"recv after {len(got)} objects raised {_error(exc)}")
                break
            seq, problem = _seq_of(obj, sizes)
            del obj
            if problem is not None:
                problems.append(f"object {len(got)} received: {problem}")
            else:
                got.append(seq)  # type: ignore[arg-type]
    return got, problems


def _store_problems() -> list[str]:
    """What is left in the store once everything was received, deleted and closed."""
    with DataSystem(ADDRESS) as ds:
        try:
            wait_until(lambda: (s := ds.stats()).objects == 0 and s.used == 0, 10, "the store to empty")
        except AssertionError:
            stats = ds.stats()
            return [f"the store did not empty: {stats.objects} objects, {stats.used} bytes used"]
    return []


def _common_problems(summary: dict[str, Any]) -> list[str]:
    problems = [f"in the child: {w}" for w in summary.get("warnings", [])]
    if summary.get("connections"):
        problems.append(f"{summary['connections']} connections to the broker left open by the child")
    return problems


def _sends_problems(summary: dict[str, Any], got: list[int], exactly_once: bool = False) -> list[str]:
    """Every send that returned arrived, in order, whole; a seq arrives more than once only
    if its send was interrupted (once more per interrupt), or never with ``exactly_once``."""
    problems = [f"in the child: {e}" for e in [summary["error"], *summary["close_errors"]] if e]
    sent = summary["sent"]
    retries = collections.Counter(summary["interrupted"])
    missing = sorted(set(range(sent)) - set(got))
    if missing:
        problems.append(f"{len(missing)} of the {sent} sends that returned never arrived: seqs {missing[:12]}...")
    descents = [(i, got[i - 1], got[i]) for i in range(1, len(got)) if got[i] < got[i - 1]]
    if descents:
        problems.append(f"out of order: {len(descents)} times, first at object {descents[0][0]}: "
                        f"seq {descents[0][2]} after {descents[0][1]}")
    # The send in progress when the loop stopped (it failed, or was interrupted as time ran
    # out) may have gone through.
    limit = sent + (1 if summary["error"] or sent in retries else 0)
    strays = sorted({s for s in got if not 0 <= s < limit})
    if strays:
        problems.append(f"seqs never sent arrived: {strays[:12]}")
    extra = {s: n for s, n in collections.Counter(got).items() if n > 1 + (0 if exactly_once else retries[s])}
    if extra:
        problems.append(f"{len(extra)} seqs arrived more often than their sends were tried, e.g. "
                        f"{sorted(extra.items())[:8]} (seq: times; interrupted sends: "
                        f"{[(s, retries[s]) for s in sorted(extra)[:8]]})")
    return problems


def _recvs_problems(summary: dict[str, Any], count: int) -> list[str]:
    """Every object arrived, in order apart from redeliveries: a run going back to an earlier
    seq and on from there, only right after an interrupted call."""
    problems = [f"in the child: {c}" for c in summary["corrupt"]] + [f"in the child: {e}" for e in summary["errors"]]
    got, after = summary["got"], summary["after"]
    top, redelivered, disorder = -1, 0, 0
    for i, (s, interrupted) in enumerate(zip(got, after)):
        if s == top + 1 or (i and s == got[i - 1] + 1 and s <= top):
            pass  # the next new one, or the next of a redelivered run
        elif interrupted and 0 <= s <= top:
            pass  # a redelivered run starts after an interrupt
        else:
            disorder += 1
            if disorder == 1:
                problems.append(f"object {i} received is seq {s} after seq {got[i - 1] if i else None} "
                                f"(highest so far {top}, interrupted just before: {interrupted})")
        redelivered += s <= top
        top = max(top, s)
    if disorder > 1:
        problems.append(f"{disorder} objects in all came out of order")
    missing = sorted(set(range(count)) - set(got))
    if missing:
        problems.append(f"{len(missing)} of the {count} objects sent never arrived: seqs {missing[:12]}...")
    if redelivered:
        print(f"{redelivered} objects redelivered after interrupts")
    return problems


def _produce(sender: DataSender, count: int, sizes: tuple[int, ...], seed: int) -> None:
    """Send ``np.full(n, i)`` for i < count, n drawn from ``sizes``; then end the stream."""
    rng = random.Random(seed)
    for i in range(count):
        sender.send(np.full(rng.choice(sizes), i), timeout=30)
    sender.close()


def _receiving_child(tmp_path: Path, scenario: str, seed: int, name: str, count: int, sizes: tuple[int, ...],
                     **params: Any) -> tuple[Child, dict[str, Any]]:
    """Run a receiving child on channel ``name`` while a thread here sends ``count`` objects
    of ``sizes`` on it and then ends the stream; return the child and its summary."""
    sender = DataSender(ADDRESS, dataset_name=name)
    producer = Background(lambda: _produce(sender, count, sizes, seed), "producer")
    try:
        child = Child(tmp_path, scenario, seed, name=name, sizes=list(sizes), **params)
        summary = child.summary()
    finally:
        sender.close()  # ends a send stuck because the child stopped receiving
    try:
        producer.result(30)
    except ChannelError as exc:
        summary["errors"].append(f"the sender here raised {_error(exc)} (the child stopped receiving)")
    return child, summary


def _enough(problems: list[str], count: int, minimum: int, what: str) -> None:
    """Note a run that went well but proved little: fewer than ``minimum`` interrupts hit."""
    if not problems and count < minimum:
        problems.append(f"only {count} {what}: the test proved little")


def _assert_none(child: Child, summary: dict[str, Any], problems: list[str]) -> None:
    figures = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"{child.where()} {figures}")
    assert not problems, "\n".join([f"{child.where()} {figures}", *problems])


# ============================================================================================
# Tests
# ============================================================================================


@pytest.mark.parametrize(
    ("elements", "inline_threshold"),
    [(INLINE, None), (LARGE_INLINE, 1 << 20), (ARENA, None)],
    ids=["60KB-inline", "600KB-inline", "2MB-arena"],
)
def test_send_interrupted_by_sigint_every_10_to_20_ms_delivers_every_seq_whole(
    broker: int, tmp_path: Path, seed: int, elements: int, inline_threshold: int | None
) -> None:
    """The issue's loop: a send interrupted by SIGINT (every 10-20 ms) and retried with the
    same seq; every seq arrives whole and in order, twice only if its send was interrupted,
    and the stream ends."""
    child = Child(tmp_path, "send", seed, name="intr-send", sizes=[elements], inline_threshold=inline_threshold,
                  max_queue_size=10, low=0.010, high=0.020)
    got, problems = _receive_all(child, "intr-send", (elements,))
    summary = child.summary()
    problems += _sends_problems(summary, got) + _common_problems(summary) + _store_problems()
    _enough(problems, summary["raised"], 20, "interrupts landed in a send")
    _assert_none(child, summary, problems)


def test_send_on_a_full_queue_interrupted_at_random_delivers_every_seq_whole(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """Sends of mixed sizes (inline and arena) on a queue of 2, often waiting for room or for
    their arena block, interrupted every 1-5 ms: the same guarantees."""
    sizes = [100, INLINE, MEDIUM, ARENA]
    child = Child(tmp_path, "send", seed, name="intr-full", sizes=sizes, inline_threshold=None, max_queue_size=2,
                  low=0.001, high=0.005)
    got, problems = _receive_all(child, "intr-full", sizes)
    summary = child.summary()
    problems += _sends_problems(summary, got) + _common_problems(summary) + _store_problems()
    _enough(problems, summary["raised"], 50, "interrupts landed in a send")
    _assert_none(child, summary, problems)


@pytest.mark.parametrize("prefetch", [None, 1], ids=["prefetch-default", "prefetch-1"])
@pytest.mark.parametrize(
    ("mode", "sizes", "low", "high"),
    [("every10", (SMALL,), 0.0, 0.002), ("timer", (SMALL,), 0.001, 0.006), ("timer", (SMALL, MEDIUM, ARENA), 0.001, 0.006)],
    ids=["sigint-after-every-10th", "itimer-random", "itimer-random-arena"],
)
def test_recv_interrupted_and_called_again_gets_every_object_in_order(
    broker: int, tmp_path: Path, seed: int, mode: str, sizes: tuple[int, ...], low: float, high: float,
    prefetch: int | None,
) -> None:
    """2,000 objects received by a recv loop that a signal interrupts (after every 10th
    object, or at random instants) and that simply calls recv again: every object arrives,
    whole, in order apart from redeliveries right after an interrupt; the store ends empty;
    no call fails (no ``Cancelled``, no reply of another request)."""
    count = 2000 if sizes == (SMALL,) else 600
    child, summary = _receiving_child(tmp_path, "recv", seed, "intr-recv", count, sizes,
                                      prefetch=prefetch, mode=mode, low=low, high=high)
    problems = _recvs_problems(summary, count) + _common_problems(summary) + _store_problems()
    # A recv of a prefetched object takes a few microseconds: fewer interrupts land in 600.
    _enough(problems, summary["raised"], 30 if sizes == (SMALL,) else 15, "interrupts landed in a recv")
    _assert_none(child, summary, problems)


def test_peek_and_recv_interrupted_at_random_agree_and_lose_nothing(broker: int, tmp_path: Path, seed: int) -> None:
    """peek then recv, each interrupted at random and called again: recv returns what peek
    showed, every object arrives once in order, and the store ends empty (peeked arena
    objects included)."""
    count = 600
    child, summary = _receiving_child(tmp_path, "peek", seed, "intr-peek", count, (SMALL, MEDIUM),
                                      low=0.0005, high=0.004)
    problems = _recvs_problems(summary, count) + _common_problems(summary) + _store_problems()
    _enough(problems, summary["raised"], 30, "interrupts landed in a peek or recv")
    _assert_none(child, summary, problems)


def test_get_queue_interrupted_at_random_answers_right_and_stays_in_step(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """get_queue of a sender and a receiver interrupted at random: every answer is the
    queue's, and afterwards both ends send, receive and end the stream in step."""
    child = Child(tmp_path, "get_queue", seed, name="intr-look", low=0.0005, high=0.003)
    summary = child.summary()
    problems = summary["errors"] + _common_problems(summary) + _store_problems()
    _enough(problems, summary["raised"], 30, "interrupts landed in a get_queue")
    _assert_none(child, summary, problems)


def test_sender_constructor_interrupted_at_random_leaks_nothing(broker: int, tmp_path: Path, seed: int) -> None:
    """DataSender(...) interrupted at random: the ones made work, the interrupted ones leave
    no connection and no ResourceWarning behind."""
    child = Child(tmp_path, "sender_ctor", seed, name="intr-ctor", low=0.0005, high=0.004)
    summary = child.summary()
    problems = summary["errors"] + _common_problems(summary) + _store_problems()
    _enough(problems, summary["raised"], 30, "interrupts landed in a DataSender()")
    _assert_none(child, summary, problems)


def test_receiver_constructor_interrupted_at_random_leaks_and_takes_nothing(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """DataReceiver(...) interrupted at random and called again: the receiver made gets the
    object just sent (an interrupted one took nothing), nothing leaks."""
    child = Child(tmp_path, "receiver_ctor", seed, name="intr-rctor", low=0.0005, high=0.004)
    summary = child.summary()
    problems = summary["errors"] + _common_problems(summary) + _store_problems()
    _enough(problems, summary["raised"], 30, "interrupts landed in a DataReceiver()")
    _assert_none(child, summary, problems)


@pytest.mark.parametrize("target", ["put", "get"])
def test_data_system_call_interrupted_at_random_leaves_the_store_empty(
    broker: int, tmp_path: Path, seed: int, target: str
) -> None:
    """DataSystem.put (or get) of inline and arena objects interrupted at random: every object
    read back whole, and once each is deleted the store is empty (an interrupted put leaves
    no object nobody has the key of, an interrupted get no hold)."""
    child = Child(tmp_path, "data_system", seed, target=target, low=0.0005, high=0.004)
    summary = child.summary()
    problems = summary["errors"] + _common_problems(summary)
    if summary["objects"] or summary["used"]:
        problems.append(f"after deleting every key it got, the store holds {summary['objects']} objects, "
                        f"{summary['used']} bytes")
    problems += _store_problems()
    _enough(problems, summary["raised"], 30, f"interrupts landed in a {target}")
    _assert_none(child, summary, problems)


def test_close_interrupted_at_random_still_ends_the_stream_and_gives_back(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """A receiver's close() and the sender's close() interrupted at random, then called again:
    both are closed, prefetched objects went back (at most the last received one again), and
    the stream ends."""
    child = Child(tmp_path, "close", seed, name="intr-close", low=0.0005, high=0.003)
    summary = child.summary()
    problems = summary["errors"] + _common_problems(summary) + _store_problems()
    _enough(problems, summary["raised"], 20, "interrupts landed in a close()")
    _assert_none(child, summary, problems)


@pytest.mark.parametrize("prefetch", [None, 1], ids=["prefetch-default", "prefetch-1"])
def test_arecv_cancelled_at_random_loses_nothing(broker: int, tmp_path: Path, seed: int, prefetch: int | None) -> None:
    """arecv cancelled at random instants (mixed with plain recv): every object arrives
    exactly once, whole and in order, as the README promises; the store ends empty."""
    count = 800
    child, summary = _receiving_child(tmp_path, "arecv", seed, "intr-arecv", count, (SMALL, MEDIUM), prefetch=prefetch)
    summary["after"] = [False] * len(summary["got"])  # no redelivery allowed
    problems = _recvs_problems(summary, count) + _common_problems(summary) + _store_problems()
    _enough(problems, summary["cancelled"], 15, "arecv calls were cancelled")
    _assert_none(child, summary, problems)


def test_asend_cancelled_at_random_sends_each_object_once(broker: int, tmp_path: Path, seed: int) -> None:
    """asend cancelled at random instants: each object handed over is sent anyway (as
    documented), exactly once and in order; the store ends empty."""
    sizes = [SMALL, MEDIUM]
    child = Child(tmp_path, "asend", seed, name="intr-asend", sizes=sizes)
    got, problems = _receive_all(child, "intr-asend", sizes)
    summary = child.summary()
    problems += _sends_problems(summary, got, exactly_once=True) + _common_problems(summary) + _store_problems()
    _enough(problems, summary["cancelled"], 30, "asend calls were cancelled")
    _assert_none(child, summary, problems)


def test_signal_handler_sending_on_a_busy_sender_at_random_instants_never_hangs(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """The random-timing variant of tests/test_api_threads.py's re-entry tests: a SIGALRM
    handler every 10-30 ms sends on the sender the main thread sends on (queue of 4, a
    reader thread): each of its sends works or raises ReentrantCall at once; every send
    that returned arrives once, in its order."""
    child = Child(tmp_path, "handler_sends", seed, name="intr-reenter", low=0.010, high=0.030)
    summary = child.summary()
    problems = summary["errors"] + _common_problems(summary) + _store_problems()
    got = [tuple(x) for x in summary["got"]]
    mains = [i for who, i in got if who == "main"]
    alarms = [i for who, i in got if who == "alarm"]
    if mains != list(range(summary["main_sent"])):
        first = next((k for k, i in enumerate(mains) if i != k), len(mains))
        problems.append(f"the main thread's {summary['main_sent']} sends arrived as {len(mains)} objects, "
                        f"first difference at object {first}")
    if alarms != summary["alarm_sent"]:
        problems.append(f"the handler's sends {summary['alarm_sent'][:20]}... arrived as {alarms[:20]}...")
    slow = [t for t in summary["reentrant"] if t > 1.0]
    if slow:
        problems.append(f"ReentrantCall took up to {max(slow):.2f} s to come, not at once")
    _enough(problems, len(summary["alarm_sent"]) + len(summary["reentrant"]), 20, "handler calls")
    summary["alarm_sends"] = len(summary["alarm_sent"])
    summary["reentrant_calls"] = len(summary["reentrant"])
    _assert_none(child, summary, problems)

