"""Endpoints used from several threads (issue 11, item 1): a call that only looks answers
while another thread's call waits; calls that move objects take turns within their own
timeouts; a signal handler re-entering its own thread's endpoint fails at once.

Each waiting call of these tests runs on a thread joined with a timeout, so a hang fails
the test instead of stalling the suite.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from shmchannel import ChannelTimeout, DataReceiver, DataSender, DataSystem, EndpointClosed, ReentrantCall
from shmchannel.testing import wait_until

from .conftest import ADDRESS

WAIT = 20.0  # seconds a call that must answer may take on a loaded machine before the test fails


class Background:
    """``fn()`` on a daemon thread; ``result()`` joins it with a timeout and returns or raises
    what it did."""

    def __init__(self, fn: Callable[[], Any], name: str = "background") -> None:
        self._outcome: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._outcome.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            self._outcome.append((False, exc))

    def done(self) -> bool:
        return bool(self._outcome)

    def result(self, timeout: float = WAIT) -> Any:
        self._thread.join(timeout)
        assert self._outcome, f"{self._thread.name} did not return within {timeout} s"
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value


@pytest.fixture
def blocked_sender(address: str) -> Iterator[tuple[DataSender, list[int], Background]]:
    """The issue's input: a sender with max_queue_size=2 whose thread sends 5 small arrays,
    and is blocked in the third (no receiver yet); yields (sender, sent, that thread)."""
    sender = DataSender(address, dataset_name="threads", max_queue_size=2)
    sent: list[int] = []

    def produce() -> None:
        for i in range(5):
            sender.send(np.full(4, i))
            sent.append(i)

    producer = Background(produce, "producer")
    wait_until(lambda: len(sent) == 2 and sender._turn._lock.locked(), WAIT, "the third send to block")
    try:
        yield sender, sent, producer
    finally:
        sender.close()


def _drain(address: str, n: int) -> list[int]:
    with DataReceiver(address, dataset_name="threads", wait=WAIT) as receiver:
        return [int(receiver.recv(timeout=WAIT)[0]) for _ in range(n)]


def test_get_queue_answers_while_another_thread_is_blocked_in_send(
    address: str, blocked_sender: tuple[DataSender, list[int], Background]
) -> None:
    """get_queue from the main thread answers at once while the producer thread's send waits
    for room, and the producer's five objects then all arrive in order."""
    sender, sent, producer = blocked_sender
    look = Background(lambda: sender.get_queue(0), "get_queue")
    assert len(look.result()) == 2
    assert len(Background(sender.get_queue).result()[0]) == 2  # all shards, too
    assert (sender.num_shards, sender.max_queue_size, sender.closed) == (1, 2, False)  # properties
    assert not producer.done()
    assert _drain(address, 5) == [0, 1, 2, 3, 4]
    producer.result()


def test_get_queue_answers_while_another_thread_is_blocked_in_recv(address: str) -> None:
    """A receiver's get_queue answers while another thread's recv waits on the empty shard,
    and that recv then gets the object sent after."""
    with DataSender(address, dataset_name="threads") as sender, DataReceiver(address, dataset_name="threads") as receiver:
        waiting = Background(lambda: receiver.recv(timeout=WAIT), "recv")
        wait_until(lambda: receiver._turn._lock.locked(), WAIT, "recv to block")
        assert Background(lambda: receiver.get_queue(0)).result() == []
        sender.send(np.arange(3))
        np.testing.assert_array_equal(waiting.result(), np.arange(3))


def test_peek_blocked_in_one_thread_leaves_get_queue_answering(address: str) -> None:
    """A peek waiting in one thread does not hold up get_queue in another."""
    with DataSender(address, dataset_name="threads") as sender, DataReceiver(address, dataset_name="threads") as receiver:
        waiting = Background(lambda: receiver.peek(timeout=WAIT), "peek")
        wait_until(lambda: receiver._turn._lock.locked(), WAIT, "peek to block")
        assert Background(receiver.get_queue).result() == {0: []}
        sender.send([1, 2])
        assert waiting.result() == [1, 2]
        assert receiver.recv(timeout=WAIT) == [1, 2]


