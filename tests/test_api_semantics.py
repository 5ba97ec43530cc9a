"""What the channel promises: order, sharding, full_batch, round-trips, queues, timeouts, end of stream."""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from shmchannel import ChannelClosed, ChannelTimeout, DataReceiver, DataSender, DataSystem
from shmchannel.broker import daemon
from shmchannel.testing import join_ok, start_process, wait_until

from .conftest import ADDRESS

#: Elements of a float64 array that no longer travels inline (> 64 KiB), so it goes through the arena.
BIG = 20_000


def exact(message: str) -> str:
    """A ``match`` pattern for exactly ``message``."""
    return f"^{re.escape(message)}$"


def _item(i: int) -> Any:
    """The i-th object of a numbered stream: mostly small lists, every 10th a large array."""
    return np.full(BIG, i, dtype=np.float64) if i % 10 == 0 else [i, f"item {i}"]


def _check_item(got: Any, i: int) -> None:
    if i % 10 == 0:
        assert isinstance(got, np.ndarray) and got.shape == (BIG,) and (got == i).all(), f"object {i}: {got!r}"
    else:
        assert got == [i, f"item {i}"], f"object {i}: {got!r}"


def _channel_status(address: str, name: str) -> dict[str, Any]:
    """The status of channel ``name`` (namespace "default") as its backend reports it."""
    if address == ADDRESS:
        status = daemon.status()
        assert status is not None, "no broker runs"
        channels = status["channels"]
    else:
        from shmchannel.backends.ray import list_channels

        channels = list_channels(address)
    (channel,) = [c for c in channels if c["dataset_name"] == name]
    return channel


def _receiver_waits(address: str, name: str) -> bool:
    """Whether a receiver of channel ``name`` (namespace "default") already waits for its sender."""
    if address == ADDRESS:  # the waiting receiver is the one client besides our status query
        return (daemon.status() or {}).get("clients", 0) >= 2
    # On Ray a receiver created with wait > 0 creates the channel's actor itself and waits on it.
    from shmchannel.backends.ray import connect
    from shmchannel.backends.ray.actors import actor_name

    try:
        connect(address).get_actor(actor_name(name), namespace="default")
    except ValueError:
        return False
    return True


# -- children (module level: spawn imports them by name) ----------------------------------


def _send_numbered(address: str, name: str, count: int, max_queue_size: int) -> None:
    with DataSender(address, dataset_name=name, max_queue_size=max_queue_size) as sender:
        for i in range(count):
            sender.send(_item(i))


def _send_once_a_receiver_waits(address: str, name: str) -> None:
    wait_until(lambda: _receiver_waits(address, name), 30, "the receiver to connect")
    with DataSender(address, dataset_name=name) as sender:
        sender.send([42])


# -- order -------------------------------------------------------------------------------


def test_fifo_order_across_processes(address: str) -> None:
    """200 objects sent by another process arrive once each, in the order sent, then the stream ends."""
    proc = start_process(_send_numbered, address, "fifo", 200, 10)
    with DataReceiver(address, dataset_name="fifo", wait=60) as receiver:
        for i in range(200):
            _check_item(receiver.recv(timeout=10), i)
        with pytest.raises(ChannelClosed):
            receiver.recv(timeout=10)
    join_ok(proc)


# -- sharding ----------------------------------------------------------------------------

ROWS = 8


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {"i": np.arange(ROWS), "f": np.linspace(0, 1, ROWS), "s": [f"s{i}" for i in range(ROWS)]},
        index=[f"r{i}" for i in range(ROWS)],
    )


SHARDABLE: dict[str, Callable[[], Any]] = {
    "ndarray-2d": lambda: np.arange(ROWS * 3).reshape(ROWS, 3),
    "ndarray-2d-big": lambda: np.arange(ROWS * BIG, dtype=np.float64).reshape(ROWS, BIG),
    "list": lambda: [0, "one", 2.0, None, (4,), {"five": 5}, [6], b"7"],
    "dataframe": _frame,
    "series": lambda: pd.Series(np.arange(ROWS) * 1.5, index=list("abcdefgh"), name="x"),
    "arrow-table": lambda: pa.table({"i": list(range(ROWS)), "s": [f"s{i}" for i in range(ROWS)]}),
}


