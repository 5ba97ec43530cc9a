"""Everything the broker holds is bounded (issue 13, item 4): inline objects count against
the store, a client that reads no replies (or queues requests without end) is no longer
read, and queue listings of the largest channels fit their reply.

Each test causes the fault with the input of the issue, through the API or a raw protocol
client, and checks the broker's memory (RSS, via psutil) or the error the API documents.
"""

from __future__ import annotations

import os
import select
import socket
import time
from typing import Any

import numpy as np
import psutil
import pytest

import shmchannel
from shmchannel import DataReceiver, DataSender, DataSystem, StoreFullTimeout
from shmchannel.broker import connection, protocol
from shmchannel.store.table import charge
from shmchannel.testing import wait_until

from .conftest import ADDRESS
from .test_hostile import _exactly, _frame, _raw, _reply

pytestmark = pytest.mark.timeout(60)  # each takes a few seconds; this only bounds a hang

MIB = 1 << 20
STORE = 4 * MIB  # the small_store fixture's
INLINE = np.full(7500, 1.0)  # 60,000 bytes of data: travels inline (below 64 KiB)


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _blob_size() -> int:
    """Bytes the blob of INLINE takes (what ``inline_bytes`` counts per object)."""
    with DataSystem(ADDRESS) as ds:
        key = ds.put(INLINE)
        size = ds.stats().inline_bytes
        ds.delete(key)
    return size


