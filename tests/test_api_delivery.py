"""Delivery on the embedded broker: prefetch, acknowledgement, redelivery after a receiver
dies, sends that do not wait for the broker, and the spare blocks a sender keeps."""

from __future__ import annotations

import gc
import os
import signal
from typing import Any

import numpy as np
import pytest

from shmchannel import ChannelError, DataReceiver, DataSender, DataSystem
from shmchannel.broker import daemon
from shmchannel.store.slabs import slab_size_for
from shmchannel.testing import join_ok, start_process, wait_until

from .conftest import ADDRESS

MIB = 1 << 20


def _depths(name: str) -> list[int]:
    status = daemon.status()
    assert status is not None
    (channel,) = [c for c in status["channels"] if c["dataset_name"] == name]
    return list(channel["depths"])


def _stats() -> Any:
    with DataSystem(ADDRESS) as ds:
        return ds.stats()


def test_prefetched_objects_still_count_as_queued(broker: int) -> None:
    """A receiver fetching 4 at a time hands them out in order; until it does, they stay in
    get_queue, in the status depth and in the sender's max_queue_size."""
    name = f"prefetch-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name, max_queue_size=6) as sender, DataReceiver(
        ADDRESS, dataset_name=name, prefetch=4
    ) as receiver:
        for i in range(6):
            sender.send([i])
        keys = sender.get_queue(0)
        assert receiver.recv(timeout=10) == [0]
        assert receiver.get_queue(0) == keys[1:]
        # The receiver's note that it handed [0] out goes on its own connection, without a
        # reply to wait for; another connection's look may reach the broker first.
        wait_until(lambda: sender.get_queue(0) == keys[1:], 10, "the sender to see [0] handed out")
        assert _depths(name) == [5]
        sender.send([6], timeout=5)  # the one handed out made room for exactly one
        with pytest.raises(TimeoutError):
            sender.send([7], timeout=0.3)
        assert [receiver.recv(timeout=10) for _ in range(6)] == [[i] for i in range(1, 7)]
        assert receiver.get_queue(0) == []
        wait_until(lambda: sender.get_queue(0) == [], 10, "the sender to see all handed out")


def test_close_puts_prefetched_objects_back_in_order(broker: int) -> None:
    """Objects a receiver fetched but never handed out go back to the head of the queue on close."""
    name = f"give-back-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender:
        for i in range(5):
            sender.send([i])
        with DataReceiver(ADDRESS, dataset_name=name, prefetch=8) as first:
            assert first.recv(timeout=10) == [0]
            assert first.peek(timeout=10) == [1]  # peek of a prefetched object
        with DataReceiver(ADDRESS, dataset_name=name) as second:
            assert [second.recv(timeout=10) for _ in range(4)] == [[1], [2], [3], [4]]


def _hold_one_and_wait(name: str, ready: Any) -> None:
    receiver = DataReceiver(ADDRESS, dataset_name=name, prefetch=4, wait=30)
    got = receiver.recv(timeout=30)
    assert got[0] == 0
    ready.set()
    signal.pause()  # SIGKILLed here, holding object 0 and three prefetched ones


