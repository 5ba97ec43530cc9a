"""A blocking call interrupted by a signal leaves the connection usable and loses nothing."""

from __future__ import annotations

import signal
from typing import Any, Iterator

import numpy as np
import pytest

from shmchannel import DataReceiver, DataSender, DataSystem

from .conftest import ADDRESS
from .interrupted.common import in_futex_wait, store_left


class Interrupted(Exception):
    pass


@pytest.fixture
def alarm() -> Iterator[Any]:
    def raise_interrupted(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, raise_interrupted)
    yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_interrupted_recv_then_recv_gets_next_object(broker: int, alarm: Any) -> None:
    """A recv interrupted while waiting is cancelled at the broker; the next recv works."""
    with DataSender(ADDRESS, dataset_name="intr") as sender, DataReceiver(ADDRESS, dataset_name="intr") as receiver:
        alarm(0.2)
        with pytest.raises(Interrupted):
            receiver.recv(timeout=10)
        sender.send(np.arange(300_000))
        sender.send([1])
        np.testing.assert_array_equal(receiver.recv(timeout=10), np.arange(300_000))
        assert receiver.recv(timeout=10) == [1]


def test_interrupted_send_on_full_queue_enqueues_nothing(broker: int, alarm: Any) -> None:
    """A send interrupted while the queue is full queues nothing and frees its memory."""
    with DataSender(ADDRESS, dataset_name="intr2", max_queue_size=1) as sender, \
            DataReceiver(ADDRESS, dataset_name="intr2") as receiver:
        sender.send([0])
        alarm(0.2)
        with pytest.raises(Interrupted):
            sender.send(np.ones(1_000_000))
        assert len(sender.get_queue(0)) == 1
        with DataSystem(ADDRESS) as ds:  # its 8 MB block is free again: the one object in use is [0]
            assert ds.stats().objects == 1
        assert receiver.recv(timeout=10) == [0]
        sender.send([2])
        assert receiver.recv(timeout=10) == [2]


def test_close_from_another_thread_wakes_blocked_recv(broker: int) -> None:
    """close() in one thread ends a recv blocked in another with EndpointClosed."""
    import threading

    from shmchannel import EndpointClosed

    errors: list[BaseException] = []
    with DataSender(ADDRESS, dataset_name="intr3"):
        receiver = DataReceiver(ADDRESS, dataset_name="intr3")

        def wait() -> None:
            try:
                receiver.recv(timeout=30)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        from shmchannel.testing import wait_until

        wait_until(lambda: receiver._turn._lock.locked(), 10, "recv to block")
        receiver.close()
        thread.join(10)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], EndpointClosed)


# -- the last object's recv cut at each instant an interrupt can land (embedded backend) ----------


def _recv_path() -> dict[str, Any]:
    """The functions a recv of the embedded backend runs through to claim and hand out an
    object: an interrupt may land at any instant of each."""
    from shmchannel.backends.receiving import EmbeddedReceiver
    from shmchannel.channel.receiver import DataReceiver as Receiver
    from shmchannel.queue import events
    from shmchannel.queue.log import ClaimLog
    from shmchannel.queue.ring import Claimer

    return {"DataReceiver.recv": Receiver.recv, "DataReceiver._recv_main": Receiver._recv_main,
            "EmbeddedReceiver.fetch": EmbeddedReceiver.fetch, "EmbeddedReceiver._tidy": EmbeddedReceiver._tidy,
            "EmbeddedReceiver.hand_out": EmbeddedReceiver.hand_out, "Claimer.try_claim": Claimer.try_claim,
            "Claimer._take": Claimer._take, "Claimer._finish_claim": Claimer._finish_claim,
            "ClaimLog.claim_entry": ClaimLog.claim_entry, "notify": events.notify}


#: The functions that finish a claim an interrupt cut (the next recv runs them first).
REPAIR_PATH = ["EmbeddedReceiver._tidy", "Claimer.repair"]


def _nth(k: int) -> Any:
    """A predicate true the ``k``-th time it is asked (from 0): the ``k``-th instant."""
    import itertools

    asked = itertools.count()
    return lambda frame: next(asked) == k


def _interrupt() -> None:
    raise KeyboardInterrupt


def _slot_freed(frame: Any) -> bool:
    """In ``Claimer._finish_claim``, just after the claimed slot was made FREE."""
    from shmchannel.queue import layout

    claimer = frame.f_locals["self"]
    return bool(claimer.region.load(frame.f_locals["at"]) == layout.FREE)


def _last_object_cut(name: str, cuts: list[Any]) -> str | None:
    """Send one object on channel ``name`` and end the stream; recv it under ``cuts`` (one
    ``AtSignalPoint`` per recv call, each raising KeyboardInterrupt where it fires), calling
    recv again after each interrupt; then peek and recv must say the stream ended at once,
    and once all is closed the store must be empty. None, or what went wrong; "unfired" if
    the last cut never fired (its function has no more instants)."""
    from shmchannel import ChannelClosed
    from shmchannel.testing import wait_until

    with DataSender(ADDRESS, dataset_name=name) as sender:
        receiver = DataReceiver(ADDRESS, dataset_name=name)
        sender.send(np.arange(1000))
    got: list[Any] = []
    try:
        for point in cuts:
            try:
                got.append(point.run(receiver.recv, timeout=5))
                break
            except KeyboardInterrupt:
                pass
        if not cuts[-1].fired:
            return "unfired"
        while not got:
            got.append(receiver.recv(timeout=5))
        if len(got) != 1 or not np.array_equal(got[0], np.arange(1000)):
            return f"received {got}"
        del got
        for call in (receiver.peek, receiver.recv):
            try:
                obj = call(timeout=5)
                return f"after the last object, {call.__name__} returned {obj!r}"
            except ChannelClosed:
                pass
            except Exception as exc:  # noqa: BLE001 -- the failure
                return f"after the last object, {call.__name__} raised {type(exc).__name__}: {exc}"
    finally:
        receiver.close()
    return store_left(ADDRESS)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where", list(_recv_path()))