def _write_until_stalled(sock: socket.socket, frame: bytes, limit: float = 20.0) -> int:
    """Write ``frame`` over and over, whole frames only, until the socket takes nothing for
    half a second (the broker stopped reading); the bytes written. AssertionError if the
    broker still reads after ``limit`` seconds."""
    sock.setblocking(False)
    batch = frame * max(1, (256 << 10) // len(frame))
    pending = memoryview(batch)
    written = 0
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not pending:
            pending = memoryview(batch)
        try:
            n = sock.send(pending)
        except BlockingIOError:
            _, writable, _ = select.select([], [sock], [], 0.5)
            if not writable:
                return written
            continue
        written += n
        pending = pending[n:]
    raise AssertionError(f"the broker still read after {limit} s ({written} bytes)")


# -- inline objects count against the store ----------------------------------------------


def test_inline_puts_past_the_store_raise_store_full_and_leave_rss_flat(small_store: int) -> None:
    """1,000 puts of 60 KB inline objects into a 4 MiB store: about 4 MiB of them are
    taken, each further put raises StoreFullTimeout, ``used`` counts the inline bytes, and
    the broker's RSS grows by a few MiB (it took all 1,000: 60 MB, with used still 0)."""
    size = _blob_size()
    before = _rss(small_store)
    keys, refused = [], 0
    with DataSystem(ADDRESS) as ds:
        for _ in range(1000):
            try:
                keys.append(ds.put(INLINE, timeout=0))
            except StoreFullTimeout:
                refused += 1
        stats = ds.stats()
        assert len(keys) == STORE // charge(size) and refused == 1000 - len(keys)
        assert (stats.used, stats.inline_bytes, stats.objects) == (len(keys) * charge(size), len(keys) * size, len(keys))
        assert stats.free < charge(size)
        assert _rss(small_store) - before < 16 * MIB
        for key in keys:
            ds.delete(key)
        assert ds.stats().used == 0


def test_inline_put_waits_for_room_up_to_its_timeout(small_store: int) -> None:
    """A put into a store full of inline objects waits its timeout and raises
    StoreFullTimeout naming the sizes; once a delete frees room, a put goes in."""
    with DataSystem(ADDRESS) as ds:
        keys = []
        with pytest.raises(StoreFullTimeout):
            while True:
                keys.append(ds.put(INLINE, timeout=0))
        start = time.monotonic()
        with pytest.raises(StoreFullTimeout, match=r"^store full: asked for \d+ bytes, \d+ of 4194304 free "
                           r"\(largest free block \d+\) after waiting 0.3 s$"):
            ds.put(INLINE, timeout=0.3)
        assert time.monotonic() - start >= 0.3
        ds.delete(keys.pop())
        keys.append(ds.put(INLINE, timeout=5))
        np.testing.assert_array_equal(ds.get(keys[-1]), INLINE)


def test_sends_past_the_store_wait_and_go_on_once_received(small_store: int) -> None:
    """A sender with max_queue_size=3000 of 60 KB objects into a 4 MiB store: a send past
    the store times out with StoreFullTimeout and queues nothing, ``used`` stays within the
    capacity, and once a receiver consumes two objects the next send goes in (their blocks
    come free in the sender's own slab: no broker in between)."""
    name = f"store-full-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name, max_queue_size=3000) as sender, DataSystem(ADDRESS) as ds:
        sent = 0
        with pytest.raises(StoreFullTimeout, match=r"^store full: asked for \d+ bytes, \d+ of 4194304 free "
                           r"\(largest free block \d+\) after waiting 0.2 s$"):
            while sent < 3000:
                sender.send(INLINE, timeout=0.2)
                sent += 1
        assert 0 < sent <= STORE // INLINE.nbytes
        assert len(sender.get_queue(0)) == sent
        stats = ds.stats()
        assert stats.objects == sent and stats.used <= stats.capacity
        with DataReceiver(ADDRESS, dataset_name=name) as receiver:
            for _ in range(2):
                np.testing.assert_array_equal(receiver.recv(timeout=10), INLINE)
            receiver.ack()
            sender.send(INLINE, timeout=10)
        assert len(sender.get_queue(0)) == sent - 1


# -- clients that do not read, or queue requests without end -------------------------------


def test_a_client_that_never_reads_its_replies_is_no_longer_read(broker: int) -> None:
    """A raw client writing ``get`` requests for a 60 KB key without reading a reply: the
    broker stops reading it, its RSS grows by less than 32 MiB (it grew past 1 GiB in under
    a second), and another client is served meanwhile."""
    with DataSystem(ADDRESS) as ds:
        key = ds.put(INLINE)
        before = _rss(broker)
        with _raw() as sock:
            written = _write_until_stalled(sock, _frame({"op": "get", "key": key}))
            assert written < 8 * MIB  # a few socket buffers of 50-byte requests
            assert _rss(broker) - before < 32 * MIB
            np.testing.assert_array_equal(ds.get(key), INLINE)
            assert shmchannel.status() is not None
        ds.delete(key)


def test_requests_queued_behind_a_waiting_one_are_bounded(broker: int) -> None:
    """A raw client whose ``open`` waits for a channel, writing 1 MiB puts behind it without
    end: the broker reads about BACKLOG_LIMIT bytes of them, then no more, its RSS stays
    within that, others are served, and when the client leaves nothing is stored."""
    before = _rss(broker)
    with _raw() as sock, DataSystem(ADDRESS) as ds:
        sock.sendall(_frame({"op": "open", "namespace": "bounds", "dataset_name": "never", "shard": 0}))
        put = _frame({"op": "put", "parts": [{"inline": [0, MIB]}]}, bytes(MIB))
        written = _write_until_stalled(sock, put)
        assert connection.BACKLOG_LIMIT <= written < connection.BACKLOG_LIMIT + 8 * MIB
        assert _rss(broker) - before < connection.BACKLOG_LIMIT + 32 * MIB
        assert ds.stats().objects == 0
        key = ds.put(INLINE)
        np.testing.assert_array_equal(ds.get(key), INLINE)
        ds.delete(key)
    with DataSystem(ADDRESS) as ds:
        assert ds.stats().objects == 0


# -- replies -----------------------------------------------------------------------------------


def test_queue_listing_of_100000_objects_is_answered(broker: int) -> None:
    """A shard with 100,000 queued objects: the broker's listing (a raw ``queue`` request,
    past the 1 MiB bound of a request) lists all of them, oldest first, as get_queue(0)."""
    ident = {"namespace": "bounds", "dataset_name": f"deep-{os.getpid()}"}
    count = 100_000
    with DataSender(ADDRESS, num_shards=1, max_queue_size=count, **ident) as sender, _raw(30) as sock:
        for i in range(count):
            sender.send([i])
        sock.sendall(_frame({"op": "queue", **ident, "shard": 0}))
        json_len, _ = protocol.parse_head(_exactly(sock, protocol.HEAD.size), max_json=protocol.MAX_REPLY_JSON)
        queued: list[Any] = protocol.parse_body(_exactly(sock, json_len), request=False)["queue"]
        assert len(queued) == len(set(queued)) == count
        with DataReceiver(ADDRESS, wait=10, **ident) as receiver:
            assert receiver.get_queue(0) == queued