def _block(obj: Any, shard: int, num_shards: int) -> Any:
    step = (obj.num_rows if isinstance(obj, pa.Table) else len(obj)) // num_shards
    if isinstance(obj, pa.Table):
        return obj.slice(shard * step, step)
    if isinstance(obj, (pd.DataFrame, pd.Series)):
        return obj.iloc[shard * step : (shard + 1) * step]
    return obj[shard * step : (shard + 1) * step]


def _assert_same(got: Any, expected: Any) -> None:
    if isinstance(expected, pa.Table):
        assert isinstance(got, pa.Table) and got.equals(expected), f"{got} != {expected}"
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
    elif isinstance(expected, pd.Series):
        pd.testing.assert_series_equal(got, expected, check_exact=True)
    elif isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    else:
        assert got == expected


@pytest.mark.parametrize("kind", sorted(SHARDABLE))
def test_four_shards_get_contiguous_row_blocks(address: str, kind: str) -> None:
    """With num_shards=4, the receiver of shard i gets rows [2i, 2i+2) of an 8-row object."""
    obj = SHARDABLE[kind]()
    with DataSender(address, dataset_name="shards", num_shards=4) as sender:
        receivers = [DataReceiver(address, dataset_name="shards", shard_id=i) for i in range(4)]
        try:
            sender.send(obj)
            for i, receiver in enumerate(receivers):
                assert receiver.num_shards == 4
                _assert_same(receiver.recv(timeout=10), _block(obj, i, 4))
        finally:
            for receiver in receivers:
                receiver.close()


# -- full_batch --------------------------------------------------------------------------


@pytest.mark.parametrize("elements", [16, BIG], ids=["inline", "arena"])
def test_full_batch_gives_every_shard_the_whole_object_read_only(address: str, elements: int) -> None:
    """With full_batch every shard's receiver gets the whole object (any length) as a read-only array."""
    data = np.arange(5 * elements, dtype=np.float64).reshape(5, elements)  # 5 rows: no multiple of 3 needed
    with DataSender(address, dataset_name="fb", num_shards=3, full_batch=True) as sender:
        assert sender.full_batch
        receivers = [DataReceiver(address, dataset_name="fb", shard_id=i) for i in range(3)]
        try:
            sender.send(data)
            for receiver in receivers:
                got = receiver.recv(timeout=10)
                np.testing.assert_array_equal(got, data)
                assert not got.flags.writeable, f"shard {receiver.shard_id} got a writable array"
                with pytest.raises(ValueError):
                    got[0, 0] = -1.0
        finally:
            for receiver in receivers:
                receiver.close()


def test_full_batch_arena_arrays_are_views_of_one_object(broker: int) -> None:
    """With full_batch the large arrays the shards receive are views of one stored object, not copies."""
    data = np.arange(4 * BIG, dtype=np.float64).reshape(4, BIG)
    with DataSystem(ADDRESS) as ds, DataSender(ADDRESS, dataset_name="fb", num_shards=2, full_batch=True) as sender:
        with DataReceiver(ADDRESS, dataset_name="fb", shard_id=0) as rx0, DataReceiver(
            ADDRESS, dataset_name="fb", shard_id=1
        ) as rx1:
            sender.send(data)
            assert ds.stats().objects == 1
            a, b = rx0.recv(timeout=10), rx1.recv(timeout=10)
            assert a.base is not None and b.base is not None
            assert a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            del a, b


# -- DataFrame round-trips ---------------------------------------------------------------


def _rich_frame(rows: int, index: str) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    idx: pd.Index
    if index == "str":
        idx = pd.Index([f"row-{i}" for i in range(rows)], name="key")
    elif index == "datetime":
        idx = pd.date_range("2024-03-30", periods=rows, freq="h", name="when")
    else:
        idx = pd.RangeIndex(10, 10 + 2 * rows, 2)
    ints = pd.array(rng.integers(-1000, 1000, rows), dtype="Int64")
    ints[::7] = pd.NA
    return pd.DataFrame(
        {
            "int": rng.integers(0, 1 << 40, rows),
            "float": rng.random(rows),
            "text": [f"text {i} é" if i % 5 else None for i in range(rows)],
            "string": pd.array([f"s{i}" for i in range(rows)], dtype="string"),
            "cat": pd.Categorical(rng.choice(["red", "green", "blue"], rows), categories=["blue", "green", "red"], ordered=True),
            "when": pd.date_range("2024-10-27 00:30", periods=rows, freq="37min", tz="Europe/Berlin"),
            "nullable": ints,
            "flag": rng.random(rows) > 0.5,
        },
        index=idx,
    )


