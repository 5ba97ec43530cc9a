"""No documented parameter builds a frame the broker protocol refuses (issue 11, item 3):
batches are capped by bytes as well as count, objects over the frame bound go through the
store, listings fit, and out-of-range parameters are refused up front naming their bound."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from shmchannel import DataReceiver, DataSender, DataSystem, InvalidArgument
from shmchannel.broker import daemon, protocol
from shmchannel.testing import start_idle_broker

from .conftest import ADDRESS


def exact(message: str) -> str:
    return f"^{re.escape(message)}$"


@pytest.fixture
def big_store() -> int:
    """A broker whose store holds 640 MiB (objects of 300 MiB go through it)."""
    daemon.stop()
    os.environ["SHMCHANNEL_MEMORY"] = "640M"
    return start_idle_broker()


def _check(got: np.ndarray, value: int, size: int) -> None:
    assert got.shape == (size,) and got[0] == value and got[-1] == value and got[size // 2] == value


def test_prefetched_batch_of_large_inline_objects_stays_within_the_frame_bound(big_store: int) -> None:
    """The issue's input (a): eight 34 MiB objects sent inline (inline_threshold=64 MiB) are
    received with the default prefetch, in order and intact, in batches the protocol takes.
    (A store larger than the 272 MiB: inline objects count against it, issue 13.)"""
    size = 34 << 20
    with DataSender(ADDRESS, dataset_name="a", inline_threshold=64 << 20) as sender:
        for i in range(8):
            sender.send(np.full(size, i, np.uint8))
        with DataReceiver(ADDRESS, dataset_name="a") as receiver:
            for i in range(8):
                _check(receiver.recv(timeout=60), i, size)


def test_object_over_the_frame_bound_goes_through_the_store(big_store: int) -> None:
    """The issue's input (b): a 300 MiB object with inline_threshold=1 GiB goes through the
    store (no frame over the bound, the live broker is not reported lost) and arrives intact."""
    size = 300 << 20
    with DataSender(ADDRESS, dataset_name="b", inline_threshold=1 << 30) as sender:
        sender.send(np.full(size, 7, np.uint8))
        with DataReceiver(ADDRESS, dataset_name="b") as receiver:
            _check(receiver.recv(timeout=60), 7, size)
        assert sender.get_queue(0) == []  # the connection is alive and in step


def test_shards_whose_inline_parts_exceed_the_frame_bound_together_arrive(big_store: int) -> None:
    """Two 150 MiB shards, each under inline_threshold but over the frame bound together,
    are sent in one call (one inline, one through the store) and both arrive."""
    rows = 150 << 20
    obj = np.empty((2, rows), np.uint8)
    obj[0], obj[1] = 1, 2
    with DataSender(ADDRESS, dataset_name="c", num_shards=2, inline_threshold=1 << 30) as sender:
        sender.send(obj)
        del obj
        for shard in (0, 1):
            with DataReceiver(ADDRESS, dataset_name="c", shard_id=shard) as receiver:
                got = receiver.recv(timeout=60)
                assert got.shape == (1, rows) and got[0, 0] == shard + 1 and got[0, -1] == shard + 1


def test_datasystem_put_over_the_frame_bound_goes_through_the_store(big_store: int) -> None:
    """DataSystem.put of a 300 MiB object with inline_threshold=1 GiB stores it in the arena."""
    size = 300 << 20
    with DataSystem(ADDRESS, inline_threshold=1 << 30) as ds:
        key = ds.put(np.full(size, 3, np.uint8))
        _check(ds.get(key), 3, size)
        ds.delete(key)


def test_queue_listing_over_a_request_frames_bound_is_answered(broker: int) -> None:
    """get_queue of a channel holding 100,000 objects (a listing over the 1 MiB of JSON a
    request may carry) answers with every key, in order."""
    n = 100_000
    with DataSender(ADDRESS, dataset_name="many", max_queue_size=n) as sender:
        for i in range(n):
            sender.send(i)
        keys = sender.get_queue(0)
        assert len(keys) == n and len(set(keys)) == n
        assert len(json.dumps(keys)) > protocol.MAX_JSON  # the premise: over a request's bound
        with DataReceiver(ADDRESS, dataset_name="many") as receiver:
            assert receiver.recv(timeout=30) == 0
            assert receiver.get_queue(0) == keys[1:]  # the prefetched ones first: reserved, then queued


def test_prefetch_above_its_bound_is_refused(broker: int) -> None:
    """prefetch above 1024 (one reply's worth of descriptions) is refused naming its bound."""
    with DataSender(ADDRESS, dataset_name="p"):
        with pytest.raises(InvalidArgument, match=exact("prefetch must be an int from 1 to 1024, got 5000 (int)")):
            DataReceiver(ADDRESS, dataset_name="p", prefetch=5000)


@pytest.mark.parametrize("num_shards, max_queue_size, most", [(1, (1 << 20) + 1, 1 << 20), (4096, 257, 256)])
def test_channel_queuing_more_than_its_bound_is_refused(broker: int, num_shards: int, max_queue_size: int, most: int) -> None:
    """num_shards * max_queue_size above 2**20 (what one queue listing can name) is refused
    naming max_queue_size and its bound for that num_shards."""
    message = (
        f"max_queue_size must be at most {most} with num_shards={num_shards} "
        f"(a channel queues at most 1048576 objects in all), got {max_queue_size}"
    )
    with pytest.raises(InvalidArgument, match=exact(message)):
        DataSender(ADDRESS, dataset_name="q", num_shards=num_shards, max_queue_size=max_queue_size)
