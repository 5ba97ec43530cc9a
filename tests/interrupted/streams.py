"""Loops on one channel: sends and recvs (and peeks) interrupted at random and called again,
and a signal handler that sends on the sender its main thread is busy sending on."""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time
from typing import Any

import numpy as np

from shmchannel import ChannelClosed, DataReceiver, DataSender, ReentrantCall

from ..conftest import ADDRESS
from .common import SECONDS, close_all, error_text, seq_of
from .interrupts import Interrupts


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
        error = f"send of seq {seq} raised {error_text(exc)}"
    finally:
        interrupts.stop()
    return {"sent": seq, "interrupted": interrupted, "error": error, "close_errors": close_all(sender),
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
            seq, problem = seq_of(obj, sizes)
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
        errors.append(f"recv after {len(got)} objects raised {error_text(exc)}")
    finally:
        interrupts.stop()
    errors += close_all(receiver)
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
            peeked, problem = seq_of(head, sizes)
            del head
            if problem is not None:
                corrupt.append(f"peek: {problem}")
            while True:
                try:
                    obj = interrupts.call(receiver.recv, timeout=30)
                    break
                except KeyboardInterrupt:
                    interrupted = True
            seq, problem = seq_of(obj, sizes)
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
        errors.append(f"peek/recv after {len(got)} objects raised {error_text(exc)}")
    finally:
        interrupts.stop()
    errors += close_all(receiver)
    return {"got": got, "after": after, "corrupt": corrupt, "errors": errors, **interrupts.counts()}


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
            errors.append(f"the reader raised {error_text(exc)}")

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
            errors.append(f"the handler's send #{j} raised {error_text(exc)} after {time.monotonic() - start:.3f} s")
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
        errors.append(f"the main thread's send #{main_sent} raised {error_text(exc)}")
    finally:
        stopping = True
        signal.setitimer(signal.ITIMER_REAL, 0)
    errors += close_all(sender)
    reader.join(30)
    if reader.is_alive():
        errors.append("the reader did not see the end of the stream within 30 s")
    errors += close_all(receiver)
    return {"main_sent": main_sent, "alarm_sent": alarm_sent, "reentrant": reentrant, "got": got, "errors": errors}