def test_send_waiting_its_turn_times_out_within_its_own_timeout(
    address: str, blocked_sender: tuple[DataSender, list[int], Background]
) -> None:
    """A second thread's send behind a blocked one raises TimeoutError after its own timeout
    and queues nothing; the first thread's objects all arrive."""
    sender, _, producer = blocked_sender
    second = Background(lambda: sender.send(np.full(4, 99), timeout=0.2), "second send")
    with pytest.raises(ChannelTimeout, match=r"^timed out after 0\.2 s waiting for another thread's call on this DataSender; nothing was done$"):
        second.result()
    assert _drain(address, 5) == [0, 1, 2, 3, 4]
    producer.result()
    assert sender.get_queue(0) == []  # the timed-out object was never queued


def test_sends_from_two_threads_all_arrive_each_in_its_order(address: str) -> None:
    """Two threads sending on one sender deliver every object once, each thread's in order."""
    with DataSender(address, dataset_name="threads", max_queue_size=4) as sender:
        threads = [Background(lambda t=t: [sender.send((t, i), timeout=WAIT) for i in range(40)], f"sender {t}") for t in (0, 1)]
        with DataReceiver(address, dataset_name="threads", wait=WAIT) as receiver:
            got = [receiver.recv(timeout=WAIT) for _ in range(80)]
        for thread in threads:
            thread.result()
    for t in (0, 1):
        assert [i for (who, i) in got if who == t] == list(range(40))


def test_recv_from_two_threads_hands_each_object_out_once(address: str) -> None:
    """Two threads receiving from one receiver (with prefetch) get every object exactly once."""
    with DataSender(address, dataset_name="threads", max_queue_size=200) as sender:
        for i in range(100):
            sender.send(i)
        with DataReceiver(address, dataset_name="threads") as receiver:
            readers = [Background(lambda: [receiver.recv(timeout=WAIT) for _ in range(50)], f"reader {t}") for t in (0, 1)]
            got = [x for reader in readers for x in reader.result()]
    assert sorted(got) == list(range(100))


def test_main_thread_recv_timing_out_after_another_threads_recv_puts_back_nothing(address: str) -> None:
    """Another thread's recv hands out object 0; the main thread's recv then times out and
    must not put 0 back (it never had it): the main thread's next recv gets 1, and each
    object is delivered once."""
    with DataSender(address, dataset_name="thread-then-timeout") as sender, DataReceiver(
        address, dataset_name="thread-then-timeout", prefetch=1
    ) as receiver:
        sender.send(0)
        assert Background(lambda: receiver.recv(timeout=WAIT), "reader").result() == 0
        with pytest.raises(ChannelTimeout):
            receiver.recv(timeout=0.05)
        sender.send(1)
        assert receiver.recv(timeout=WAIT) == 1
        assert sender.get_queue(0) == []


def test_close_from_another_thread_ends_a_blocked_send_and_the_stream(
    address: str, blocked_sender: tuple[DataSender, list[int], Background]
) -> None:
    """close() while another thread's send waits makes that send raise EndpointClosed and
    still ends the stream: receivers get what was queued, then the end."""
    sender, sent, producer = blocked_sender
    sender.close()
    with pytest.raises(EndpointClosed):
        producer.result()
    with DataReceiver(address, dataset_name="threads", wait=WAIT) as receiver:
        assert [int(x[0]) for x in receiver] == sent == [0, 1]


def test_delete_in_another_thread_frees_room_for_a_put_waiting_on_a_full_store(small_store: int) -> None:
    """A DataSystem put waiting for store memory is not held behind a delete from another
    thread that frees it (the delete would otherwise wait for the put: a deadlock)."""
    with DataSystem(ADDRESS) as ds:
        first = ds.put(np.zeros(3 << 20, np.uint8))
        waiting = Background(lambda: ds.put(np.ones(3 << 20, np.uint8), timeout=WAIT), "put")
        wait_until(lambda: ds.stats().used >= 3 << 20 and not waiting.done(), WAIT, "the second put to wait")
        assert Background(lambda: ds.delete(first)).result() is None
        second = waiting.result()
        assert int(ds.get(second)[0]) == 1
        ds.delete(second)