@pytest.mark.parametrize("index", ["str", "datetime", "range-step"])
@pytest.mark.parametrize("rows", [12, 20_000], ids=["inline", "arena"])
def test_rich_dataframe_round_trips_exactly(address: str, rows: int, index: str) -> None:
    """A DataFrame with string, categorical, tz-aware, nullable Int64 columns and its index arrives equal."""
    df = _rich_frame(rows, index)
    with DataSender(address, dataset_name="df") as sender, DataReceiver(address, dataset_name="df") as receiver:
        sender.send(df)
        pd.testing.assert_frame_equal(receiver.recv(timeout=10), df, check_exact=True)


@pytest.mark.parametrize("index", ["str", "datetime", "range-step"])
@pytest.mark.parametrize("rows", [12, 20_000], ids=["inline", "arena"])
def test_rich_dataframe_split_over_two_shards_round_trips(address: str, rows: int, index: str) -> None:
    """A rich DataFrame split over 2 shards arrives as exactly df.iloc[:n/2] and df.iloc[n/2:]."""
    df = _rich_frame(rows, index)
    half = rows // 2
    with DataSender(address, dataset_name="df2", num_shards=2) as sender, DataReceiver(
        address, dataset_name="df2", shard_id=0
    ) as rx0, DataReceiver(address, dataset_name="df2", shard_id=1) as rx1:
        sender.send(df)
        pd.testing.assert_frame_equal(rx0.recv(timeout=10), df.iloc[:half], check_exact=True)
        pd.testing.assert_frame_equal(rx1.recv(timeout=10), df.iloc[half:], check_exact=True)


# -- namespaces --------------------------------------------------------------------------


def test_same_name_in_two_namespaces_is_two_channels(address: str) -> None:
    """Channels of the same dataset_name in two namespaces coexist and never see each other's data."""
    with DataSender(address, namespace="a", dataset_name="ds") as tx_a, DataSender(
        address, namespace="b", dataset_name="ds", num_shards=2
    ) as tx_b:
        with DataReceiver(address, namespace="a", dataset_name="ds", prefetch=1) as rx_a, DataReceiver(
            address, namespace="b", dataset_name="ds", shard_id=1
        ) as rx_b:
            tx_a.send(["from a"])
            tx_a.send(["again a"])
            tx_b.send(["b0", "b1"])
            assert (rx_a.num_shards, rx_b.num_shards) == (1, 2)
            assert rx_b.recv(timeout=10) == ["b1"]
            assert rx_a.recv(timeout=10) == ["from a"]
            assert len(tx_a.get_queue(0)) == 1
            assert tx_b.get_queue() == {0: tx_b.get_queue(0), 1: []}
            with pytest.raises(ChannelTimeout):
                rx_b.recv(timeout=0)


# -- peek and get_queue ------------------------------------------------------------------


def test_peek_returns_head_without_removing_it(address: str) -> None:
    """peek returns the oldest object and leaves it queued; the next recv returns the same object."""
    with DataSender(address, dataset_name="peek") as sender, DataReceiver(address, dataset_name="peek", prefetch=1) as receiver:
        sender.send(np.full(BIG, 1.0))
        sender.send([2])
        keys = sender.get_queue(0)
        first = receiver.peek(timeout=10)
        np.testing.assert_array_equal(first, np.full(BIG, 1.0))
        np.testing.assert_array_equal(receiver.peek(timeout=10), first)
        assert sender.get_queue(0) == keys
        np.testing.assert_array_equal(receiver.recv(timeout=10), first)
        assert receiver.peek(timeout=10) == [2]
        assert receiver.recv(timeout=10) == [2]
        assert receiver.get_queue(0) == []
        # The receiver's note that [2] was handed out goes on its own connection; another
        # connection's look sees it a moment later.
        wait_until(lambda: sender.get_queue(0) == [], 10, "the sender to see [2] handed out")


