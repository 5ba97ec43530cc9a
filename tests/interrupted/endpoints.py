"""The other calls interrupted at random: get_queue, the DataSender and DataReceiver
constructors, DataSystem.put and get, and close(); each loop then checks the endpoints (or
the store) are still right and counts the connections it left."""

from __future__ import annotations

import gc
import random
import time
from typing import Any, Callable

import numpy as np

from shmchannel import ChannelClosed, ChannelTimeout, DataReceiver, DataSender, DataSystem, EndpointClosed

from ..conftest import ADDRESS
from .common import ARENA, MEDIUM, SECONDS, SMALL, close_all, connections_left, error_text, seq_of
from .interrupts import Interrupts


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
        errors.append(f"get_queue raised {error_text(exc)}")
    finally:
        interrupts.stop()
    try:  # both ends still in step: every object in order, then one more, then the end
        got = [seq_of(receiver.recv(timeout=10), (SMALL, MEDIUM)) for _ in range(20)]
        if got != [(i, None) for i in range(20)]:
            errors.append(f"after the interrupted looks, recv returned {got}")
        sender.send(np.full(SMALL, 20), timeout=10)
        if (last := seq_of(receiver.recv(timeout=10), (SMALL,))) != (20, None):
            errors.append(f"a send after the interrupted looks arrived as {last}")
        sender.close()
        try:
            receiver.recv(timeout=10)
            errors.append("recv after the sender's close() returned an object")
        except ChannelClosed:
            pass
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"using the endpoints after the interrupted looks raised {error_text(exc)}")
    errors += close_all(receiver, sender)
    return {"calls": calls, "interrupted": interrupted, "errors": errors, "connections": connections_left(),
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
        errors.append(f"DataSender #{i} (or its send/close) raised {error_text(exc)}")
    finally:
        interrupts.stop()
    gc.collect()
    for i in made:
        try:
            with DataReceiver(ADDRESS, dataset_name=f"{name}-{i}", wait=5) as receiver:
                if (seq := seq_of(receiver.recv(timeout=5), (SMALL,))) != (i, None):
                    errors.append(f"channel {name}-{i} held {seq}")
                try:
                    receiver.recv(timeout=5)
                    errors.append(f"channel {name}-{i} held a second object")
                except ChannelClosed:
                    pass
        except Exception as exc:  # noqa: BLE001 -- reported
            errors.append(f"reading channel {name}-{i} raised {error_text(exc)}")
    return {"made": len(made), "interrupted": interrupted, "errors": errors[:20],
            "connections": connections_left(), **interrupts.counts()}


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
            seq = seq_of(receiver.recv(timeout=10), (SMALL, MEDIUM))
            receiver.close()
            if seq != (made, None):
                errors.append(f"receiver #{made} got {seq}, expected seq {made}")
            made += 1
        last = DataReceiver(ADDRESS, dataset_name=name, wait=5)  # before the close: a drained channel
        sender.close()                                            # goes once nobody is attached
        with last:
            try:
                errors.append(f"after the last object the channel still held {seq_of(last.recv(timeout=5), (SMALL, MEDIUM))}")
            except ChannelClosed:
                pass
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"receiver #{made} (or its recv/close) raised {error_text(exc)}")
    finally:
        interrupts.stop()
    errors += close_all(sender)
    return {"made": made, "interrupted": interrupted, "errors": errors, "connections": connections_left(),
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
                seq = seq_of(ds.get(key), (size,))
            else:
                key = ds.put(np.full(size, done), timeout=10)
                while True:
                    try:
                        seq = seq_of(interrupts.call(ds.get, key), (size,))
                        break
                    except KeyboardInterrupt:
                        interrupted += 1
            if seq != (done, None):
                errors.append(f"get of object #{done} returned {seq}")
            ds.delete(key)
            done += 1
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"put/get/delete of object #{done} raised {error_text(exc)}")
    finally:
        interrupts.stop()
    gc.collect()
    stats = ds.stats()
    errors += close_all(ds)
    return {"done": done, "interrupted": interrupted, "errors": errors, "objects": stats.objects, "used": stats.used,
            "connections": connections_left(), **interrupts.counts()}


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
            first = [seq_of(receiver.recv(timeout=10), sizes)[0] for _ in range(j)]
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
                        rest.append(seq_of(again.recv(timeout=5), sizes)[0])
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
        errors.append(f"round {rounds} raised {error_text(exc)}")
    finally:
        interrupts.stop()
    return {"rounds": rounds, "interrupted": interrupted, "errors": errors, "connections": connections_left(),
            **interrupts.counts()}