def _with_alarm(handler: Callable[[], None], call: Callable[[], Any]) -> Any:
    """Run ``call`` on the main thread while SIGALRM runs ``handler`` once, 0.3 s in."""
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: handler())
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        return call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("reentry", ["recv", "peek", "get_queue"])
def test_signal_handler_reentering_a_blocked_receiver_fails_at_once_or_works(address: str, reentry: str) -> None:
    """A SIGALRM handler calling the receiver its own thread waits in never hangs: recv and
    peek raise ReentrantCall at once, get_queue answers or raises it (the embedded backend
    cannot read the connection its own thread is reading); the interrupted recv goes on and
    gets its object intact."""
    outcome: list[Any] = []
    with DataSender(address, dataset_name="threads") as sender, DataReceiver(address, dataset_name="threads") as receiver:

        def handler() -> None:
            try:
                outcome.append(getattr(receiver, reentry)(*([0.1] if reentry != "get_queue" else [])))
            except ReentrantCall as exc:
                outcome.append(exc)
            threading.Thread(target=sender.send, args=(np.arange(5),), daemon=True).start()

        got = _with_alarm(handler, lambda: receiver.recv(timeout=WAIT))
    np.testing.assert_array_equal(got, np.arange(5))
    (seen,) = outcome
    if reentry == "get_queue" and not isinstance(seen, ReentrantCall):
        assert seen == {0: []}
    else:
        assert isinstance(seen, ReentrantCall) and "re-entered" in str(seen)


def test_signal_handler_reentering_a_blocked_sender_raises_at_once(address: str) -> None:
    """A SIGALRM handler sending on the sender its own thread is blocked in gets
    ReentrantCall at once; the interrupted send completes once there is room."""
    seen: list[BaseException] = []
    with DataSender(address, dataset_name="threads", max_queue_size=1) as sender:
        sender.send(0)
        with DataReceiver(address, dataset_name="threads") as receiver:

            def handler() -> None:
                try:
                    sender.send(99, timeout=0.1)
                except ReentrantCall as exc:
                    seen.append(exc)
                threading.Thread(target=receiver.recv, args=(WAIT,), daemon=True).start()

            _with_alarm(handler, lambda: sender.send(1, timeout=WAIT))
            assert receiver.recv(timeout=WAIT) == 1
    assert len(seen) == 1


def test_close_from_another_thread_ends_calls_waiting_for_the_turn(address: str) -> None:
    """close() ends a recv blocked at the broker and a recv waiting for its turn behind it
    (both EndpointClosed), also while a received zero-copy array keeps the connection open;
    an object sent after the close reaches neither."""
    with DataSender(address, dataset_name="threads") as sender:
        receiver = DataReceiver(address, dataset_name="threads")
        sender.send(np.zeros(100_000))  # through the arena: a view the user keeps
        held = receiver.recv(timeout=WAIT)
        first = Background(lambda: receiver.recv(timeout=WAIT), "blocked recv")
        wait_until(lambda: receiver._turn._lock.locked(), WAIT, "recv to block")
        second = Background(lambda: receiver.recv(timeout=WAIT), "recv waiting for its turn")
        receiver.close()
        for call in (first, second):
            with pytest.raises(EndpointClosed):
                call.result()
        sender.send(np.ones(3))
        assert held.sum() == 0
        del held
        with DataReceiver(address, dataset_name="threads") as again:
            np.testing.assert_array_equal(again.recv(timeout=WAIT), np.ones(3))


@pytest.mark.parametrize("attempt", range(3))
def test_close_racing_a_recv_of_prefetched_objects_delivers_each_object_once(address: str, attempt: int) -> None:
    """close() from one thread while another hands out prefetched objects: every object
    arrives once, at this receiver or the next (none twice, none lost)."""
    n = 300
    with DataSender(address, dataset_name="threads", max_queue_size=n) as sender:
        for i in range(n):
            sender.send(i)
        receiver = DataReceiver(address, dataset_name="threads", prefetch=8)
        got: list[int] = []

        def drain() -> None:
            while True:
                got.append(receiver.recv(timeout=WAIT))

        reader = Background(drain, "reader")
        wait_until(lambda: len(got) >= 40 + 37 * attempt, WAIT, "the reader to be under way")
        receiver.close()
        with pytest.raises(EndpointClosed):
            reader.result()
        # Attached before the stream ends: the channel outlives it even if the reader drained it all.
        again = DataReceiver(address, dataset_name="threads")
    with again:
        rest = list(again)
    assert sorted(got + rest) == list(range(n)), f"{len(got)} + {len(rest)} objects"


def test_key_over_the_name_bound_is_not_in_the_data_system(broker: int) -> None:
    """``key in ds`` with a key longer than any key is False (not a refused frame)."""
    with DataSystem(ADDRESS) as ds:
        assert ("k" * (2 << 20)) not in ds
        assert ds.stats().objects == 0