def test_get_queue_shows_keys_per_shard_and_shrinks_after_recv(address: str) -> None:
    """get_queue maps each shard to its unconsumed keys, oldest first; a recv removes the head of its shard only."""
    with DataSender(address, dataset_name="q", num_shards=2) as sender, DataReceiver(
        address, dataset_name="q", shard_id=0, prefetch=1
    ) as rx0:
        assert sender.get_queue() == {0: [], 1: []}
        for i in range(3):
            sender.send([2 * i, 2 * i + 1])
        queues = sender.get_queue()
        assert sorted(queues) == [0, 1]
        assert all(len(keys) == 3 and all(isinstance(k, str) for k in keys) for keys in queues.values())
        assert len(set(queues[0]) | set(queues[1])) == 6
        assert rx0.get_queue() == queues
        assert rx0.get_queue(1) == sender.get_queue(1) == queues[1]
        assert rx0.recv(timeout=10) == [0]
        assert sender.get_queue() == {0: queues[0][1:], 1: queues[1]}
        assert rx0.get_queue(0) == queues[0][1:]


# -- timeouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["recv", "peek"])
@pytest.mark.parametrize("timeout", [0, 0.05])
def test_recv_on_empty_shard_times_out(address: str, method: str, timeout: float) -> None:
    """recv/peek on an empty shard raise ChannelTimeout (a TimeoutError) once the timeout runs out."""
    with DataSender(address, dataset_name="empty", num_shards=2) as sender, DataReceiver(
        address, dataset_name="empty", shard_id=1
    ) as receiver:
        with pytest.raises(
            TimeoutError,
            match=exact(f"{method} timed out after {float(timeout)} s: shard 1 of default/empty stayed empty"),
        ) as info:
            getattr(receiver, method)(timeout=timeout)
        assert isinstance(info.value, ChannelTimeout)
        sender.send([1, 2])
        assert getattr(receiver, method)(timeout=10) == [2]


@pytest.mark.parametrize("timeout", [0, 0.05])
@pytest.mark.parametrize("elements", [4, BIG], ids=["inline", "arena"])
def test_send_to_full_queue_times_out_and_enqueues_nothing(address: str, timeout: float, elements: int) -> None:
    """send to a full queue raises ChannelTimeout after its timeout, enqueues nothing, and the stream goes on in order."""
    with DataSender(address, dataset_name="full", max_queue_size=2) as sender, DataReceiver(
        address, dataset_name="full", prefetch=1
    ) as receiver:
        sender.send(np.full(elements, 0.0))
        sender.send(np.full(elements, 1.0))
        keys = sender.get_queue(0)
        with pytest.raises(
            TimeoutError,
            match=exact(
                f"send timed out after {float(timeout)} s: a queue of default/full stayed full "
                "(max_queue_size=2); nothing was enqueued"
            ),
        ) as info:
            sender.send(np.full(elements, -1.0), timeout=timeout)
        assert isinstance(info.value, ChannelTimeout)
        assert sender.get_queue(0) == keys
        np.testing.assert_array_equal(receiver.recv(timeout=10), np.full(elements, 0.0))
        sender.send(np.full(elements, 2.0), timeout=0)
        for value in (1.0, 2.0):
            np.testing.assert_array_equal(receiver.recv(timeout=10), np.full(elements, value))
        assert sender.get_queue(0) == []


def test_timed_out_send_gives_its_memory_back(broker: int) -> None:
    """A large send that times out on a full queue leaves the store as it was."""
    with DataSystem(ADDRESS) as ds, DataSender(ADDRESS, dataset_name="full", max_queue_size=1) as sender:
        sender.send(np.zeros(BIG))
        before = ds.stats()
        with pytest.raises(ChannelTimeout):
            sender.send(np.ones(BIG), timeout=0.05)
        after = ds.stats()
        assert (after.used, after.objects) == (before.used, before.objects)


def test_send_with_zero_timeout_to_non_full_queue_succeeds(address: str) -> None:
    """send(timeout=0) enqueues at once while the queue has room."""
    with DataSender(address, dataset_name="room", num_shards=2, max_queue_size=2) as sender, DataReceiver(
        address, dataset_name="room", shard_id=1
    ) as receiver:
        sender.send([1, 2], timeout=0)
        sender.send(np.arange(2 * BIG, dtype=np.float64).reshape(2, BIG), timeout=0)
        assert {k: len(v) for k, v in sender.get_queue().items()} == {0: 2, 1: 2}
        assert receiver.recv(timeout=0) == [2]
        np.testing.assert_array_equal(receiver.recv(timeout=0), np.arange(BIG, 2 * BIG, dtype=np.float64).reshape(1, BIG))


