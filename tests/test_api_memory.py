"""Memory through the public API: zero-copy views, release on drop, DataSystem, a full store."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest

from shmchannel import DataReceiver, DataSender, DataSystem, StoreFull, StoreFullTimeout
from shmchannel.backends import arena_client
from shmchannel.store.arena import ArenaMap
from shmchannel.testing import wait_until

from .conftest import ADDRESS

MIB = 1 << 20


def _arena() -> ArenaMap:
    """This process's mapping of the broker's arena (made by the first endpoint)."""
    assert arena_client._arena is not None, "no arena mapped in this process"
    return arena_client._arena[2]


def _inside_arena(array: np.ndarray) -> bool:
    start, end = _arena().address_range
    address = int(array.__array_interface__["data"][0])
    return start <= address and address + array.nbytes <= end


def _used() -> int:
    with DataSystem(ADDRESS) as ds:
        return ds.stats().used


def _objects() -> int:
    """Objects in use anywhere: queued, claimed, or viewed (a sender's freed block is not)."""
    with DataSystem(ADDRESS) as ds:
        return ds.stats().objects


def _store_empty() -> bool:
    with DataSystem(ADDRESS) as ds:
        stats = ds.stats()
    return stats.used == 0 and stats.objects == 0 and stats.inline_bytes == 0


# -- zero-copy receive --------------------------------------------------------------------


def test_received_array_is_view_of_arena(broker: int) -> None:
    """A received 8 MiB array's data lies inside this process's mapping of the arena."""
    name = f"zc-array-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(np.arange(MIB, dtype=np.float64))
        got = receiver.recv(timeout=10)
        assert got.nbytes == 8 * MIB
        assert _inside_arena(got)
        np.testing.assert_array_equal(got[-3:], [MIB - 3, MIB - 2, MIB - 1])
        del got


def test_received_dataframe_numeric_columns_are_views_of_arena(broker: int) -> None:
    """The float and int columns of a received DataFrame are views of the arena."""
    name = f"zc-frame-{os.getpid()}"
    rows = 200_000
    df = pd.DataFrame({"x": np.linspace(0.0, 1.0, rows), "n": np.arange(rows, dtype=np.int64), "s": ["a", "b"] * (rows // 2)})
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(df)
        got = receiver.recv(timeout=10)
        pd.testing.assert_frame_equal(got, df)
        x, n = got["x"].to_numpy(), got["n"].to_numpy()
        assert x.dtype == np.float64 and n.dtype == np.int64
        assert _inside_arena(x), "float column was copied out of shared memory"
        assert _inside_arena(n), "int column was copied out of shared memory"
        del got, x, n


# -- memory returns to the store ----------------------------------------------------------


def test_memory_returns_after_received_array_dropped(broker: int) -> None:
    """A received object's block stays in use while the array is held or unacknowledged,
    and is free once it is both acknowledged and dropped (its sender then reuses it); the
    store itself gets the memory back when the sender leaves."""
    name = f"drop-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        assert _used() == 0
        sender.send(np.ones(MIB, dtype=np.float64))
        got = receiver.recv(timeout=10)
        assert _objects() == 1 and _used() >= 8 * MIB
        del got
        gc.collect()
        assert _objects() == 1, "dropped before it was acknowledged: it must be kept (at-least-once)"
        receiver.ack()
        assert _objects() == 0
    wait_until(lambda: _used() == 0, 10, "store memory to return once the sender left")


def test_slice_of_received_array_keeps_memory_until_dropped(broker: int) -> None:
    """A slice outliving its received array keeps its block; dropping the slice frees it."""
    name = f"slice-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(np.arange(MIB, dtype=np.float64))
        got = receiver.recv(timeout=10)
        receiver.ack()
        part = got[1000:1010]
        del got
        gc.collect()
        assert _objects() == 1
        np.testing.assert_array_equal(part, np.arange(1000, 1010, dtype=np.float64))
        del part
        gc.collect()
        assert _objects() == 0


def test_received_object_valid_after_receiver_close(broker: int) -> None:
    """An object received before close() keeps its values, and its block is freed once
    dropped; with its sender gone too, the store is empty."""
    name = f"after-close-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender:
        with DataReceiver(ADDRESS, dataset_name=name) as receiver:
            sender.send(np.arange(MIB, dtype=np.float64))
            got = receiver.recv(timeout=10)
        assert receiver.closed
        assert _objects() == 1
    np.testing.assert_array_equal(got, np.arange(MIB, dtype=np.float64))
    assert _used() >= 8 * MIB  # the sender's slab, orphaned until the block in it is free
    del got
    gc.collect()
    wait_until(_store_empty, 10, "the store to be empty after the array was dropped")


# -- DataSystem ---------------------------------------------------------------------------

OBJECTS: dict[str, Any] = {
    "ndarray": np.arange(MIB, dtype=np.int64),
    "dataframe": pd.DataFrame({"x": np.linspace(0, 1, 100_000), "n": np.arange(100_000), "s": ["a", "b"] * 50_000}),
    "dict": {"name": "run 7", "epochs": 3, "rates": [0.1, 0.01]},
}


def _assert_same(got: Any, expected: Any) -> None:
    if isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(got, expected)
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(got, expected)
    else:
        assert got == expected


@pytest.mark.parametrize("kind", OBJECTS)
def test_datasystem_put_get_contains_delete(address: str, kind: str) -> None:
    """put stores an object that get returns equal, contains finds and stats counts; delete removes it."""
    obj = OBJECTS[kind]
    with DataSystem(address) as ds:
        key = ds.put(obj)
        assert isinstance(key, str) and key
        assert key in ds
        assert ds.stats().objects == 1
        got = ds.get(key)
        _assert_same(got, obj)
        del got
        gc.collect()
        ds.delete(key)
        assert key not in ds
        if address == ADDRESS:  # Ray does not report its store's usage
            wait_until(_store_empty, 10, "the store to be empty after delete")


def test_datasystem_get_missing_key_raises_key_error(address: str) -> None:
    """get of a key that was never stored raises KeyError naming the key."""
    with DataSystem(address) as ds:
        with pytest.raises(KeyError, match=r"^no object with key 'no-such-key' in the data system$"):
            ds.get("no-such-key")


def test_datasystem_get_after_delete_raises_key_error(address: str) -> None:
    """get of a deleted key raises KeyError."""
    with DataSystem(address) as ds:
        key = ds.put(np.arange(10))
        ds.delete(key)
        with pytest.raises(KeyError, match=rf"^no object with key '{key}' in the data system$"):
            ds.get(key)


@pytest.mark.parametrize("size", [16, MIB], ids=["inline", "arena"])
def test_datasystem_get_returns_read_only_arrays(address: str, size: int) -> None:
    """Arrays returned by get are read-only, small (inline) or large."""
    with DataSystem(address) as ds:
        key = ds.put(np.arange(size, dtype=np.float64))
        got = ds.get(key)
        assert not got.flags.writeable
        with pytest.raises(ValueError, match=r"^assignment destination is read-only$"):
            got[0] = 1.0
        del got
        ds.delete(key)


def test_datasystem_delete_keeps_held_view_valid(broker: int) -> None:
    """A view held across delete keeps its values and memory; dropping it frees the store."""
    with DataSystem(ADDRESS) as ds:
        key = ds.put(np.arange(MIB, dtype=np.float64))
        view = ds.get(key)[100:200]
        ds.delete(key)
        assert key not in ds
        assert ds.stats().used >= 8 * MIB
        np.testing.assert_array_equal(view, np.arange(100, 200, dtype=np.float64))
        del view
        gc.collect()
        wait_until(_store_empty, 10, "the store to be empty after the view was dropped")


# -- a full store -------------------------------------------------------------------------


def test_send_larger_than_store_raises_store_full(small_store: int) -> None:
    """Sending an object larger than the whole store raises StoreFull at once, without waiting."""
    name = f"too-big-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender:
        start = time.monotonic()
        with pytest.raises(StoreFull, match=r"^object needs \d+ bytes of shared memory, the store holds 4194304 in all "
                           r"\(start the broker with a larger --memory or SHMCHANNEL_MEMORY\)$") as info:
            sender.send(np.zeros(5 * MIB, dtype=np.uint8), timeout=5)
        assert not isinstance(info.value, StoreFullTimeout)
        assert time.monotonic() - start < 1.0
        assert sender.get_queue(0) == []
    assert _store_empty()


def test_send_waits_for_store_space(small_store: int) -> None:
    """A send that fits only after a receiver frees memory times out unqueued, then succeeds once it is freed."""
    name = f"full-{os.getpid()}"
    first = np.full(3 * MIB, 1, dtype=np.uint8)
    second = np.full(3 * MIB, 2, dtype=np.uint8)
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(first)
        held = receiver.recv(timeout=10)
        sender.send([7])  # small: travels inline, so something stays queued
        queued = sender.get_queue(0)
        assert len(queued) == 1
        with pytest.raises(TimeoutError, match=r"^store full: asked for \d+ bytes, \d+ of 4194304 free "
                           r"\(largest free block \d+\) after waiting [\d.]+ s$") as info:
            sender.send(second, timeout=0.5)
        assert isinstance(info.value, StoreFullTimeout)
        assert sender.get_queue(0) == queued
        receiver.ack()  # consumed: its memory returns once dropped too
        del held
        gc.collect()
        sender.send(second, timeout=10)
        assert receiver.recv(timeout=10) == [7]
        got = receiver.recv(timeout=10)
        np.testing.assert_array_equal(got, second)
        del got


def test_store_full_timeout_names_the_callers_timeout(small_store: int) -> None:
    """The StoreFullTimeout of send(timeout=0.5) says it waited 0.5 s, the timeout the caller gave."""
    name = f"full-message-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(np.zeros(3 * MIB, dtype=np.uint8))
        held = receiver.recv(timeout=10)
        with pytest.raises(StoreFullTimeout, match=r"^store full: asked for \d+ bytes, \d+ of 4194304 free "
                           r"\(largest free block \d+\) after waiting 0.5 s$"):
            sender.send(np.zeros(3 * MIB, dtype=np.uint8), timeout=0.5)
        del held


# -- forgotten close ----------------------------------------------------------------------


def test_forgotten_sender_warns(broker: int) -> None:
    """A sender dropped without close() emits a ResourceWarning naming it."""
    name = f"forgotten-{os.getpid()}"
    with pytest.warns(ResourceWarning, match=rf"^<DataSender default/{name} 1 shards open> was never closed; "
                      r"call close\(\) or use it in a with block$"):
        sender = DataSender(ADDRESS, dataset_name=name)
        del sender
        gc.collect()


# -- a long stream stays flat -------------------------------------------------------------

STREAM = 10_000
#: Every 10th object of the stream goes through the arena (256 KiB), the rest travel inline.
STREAM_BIG = 256 * 1024


def _stream_mixed(name: str) -> None:
    small, big = np.ones(256, dtype=np.float32), np.ones(STREAM_BIG // 4, dtype=np.float32)
    with DataSender(ADDRESS, dataset_name=name, max_queue_size=10) as sender:
        for i in range(STREAM):
            obj = big if i % 10 == 0 else small
            obj[0] = i
            sender.send(obj)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_stays_flat_over_a_long_stream(broker: int) -> None:
    """Over 10,000 objects (every 10th through the arena) the receiver's RSS and the store's
    usage stay flat, and the arena's pages in /dev/shm never grow past one reservation step,
    far below what max_queue_size allows: freed blocks are reused, nothing accumulates
    (the journal next to the arena is rewritten short as it grows)."""
    from shmchannel import config
    from shmchannel.broker.journal import COMPACT_AT
    from shmchannel.store.arena import RESERVE_STEP
    from shmchannel.store.slabs import slab_size_for
    from shmchannel.testing import join_ok, start_process

    name = f"long-{os.getpid()}"
    proc = start_process(_stream_mixed, name)
    samples: dict[int, tuple[int, int, int]] = {}
    entries = config.our_shm_entries(broker)  # the arena and the journal
    assert sorted(e.name.rsplit("-", 1)[1] for e in entries) == ["arena", "journal"]
    with DataReceiver(ADDRESS, dataset_name=name, wait=30) as receiver:
        for i in range(STREAM):
            got = receiver.recv(timeout=30)
            assert got[0] == i and got.nbytes == (STREAM_BIG if i % 10 == 0 else 1024)
            del got
            if i % 1000 == 999:
                gc.collect()
                with DataSystem(ADDRESS) as ds:
                    stats = ds.stats()
                samples[i + 1] = (_rss(), stats.used, sum(e.stat().st_blocks * 512 for e in entries))
    join_ok(proc, 60)
    rss = [s[0] for s in samples.values()]
    assert rss[-1] - rss[1] < 4 * MIB, f"receiver RSS grew from {rss[1]} to {rss[-1]} bytes"
    # The sender's one slab, reused all along (store/slabs.py).
    assert all(s[1] <= slab_size_for(STREAM_BIG + 4096, 10) for s in samples.values()), samples
    # One reservation step of arena, and a journal kept short by rewriting it.
    assert max(s[2] for s in samples.values()) <= RESERVE_STEP + 2 * COMPACT_AT, samples
    wait_until(_store_empty, 10, "the store to be empty after the stream")


# -- views: fork, interrupts ----------------------------------------------------------------


def test_a_forked_child_dropping_its_copy_leaves_the_parents_view_alone(broker: int) -> None:
    """A child forked while the parent holds a received (acknowledged) array drops its
    inherited copy and exits: the parent's view still counts, so its block is not reused
    -- the sender's next object of the same size goes elsewhere, and the parent's array
    keeps its values (before the fix the child's drop freed the block, and the next send
    overwrote the parent's array)."""
    name = f"fork-view-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(np.zeros(1000))
        held = receiver.recv(timeout=10)
        receiver.ack()
        pid = os.fork()
        if pid == 0:
            try:
                del held
                gc.collect()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert _objects() == 1, "the child's drop released the parent's view"
        sender.send(np.ones(1000))  # the same size: the sender would take a free oldest block again
        np.testing.assert_array_equal(held, np.zeros(1000))
        assert receiver.recv(timeout=10)[0] == 1.0
        del held
    wait_until(_store_empty, 10, "the store to empty")


def test_an_interrupt_as_the_last_view_goes_leaks_nothing(broker: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT made pending inside the C call that drops a received array's last reference,
    so that the first Python code to run is a weak-reference callback of the views: the
    KeyboardInterrupt either reaches the caller or is swallowed there (Python reports it as
    ignored: the callback that drops counts at once is Python), and either way the view's
    count is dropped -- the block goes back (before the fix the count stayed for good: the
    block leaked, backends/views.py)."""
    import ctypes
    import functools
    import operator
    import signal
    import sys

    swallowed: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: swallowed.append(info.exc_value))
    kill = functools.partial(ctypes.CDLL(None).kill, os.getpid(), int(signal.SIGINT))
    name = f"intr-view-{os.getpid()}"
    raised = 0
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        for attempt in range(20):
            sender.send(np.arange(1000.0))
            holder = [receiver.recv(timeout=10)]
            receiver.ack()
            try:  # one C call chain: the signal becomes pending, then the last reference goes
                any(map(operator.call, [kill, functools.partial(operator.delitem, holder, 0)]))
            except KeyboardInterrupt:
                raised += 1
            assert not holder
            wait_until(lambda: _objects() == 0, 10, f"attempt {attempt}: the dropped view's block to be freed")
    assert raised + sum(isinstance(e, KeyboardInterrupt) for e in swallowed) == 20
    wait_until(_store_empty, 10, "the store to empty")
