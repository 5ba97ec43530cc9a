"""asyncio: ``arecv``, ``asend`` and ``async for`` wait without blocking the event loop, and
giving up on an await (timeout, cancel) loses no object. Also the defaults taken from the
environment (``SHMCHANNEL_ADDRESS``) and the library's logging."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Awaitable, Callable

import numpy as np
import pytest

from shmchannel import ChannelClosed, ChannelTimeout, DataReceiver, DataSender, DataSystem, InvalidArgument
from shmchannel.testing import join_ok, start_process, wait_until

from .conftest import ADDRESS

ASYNC_TIMEOUT = 30  # seconds any one asyncio test may run


def _run(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``main()`` on a fresh event loop, failing (not hanging) after ASYNC_TIMEOUT."""
    return asyncio.run(asyncio.wait_for(main(), ASYNC_TIMEOUT))


class Ticker:
    """Counts event-loop turns of 1 ms: a blocked loop does not count."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.001)
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def _send_range(address: str, name: str, count: int, delay: float) -> None:
    """Child: create the channel, wait ``delay`` seconds, then send arrays 0..count-1 (each
    full of its index)."""
    with DataSender(address, dataset_name=name, max_queue_size=4) as sender:
        time.sleep(delay)
        for i in range(count):
            sender.send(np.full(16, i, dtype=np.int64))


def test_async_for_receives_in_order_while_the_loop_runs(address: str) -> None:
    """A receiver iterated with ``async for`` gets every object of another process's sender,
    in order, and ends at the end of the stream; meanwhile the loop keeps turning."""
    name = f"aiter-{os.getpid()}"

    async def main() -> tuple[list[int], int]:
        child = start_process(_send_range, address, name, 40, 0.5)
        with DataReceiver(address, dataset_name=name, wait=30) as receiver, Ticker() as ticker:
            got = [int(obj[0]) async for obj in receiver]
            ticks = ticker.ticks
        join_ok(child, 30)
        return got, ticks

    got, ticks = _run(main)
    assert got == list(range(40))
    assert ticks >= 100, f"the loop turned only {ticks} times in the 0.5 s the receiver waited"


def test_arecv_timeout_raises_channel_timeout_without_blocking_the_loop(address: str) -> None:
    """``arecv(timeout=0.3)`` on an empty shard raises ChannelTimeout (a TimeoutError) naming the
    shard after about 0.3 s, during which the loop ran."""
    name = f"atimeout-{os.getpid()}"

    async def main() -> None:
        with DataSender(address, dataset_name=name), DataReceiver(address, dataset_name=name) as receiver:
            with Ticker() as ticker:
                start = time.monotonic()
                with pytest.raises(ChannelTimeout, match=f"recv timed out after 0.3 s: shard 0 of default/{name}"):
                    await receiver.arecv(timeout=0.3)
                waited = time.monotonic() - start
            assert 0.25 <= waited < 5
            assert ticker.ticks >= 60

    _run(main)


def test_cancelled_and_timed_out_arecv_lose_nothing(address: str) -> None:
    """After an arecv was cancelled and another timed out, the objects sent later come out of
    the next arecv and recv calls, all of them, in order."""
    name = f"acancel-{os.getpid()}"

    async def main() -> list[int]:
        with DataSender(address, dataset_name=name, max_queue_size=10) as sender, DataReceiver(
            address, dataset_name=name
        ) as receiver:
            task = asyncio.ensure_future(receiver.arecv())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(ChannelTimeout):
                await receiver.arecv(timeout=0.1)
            for i in range(6):
                await sender.asend(np.full(4, i))
            got = [int((await receiver.arecv(timeout=10))[0]) for _ in range(3)]
            got += [int(receiver.recv(timeout=10)[0]) for _ in range(3)]
            return got

    assert _run(main) == list(range(6))


def test_timed_out_arecv_object_goes_to_the_next_sync_recv(broker: int) -> None:
    """The object a timed-out arecv's recv gets later is what a plain recv returns next."""
    name = f"async-sync-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:

        async def give_up() -> None:
            with pytest.raises(ChannelTimeout):
                await receiver.arecv(timeout=0.05)

        _run(give_up)
        sender.send([1])
        sender.send([2])
        assert receiver.recv(timeout=10) == [1]
        assert receiver.peek(timeout=10) == [2]
        assert receiver.recv(timeout=10) == [2]


