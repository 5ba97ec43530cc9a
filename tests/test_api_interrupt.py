"""A blocking call interrupted by a signal leaves the connection usable and loses nothing."""

from __future__ import annotations

import signal
from typing import Any, Iterator

import numpy as np
import pytest

from shmchannel import DataReceiver, DataSender, DataSystem

from .conftest import ADDRESS


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