@pytest.mark.parametrize("big", [False, True], ids=["inline", "arena"])
def test_objects_of_a_killed_receiver_go_to_the_next_one(broker: int, big: bool) -> None:
    """A receiver SIGKILLed while holding an unacknowledged object (and prefetched ones): a new
    receiver gets that object first, then all the rest, in order, none missing or doubled."""
    import multiprocessing

    name = f"killed-rx-{os.getpid()}-{int(big)}"
    make = (lambda i: np.full(MIB // 8, i, dtype=np.float64)) if big else (lambda i: np.array([i], dtype=np.float64))
    ready = multiprocessing.get_context("spawn").Event()
    with DataSender(ADDRESS, dataset_name=name, max_queue_size=20) as sender:
        for i in range(10):
            sender.send(make(i))
        proc = start_process(_hold_one_and_wait, name, ready)
        assert ready.wait(60)
        assert _depths(name) == [9]  # 0 handed out, 1-3 reserved, 4-9 queued
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        wait_until(lambda: _depths(name) == [10], 10, "the dead receiver's objects to be queued again")
        with DataReceiver(ADDRESS, dataset_name=name) as receiver:
            got = [int(receiver.recv(timeout=10)[0]) for _ in range(10)]
            assert got == list(range(10))
            assert receiver.get_queue(0) == []
    wait_until(lambda: _stats().objects == 0 and _stats().used == 0, 10, "the store to be empty")


def test_ack_lets_memory_return_before_the_next_recv(broker: int) -> None:
    """An object dropped but not acknowledged keeps its block; ack() frees it, and the
    sender's next object of that size reuses it: the store does not grow."""
    name = f"ack-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(np.ones(MIB, dtype=np.float64))
        got = receiver.recv(timeout=10)
        del got
        gc.collect()
        assert _stats().objects == 1  # dropped, not acknowledged: still the receiver's
        used = _stats().used
        receiver.ack()
        assert _stats().objects == 0
        for i in range(10):
            sender.send(np.full(MIB, i, dtype=np.float64))
            assert receiver.recv(timeout=10)[0] == i
            receiver.ack()
        assert _stats().used == used  # each object took the block the one before freed
    wait_until(lambda: _stats().used == 0, 10, "the sender's memory to return to the store")


def _stream_then_keep_open(name: str, count: int, sent: Any, done: Any) -> None:
    with DataSender(ADDRESS, dataset_name=name, max_queue_size=8) as sender:
        for i in range(count):
            sender.send(np.full(MIB // 8, i, dtype=np.float64))
        sent.set()
        assert done.wait(60)


def test_an_idle_senders_memory_is_bounded_and_freed_with_it(broker: int) -> None:
    """A sender of 1 MiB objects keeps one slab while open (store/slabs.py: MIN_SLAB, room
    for several such objects in flight), reused by each object; it returns when the
    sender's process exits."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    sent, done = ctx.Event(), ctx.Event()
    name = f"spares-{os.getpid()}"
    proc = start_process(_stream_then_keep_open, name, 20, sent, done)
    with DataReceiver(ADDRESS, dataset_name=name, wait=30) as receiver:
        for i in range(20):
            assert receiver.recv(timeout=30)[0] == i
        assert sent.wait(30)
    stats = _stats()
    assert stats.objects == 0
    assert stats.used <= slab_size_for(MIB + 4096, 10), f"{stats.used} bytes held by an idle sender"
    done.set()
    join_ok(proc, 30)
    wait_until(lambda: _stats().used == 0, 10, "the sender's slab to return")


def test_blocks_freed_after_their_sender_left_touch_no_other_memory(broker: int) -> None:
    """A sender leaves with objects still queued: its slab goes back to the store but for
    those blocks (and the slab's header, where receivers count the blocks they free). An
    object put then in the memory just before them stays intact while the receiver drains
    and frees the blocks (a review found the free counted in memory given to someone else)."""
    name = f"loose-{os.getpid()}"
    with DataSystem(ADDRESS) as ds:
        first = ds.put(np.zeros((1 << 20) - 128, dtype=np.uint8))  # at the store's start
        with DataSender(ADDRESS, dataset_name=name) as sender:  # its slab right after it
            for i in range(3):
                sender.send(np.full(1000, i, dtype=np.int64))
            ds.delete(first)
        # 64 bytes longer than ``first``: it takes that space and the slab header after it,
        # unless the header is kept.
        key = ds.put(np.zeros((1 << 20) - 64, dtype=np.uint8))
        with DataReceiver(ADDRESS, dataset_name=name) as receiver:
            for i in range(3):
                assert int(receiver.recv(timeout=10)[0]) == i
        wait_until(lambda: ds.stats().objects == 1, 10, "the sender's blocks to be freed")
        assert not ds.get(key).any(), "freeing a block wrote into the DataSystem object"
        ds.delete(key)