@pytest.mark.parametrize("ending", ["timeout", "end-of-stream"])
def test_sync_recv_failing_after_an_arecv_gives_back_nothing_it_did_not_hand_out(address: str, ending: str) -> None:
    """An arecv hands out object 0 on the receiver's worker thread; a plain recv then fails
    (timeout, or end of stream). That recv had handed out nothing, so it puts nothing back:
    0 is not delivered again, and nothing is left in the queue (before the fix: the failing
    recv put the worker's object back, so it came out twice, or stayed queued after close
    -- the store never emptied)."""
    name = f"async-then-fail-{ending}-{os.getpid()}"
    sender = DataSender(address, dataset_name=name)
    try:
        with DataReceiver(address, dataset_name=name, prefetch=1) as receiver:
            sender.send([0])

            async def first() -> Any:
                return await receiver.arecv(timeout=10)

            assert _run(first) == [0]
            if ending == "timeout":
                with pytest.raises(ChannelTimeout):
                    receiver.recv(timeout=0.05)
                sender.send([1])
                assert receiver.recv(timeout=10) == [1]
                assert sender.get_queue(0) == []
            else:
                sender.close()
                with pytest.raises(ChannelClosed):
                    receiver.recv(timeout=10)
        if ending == "timeout":
            assert sender.get_queue(0) == []
    finally:
        sender.close()
    if address == ADDRESS:
        with DataSystem(ADDRESS) as ds:
            wait_until(lambda: (s := ds.stats()).objects == 0 and s.used == 0, 10, "the store to empty")


def test_close_gives_back_what_an_abandoned_arecv_received(broker: int) -> None:
    """An object received by an arecv nobody awaits any more goes back to the head of the
    queue when the receiver closes: the next receiver of the shard gets it first."""
    name = f"agiveback-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender:
        receiver = DataReceiver(ADDRESS, dataset_name=name, prefetch=1)

        async def abandon() -> None:
            with pytest.raises(ChannelTimeout):
                await receiver.arecv(timeout=0.05)

        _run(abandon)
        sender.send([0])
        sender.send([1])
        wait_until(lambda: len(sender.get_queue(0)) == 1, 10, "the abandoned recv to take object 0")
        receiver.close()
        with DataReceiver(ADDRESS, dataset_name=name) as second:
            assert [second.recv(timeout=10), second.recv(timeout=10)] == [[0], [1]]


def test_concurrent_arecv_calls_get_distinct_objects_in_order(address: str) -> None:
    """Three tasks awaiting arecv on one receiver at once get objects 0, 1, 2, one each."""
    name = f"aconc-{os.getpid()}"

    async def main() -> list[list[int]]:
        with DataSender(address, dataset_name=name) as sender, DataReceiver(address, dataset_name=name) as receiver:
            tasks = [asyncio.ensure_future(receiver.arecv(timeout=20)) for _ in range(3)]
            await asyncio.sleep(0.1)
            for i in range(3):
                await sender.asend([i])
            return list(await asyncio.gather(*tasks))

    assert _run(main) == [[0], [1], [2]]


def _drain_after(address: str, name: str, delay: float, count: int) -> None:
    """Child: receive ``count`` objects after ``delay`` seconds, checking their order."""
    time.sleep(delay)
    with DataReceiver(address, dataset_name=name, wait=30) as receiver:
        assert [int(receiver.recv(timeout=30)[0]) for _ in range(count)] == list(range(count))