def test_last_recv_interrupted_at_any_instant_then_peek_sees_the_end(broker: int, where: str) -> None:
    """The last object's recv cut by a KeyboardInterrupt at each instant of ``where`` at
    which CPython can raise one (``AtSignalPoint``), then called again: it returns the
    object, once; the peek after it raises ChannelClosed at once; the store empties. (Cut
    right after the claimed slot was made FREE, the head stayed on the slot: the peek waited
    for an object that never came -- tests/test_api_interrupt_random.py's peek test hung.)"""
    from .test_loans_interrupt import AtSignalPoint

    code = _recv_path()[where].__code__
    for k in range(1000):
        problem = _last_object_cut(f"cut-{k}", [AtSignalPoint(code, _nth(k), _interrupt)])
        if problem == "unfired":
            break
        assert problem is None, f"interrupted at instant {k} of {where}: {problem}"
    assert k >= 1, f"no instant in {where}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where", REPAIR_PATH)
def test_recv_finishing_a_cut_claim_interrupted_at_any_instant_loses_nothing(broker: int, where: str) -> None:
    """The last object's recv cut right after its claimed slot was made FREE, and the recv
    called again -- which finishes that claim first -- cut at each instant of ``where``:
    the third recv returns the object, once; the peek after it raises ChannelClosed at
    once; the store empties."""
    from shmchannel.queue.ring import Claimer

    from .test_loans_interrupt import AtSignalPoint

    code = {"EmbeddedReceiver._tidy": _recv_path()["EmbeddedReceiver._tidy"],
            "Claimer.repair": Claimer.repair}[where].__code__
    for k in range(1000):
        first = AtSignalPoint(Claimer._finish_claim.__code__, _slot_freed, _interrupt)
        problem = _last_object_cut(f"recut-{k}", [first, AtSignalPoint(code, _nth(k), _interrupt)])
        assert first.fired, "set-up: the first recv was not cut after the slot was freed"
        if problem == "unfired":
            break
        assert problem is None, f"interrupted after the slot was freed, then at instant {k} of {where}: {problem}"
    assert k >= 2, f"only {k} instants in {where}"


# -- a wake-up of a receiver asleep for the stream, cut by an interrupt in the sender -------------


def _asleep_in_await(thread: Any) -> bool:
    """Whether ``thread`` sleeps in the futex wait of ``Queues._await`` (its innermost frame
    at that call, and the kernel says it waits on a futex)."""
    import inspect
    import sys

    from shmchannel.queue.ring import Queues

    lines, first = inspect.getsourcelines(Queues._await)
    wait_line = first + next(i for i, line in enumerate(lines) if "region.wait(" in line)
    frame = sys._current_frames().get(thread.ident)
    if frame is None or frame.f_code is not Queues._await.__code__ or frame.f_lineno != wait_line:
        return False
    return in_futex_wait(thread)


def _sleeping_recv(receiver: Any) -> tuple[Any, list[Any]]:
    """A thread asleep in ``receiver.recv(timeout=10)``; it appends (seconds it took, what it
    returned or raised)."""
    import threading
    import time

    from shmchannel.testing import wait_until

    out: list[Any] = []

    def run() -> None:
        start = time.monotonic()
        try:
            got: Any = receiver.recv(timeout=10)
        except Exception as exc:  # noqa: BLE001 -- what the test looks at
            got = exc
        out.append((time.monotonic() - start, got))

    thread = threading.Thread(target=run, name="sleeping-recv")
    thread.start()
    wait_until(lambda: _asleep_in_await(thread), 10, "the receiving thread to fall asleep")
    return thread, out


def _send_path() -> dict[str, Any]:
    from shmchannel.queue import events
    from shmchannel.queue.ring import Publisher

    return {"Publisher.try_publish": Publisher.try_publish, "notify": events.notify}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where", list(_send_path()))
def test_send_interrupted_at_any_instant_of_its_publish_wakes_the_receiver_asleep(broker: int, where: str) -> None:
    """A send cut by a KeyboardInterrupt at each instant of ``where`` (``AtSignalPoint``),
    and not tried again if it was published: a receiver asleep for the stream gets the
    object at once. (Cut between notify's new epoch and its wake-up, the receiver slept
    on: the next sends found no one announced and woke no one either.)"""
    from .test_loans_interrupt import AtSignalPoint

    code = _send_path()[where].__code__
    for k in range(1000):
        name = f"wake-{k}"
        with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
            thread, out = _sleeping_recv(receiver)
            point = AtSignalPoint(code, _nth(k), _interrupt)
            try:
                point.run(sender.send, [k], timeout=5)
            except KeyboardInterrupt:
                pass
            if not sender._endpoint._pub.committed(0):  # (private) cut before its commit: send it again
                sender.send([k], timeout=5)
            thread.join(15)
        assert out and out[0][1] == [k] and out[0][0] < 5, \
            f"interrupted at instant {k} of {where}: the receiver asleep got (seconds, object) {out}"
        if not point.fired:
            break
    assert k >= 1, f"no instant in {where}"