# -- end of stream -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["recv", "peek"])
def test_after_close_receivers_drain_then_get_channel_closed(address: str, method: str) -> None:
    """After the sender's close(), each shard's receiver gets what was queued, then recv/peek raise ChannelClosed."""
    sender = DataSender(address, dataset_name="eos", num_shards=2)
    with DataReceiver(address, dataset_name="eos", shard_id=0) as rx0, DataReceiver(
        address, dataset_name="eos", shard_id=1
    ) as rx1:
        with sender:
            sender.send([0, 1])
            sender.send(np.arange(2 * BIG).reshape(2, BIG))
        assert sender.closed
        for shard, receiver in enumerate((rx0, rx1)):
            assert receiver.recv(timeout=10) == [shard]
            np.testing.assert_array_equal(receiver.recv(timeout=10), np.arange(shard * BIG, (shard + 1) * BIG).reshape(1, BIG))
            for _ in range(2):  # it stays ended
                with pytest.raises(
                    ChannelClosed,
                    match=exact(f"channel default/eos was closed by its sender and shard {shard} is drained"),
                ):
                    getattr(receiver, method)(timeout=10)


def test_iteration_ends_at_end_of_stream(address: str) -> None:
    """`for obj in receiver` yields every queued object in order and ends after the sender's close()."""
    with DataSender(address, dataset_name="iter", max_queue_size=12) as sender, DataReceiver(address, dataset_name="iter") as receiver:
        for i in range(12):
            sender.send(_item(i))
        sender.close()
        count = 0
        for i, obj in enumerate(receiver):
            _check_item(obj, i)
            count += 1
        assert count == 12


def test_blocked_recv_ends_when_sender_closes_in_another_process(address: str) -> None:
    """A receiver blocked on an empty shard gets the last objects and then ChannelClosed when a child sender closes."""
    proc = start_process(_send_numbered, address, "eos-child", 3, 10)
    with DataReceiver(address, dataset_name="eos-child", wait=60) as receiver:
        got = list(receiver)
    join_ok(proc)
    for i, obj in enumerate(got):
        _check_item(obj, i)
    assert len(got) == 3


# -- backpressure ------------------------------------------------------------------------


def test_sender_blocks_while_queue_full_until_receiver_consumes(address: str) -> None:
    """With max_queue_size=3 a sender in a child stays exactly 3 objects ahead of a slow receiver; all 20 arrive in order."""
    proc = start_process(_send_numbered, address, "bp", 20, 3)
    depths: list[int] = []

    def depth(receiver: DataReceiver) -> int:
        depths.append(len(receiver.get_queue(0)))
        return depths[-1]

    with DataReceiver(address, dataset_name="bp", wait=60, prefetch=1) as receiver:
        for i in range(20):
            ahead = min(3, 20 - i)
            wait_until(lambda: depth(receiver) == ahead, 10, f"{ahead} objects queued before recv {i}")
            # The sender is blocked on the full queue: it has not sent more than 3 ahead of us.
            assert _channel_status(address, "bp")["sent_objects"] == i + ahead
            assert depth(receiver) == ahead
            _check_item(receiver.recv(timeout=10), i)
        with pytest.raises(ChannelClosed):
            receiver.recv(timeout=10)
    join_ok(proc)
    assert max(depths) == 3


# -- waiting for a sender ----------------------------------------------------------------


def test_receiver_waits_for_sender_to_appear(address: str) -> None:
    """A receiver created with wait=60 before its sender exists connects once a child process creates the sender."""
    if address == ADDRESS:
        wait_until(lambda: (daemon.status() or {}).get("clients") == 1, 10, "no client but the status query")
    assert not _receiver_waits(address, "late")
    proc = start_process(_send_once_a_receiver_waits, address, "late")
    with DataReceiver(address, dataset_name="late", wait=60) as receiver:
        assert receiver.num_shards == 1
        assert receiver.recv(timeout=10) == [42]
        with pytest.raises(ChannelClosed):
            receiver.recv(timeout=10)
    join_ok(proc)