def test_asend_waits_for_room_without_blocking_the_loop(address: str) -> None:
    """With max_queue_size=2 the third asend waits until another process receives; the loop
    runs meanwhile, and every object arrives in order, sync and async sends mixed."""
    name = f"aroom-{os.getpid()}"

    async def main() -> tuple[float, int]:
        with DataSender(address, dataset_name=name, max_queue_size=2) as sender:
            child = start_process(_drain_after, address, name, 1.0, 6)
            await sender.asend(np.full(4, 0))
            sender.send(np.full(4, 1))
            with Ticker() as ticker:
                start = time.monotonic()
                await sender.asend(np.full(4, 2))
                waited = time.monotonic() - start
                ticks = ticker.ticks
            for i in range(3, 6):
                await sender.asend(np.full(4, i))
        join_ok(child, 30)
        return waited, ticks

    waited, ticks = _run(main)
    assert waited >= 0.3, f"the third asend returned after {waited:.3f} s: it did not wait for room"
    assert ticks >= 100


def test_asend_bad_argument_raises_at_once_and_loses_nothing(broker: int) -> None:
    """asend of an object that cannot be split evenly raises InvalidArgument at once; what was
    sent before stays queued and the sender goes on working."""
    name = f"abad-{os.getpid()}"

    async def main() -> None:
        with DataSender(ADDRESS, dataset_name=name, num_shards=2) as sender:
            await sender.asend(np.arange(4))
            with pytest.raises(InvalidArgument, match=r"len\(obj\) must be a positive multiple of num_shards \(2\), got 3"):
                await sender.asend(np.arange(3))
            await sender.asend(np.arange(4, 8))
            assert len(sender.get_queue(0)) == len(sender.get_queue(1)) == 2

    _run(main)


def test_close_after_asend_ends_the_stream_after_every_object(address: str) -> None:
    """close() right after asends: the receiver gets all of them, then ChannelClosed."""
    name = f"aclose-{os.getpid()}"

    async def main() -> None:
        sender = DataSender(address, dataset_name=name, max_queue_size=20)
        for i in range(10):
            await sender.asend([i])
        sender.close()

    _run(main)
    with DataReceiver(address, dataset_name=name, wait=10) as receiver:
        assert [receiver.recv(timeout=10) for _ in range(10)] == [[i] for i in range(10)]
        with pytest.raises(ChannelClosed):
            receiver.recv(timeout=10)


# -- configuration and logging ---------------------------------------------------------------


def test_shmchannel_address_is_the_default_address(broker: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoints made without an address use SHMCHANNEL_ADDRESS; a bad one is named in the error."""
    name = f"envaddr-{os.getpid()}"
    monkeypatch.setenv("SHMCHANNEL_ADDRESS", "127.0.0.1")
    with DataSender(dataset_name=name) as sender, DataReceiver(dataset_name=name) as receiver:
        sender.send([7])
        assert receiver.recv(timeout=10) == [7]
    monkeypatch.setenv("SHMCHANNEL_ADDRESS", "not-an-address")
    with pytest.raises(InvalidArgument, match="address must be an IPv4 address of this machine .*got 'not-an-address'"):
        DataSender(dataset_name=name)


def test_library_logs_and_never_prints(_isolated: str, caplog: pytest.LogCaptureFixture,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    """Starting the broker on first use is logged under "shmchannel"; a round trip prints nothing."""
    name = f"logs-{os.getpid()}"
    with caplog.at_level(logging.INFO, logger="shmchannel"):
        with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
            sender.send(np.arange(10))
            assert receiver.recv(timeout=10).tolist() == list(range(10))
    started = [r for r in caplog.records if r.name.startswith("shmchannel") and "started broker" in r.getMessage()]
    assert len(started) == 1 and started[0].levelno == logging.INFO
    out, err = capfd.readouterr()
    assert out == "" and err == ""
