"""A channel's life: taken over by a new sender, collected once nobody uses it (issue 13, item 6).

- A new sender of a channel whose sender left goes on with its stream; while objects are
  queued or receivers are attached, another shape (num_shards, full_batch,
  max_queue_size) is refused, naming what is queued and which receiver holds what. Before,
  a new shape was taken while receivers held objects of the old one: the broker failed
  with an IndexError when they left, leaked their objects, and drove queue depths negative.
- Only an attached receiver takes objects: a raw ``recv`` or ``peek`` without ``open`` is
  refused. Before, such a client drained the channel without being counted, and the
  channel was never collected, so the broker never idled out.
- A broker that recovers a dead one's journal does not keep the channels that hold nothing.

Each test ends with nothing stored, no channel left, and no internal error in the broker log.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import signal
import socket
import weakref
from typing import Any, Iterator

import numpy as np
import pytest

import shmchannel
from shmchannel import ChannelClosed, DataReceiver, DataSender, DataSystem, InvalidArgument, config
from shmchannel.broker import daemon, protocol, rules
from shmchannel.testing import start_idle_broker, wait_until

from .conftest import ADDRESS

pytestmark = pytest.mark.timeout(60)  # each takes a second or two; this only bounds a hang

#: Idle timeout of the brokers that are expected to exit (seconds).
QUICK_IDLE = 1.0


def exact(message: str) -> str:
    return f"^{re.escape(message)}$"


def _refusal(name: str, current: str, uses: str, wanted: str) -> str:
    return (
        f"channel default/{name} is in use with {current}: {uses}; a new sender must use the same "
        f"until its objects are consumed and its receivers have left, got {wanted}"
    )


def _shape(num_shards: int = 1, full_batch: bool = False, max_queue_size: int = 10) -> str:
    return f"num_shards={num_shards}, full_batch={full_batch}, max_queue_size={max_queue_size}"


def _entry(address: str, name: str) -> dict[str, Any] | None:
    """The status of channel default/``name``, None if there is none."""
    report = shmchannel.status(address) or {}
    channels: list[dict[str, Any]] = report.get("channels", [])  # type: ignore[assignment]
    return next((c for c in channels if c["dataset_name"] == name), None)


@contextlib.contextmanager
def _leaving(address: str, name: str, **shape: Any) -> Iterator[Any]:
    """A sender of default/``name`` for the block (a weak proxy: the block keeps no
    reference), which then goes without close(), as a producer that crashed would: its
    stream stays open, its objects queued. Returns once the broker has seen it leave."""
    sender = DataSender(address, dataset_name=name, **shape)
    try:
        yield weakref.proxy(sender)
    except BaseException:
        sender.close()
        raise
    with pytest.warns(ResourceWarning, match=r"was never closed"):
        del sender
        gc.collect()
    wait_until(lambda: not (_entry(address, name) or {"sender": False})["sender"], 30, "the sender to leave")


def _log() -> str:
    return (config.runtime_dir() / "broker.log").read_text(errors="replace")


def _assert_clean(ds: DataSystem, name: str) -> None:
    """Nothing stored, no channel ``name`` left, no internal error logged."""
    wait_until(lambda: _entry(ADDRESS, name) is None, 10, f"channel {name} to be collected")
    stats = ds.stats()
    assert (stats.used, stats.objects) == (0, 0), stats
    log = _log()
    assert not _internal_errors(log), log
    assert "Traceback" not in log and "malformed" not in log, log


def _internal_errors(log: str) -> list[str]:
    """Lines at ERROR or worse, but for a starting broker that found a dead broker's journal
    gone before it could read it: other test runs on this machine share /dev/shm, and
    their brokers come and go."""
    return [
        line for line in log.splitlines()
        if re.match(r"\S+ \S+ \d+ (ERROR|CRITICAL) ", line) and not re.search(r"cannot read \S+-journal, .*FileNotFoundError", line)
    ]


def _name(what: str) -> str:
    return f"{what}-{os.getpid()}"


@pytest.fixture
def quick_idle(_isolated: str) -> int:
    """A broker that exits QUICK_IDLE s after it has no client, channel or object."""
    os.environ["SHMCHANNEL_IDLE_TIMEOUT"] = str(QUICK_IDLE)  # the _isolated fixture restores it
    return start_idle_broker()


def _exits_when_idle(ds: DataSystem) -> None:
    """Close ``ds`` (the broker's last client) and see the broker exit within its idle timeout."""
    pid = int((shmchannel.status(ADDRESS) or {})["pid"])  # type: ignore[call-overload]
    ds.close()
    wait_until(lambda: not daemon.pid_alive(pid), QUICK_IDLE + 10, f"idle broker {pid} to exit")
    assert config.our_shm_entries(pid) == []


# -- a new shape under a channel in use ---------------------------------------------------


def test_new_shape_is_refused_while_a_receiver_holds_an_object(address: str) -> None:
    """The issue's input: a 4-shard channel whose shard-3 receiver holds an unacknowledged
    object, its sender gone; a sender with num_shards=1 is refused, naming the receiver and
    what it holds. When that receiver leaves, the channel is collected with its object and
    the name takes the new shape."""
    name = _name("holder")
    with _leaving(address, name, num_shards=4) as sender:
        sender.send(np.arange(4).reshape(4, 1))
    for shard in range(3):
        with DataReceiver(address, dataset_name=name, shard_id=shard) as receiver:
            assert receiver.recv(timeout=30).tolist() == [[shard]]
    holder = DataReceiver(address, dataset_name=name, shard_id=3)
    assert holder.recv(timeout=30).tolist() == [[3]]
    who = f"pid {os.getpid()} " if address == ADDRESS else ""
    refusal = _refusal(name, _shape(4), f"receiver {who}of shard 3 holds 1 object not acknowledged", _shape(1))
    with pytest.raises(InvalidArgument, match=exact(refusal)):
        DataSender(address, dataset_name=name, num_shards=1)
    holder.close()
    wait_until(lambda: _entry(address, name) is None, 30, f"channel {name} to be collected")
    with DataSender(address, dataset_name=name, num_shards=1) as again:
        again.send([1])
        assert len(again.get_queue(0)) == 1
    with DataReceiver(address, dataset_name=name) as receiver:
        assert receiver.recv(timeout=30) == [1]
    if address == ADDRESS:
        with DataSystem(ADDRESS) as ds:
            _assert_clean(ds, name)


def test_new_shape_is_refused_while_a_receiver_has_prefetched_objects(broker: int) -> None:
    """A 2-shard channel whose shard-0 receiver holds an object, its sender gone: 3 shards
    are refused, naming what is queued and what the receiver holds (on the embedded
    backend a receiver claims one object at a time, whatever its ``prefetch``); a sender of
    the same shape goes on, and the queue bounds hold throughout (no negative depth, none
    past max_queue_size)."""
    name = _name("prefetched")
    with _leaving(ADDRESS, name, num_shards=2, max_queue_size=4) as sender:
        for i in range(4):
            sender.send(np.array([[i], [10 + i]]))
        receiver = DataReceiver(ADDRESS, dataset_name=name, prefetch=8)
        assert receiver.recv(timeout=30).tolist() == [[0]]
    assert _entry(ADDRESS, name)["depths"] == [3, 4]  # type: ignore[index]
    refusal = _refusal(
        name, _shape(2, max_queue_size=4),
        f"7 objects queued, receiver pid {os.getpid()} of shard 0 holds 1 object not acknowledged",
        _shape(3, max_queue_size=4),
    )
    with pytest.raises(InvalidArgument, match=exact(refusal)):
        DataSender(ADDRESS, dataset_name=name, num_shards=3, max_queue_size=4)
    with DataSender(ADDRESS, dataset_name=name, num_shards=2, max_queue_size=4) as again:
        with pytest.raises(TimeoutError):
            again.send(np.array([[4], [14]]), timeout=0)  # shard 1 is full
        assert receiver.recv(timeout=30).tolist() == [[1]]
        receiver.close()  # [2] and [3] go back to the head of shard 0
        assert _entry(ADDRESS, name)["depths"] == [2, 4]  # type: ignore[index]
        with DataReceiver(ADDRESS, dataset_name=name, shard_id=1) as second:
            assert [second.recv(timeout=30).tolist() for _ in range(4)] == [[[10 + i]] for i in range(4)]
            again.send(np.array([[4], [14]]), timeout=30)
            assert second.recv(timeout=30).tolist() == [[14]]
        depths = _entry(ADDRESS, name)["depths"]  # type: ignore[index]
        assert depths == [3, 0], depths
    with DataReceiver(ADDRESS, dataset_name=name) as first:
        assert [first.recv(timeout=30).tolist() for _ in range(3)] == [[[2]], [[3]], [[4]]]
        with pytest.raises(ChannelClosed):
            first.recv(timeout=30)
    with DataSystem(ADDRESS) as ds:
        _assert_clean(ds, name)


def test_new_shape_is_refused_while_a_receiver_is_attached(broker: int) -> None:
    """A receiver attached to shard 1 of an empty 2-shard channel whose sender left holds
    nothing, yet reads with the old shape: a 1-shard sender is refused until it leaves."""
    name = _name("attached")
    with _leaving(ADDRESS, name, num_shards=2):
        receiver = DataReceiver(ADDRESS, dataset_name=name, shard_id=1)
    refusal = _refusal(name, _shape(2), f"receiver pid {os.getpid()} of shard 1 holds nothing", _shape(1))
    with pytest.raises(InvalidArgument, match=exact(refusal)):
        DataSender(ADDRESS, dataset_name=name, num_shards=1)
    with pytest.raises(TimeoutError):
        receiver.recv(timeout=0)
    receiver.close()
    with DataSender(ADDRESS, dataset_name=name, num_shards=1):
        pass
    with DataSystem(ADDRESS) as ds:
        _assert_clean(ds, name)


@pytest.mark.parametrize(
    ("changed", "shown"),
    [({"num_shards": 2}, _shape(2)), ({"full_batch": True}, _shape(full_batch=True)),
     ({"max_queue_size": 3}, _shape(max_queue_size=3))],
    ids=["num_shards", "full_batch", "max_queue_size"],
)
def test_new_shape_is_refused_while_objects_are_queued(broker: int, changed: dict[str, Any], shown: str) -> None:
    """Objects queued by a sender that left keep the channel's shape, each field of it; a
    sender of the same shape goes on with the stream."""
    name = _name("queued")
    with _leaving(ADDRESS, name) as sender:
        sender.send([0])
    with pytest.raises(InvalidArgument, match=exact(_refusal(name, _shape(), "1 object queued", shown))):
        DataSender(ADDRESS, dataset_name=name, **changed)
    with DataSender(ADDRESS, dataset_name=name) as again:
        again.send([1])
    with DataReceiver(ADDRESS, dataset_name=name) as receiver:
        assert [receiver.recv(timeout=30), receiver.recv(timeout=30)] == [[0], [1]]
    with DataSystem(ADDRESS) as ds:
        _assert_clean(ds, name)


# -- requests of a client that never opened the channel ---------------------------------------


def _raw() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(config.socket_path()))
    return sock


def _frame(msg: dict[str, Any]) -> bytes:
    return b"".join(protocol.encode(msg))


def _replies(sock: socket.socket, count: int) -> Iterator[dict[str, Any]]:
    data = b""
    for _ in range(count):
        while True:
            if len(data) >= protocol.HEAD.size:
                json_len, payload_len = protocol.parse_head(data[: protocol.HEAD.size])
                end = protocol.HEAD.size + json_len + payload_len
                if len(data) >= end:
                    break
            chunk = sock.recv(65536)
            assert chunk, "the broker closed the connection"
            data += chunk
        yield protocol.parse_body(data[protocol.HEAD.size : protocol.HEAD.size + json_len], request=False)
        data = data[end:]


def _closed_channel_with_one_object(name: str) -> str:
    """default/``name``: one object queued, its stream ended; the object's key."""
    with DataSender(ADDRESS, dataset_name=name) as sender:
        sender.send(np.zeros(1 << 16))  # through the arena: a hold would keep its block
        (key,) = sender.get_queue(0)
    return str(key)


def test_requests_without_open_touch_nothing_and_the_broker_idles_out(quick_idle: int) -> None:
    """Requests naming a channel a client never opened -- a detach (also one naming a claim
    log and receiver), a queue listing -- leave it as it was; once a receiver drains it,
    the channel is collected and the broker exits when idle (issue 13: a channel drained
    by a client that never opened it stayed for good, and the broker with it)."""
    name = _name("untouched")
    ds = DataSystem(ADDRESS)
    key = _closed_channel_with_one_object(name)
    ident = {"namespace": "default", "dataset_name": name, "shard": 0}
    with _raw() as sock:
        sock.sendall(b"".join(_frame(msg) for msg in [
            {"op": "queue", **ident}, {"op": "detach", **ident}, {"op": "detach", **ident, "claimer": 1, "receiver": 1},
            {"op": "queue", **ident},
        ]))
        replies = list(_replies(sock, 4))
    # (A claim log not the client's own names nothing of it: nothing to give back.)
    assert replies == [{"ok": True, "queue": [key]}, {"ok": True}, {"ok": True}, {"ok": True, "queue": [key]}]
    with DataReceiver(ADDRESS, dataset_name=name) as receiver:
        assert receiver.recv(timeout=30).shape == (1 << 16,)
        with pytest.raises(ChannelClosed):
            receiver.recv(timeout=30)
    _assert_clean(ds, name)
    _exits_when_idle(ds)


# -- after a broker restart -------------------------------------------------------------------


def test_a_channel_holding_nothing_is_not_restored(broker: int) -> None:
    """A broker SIGKILLed with a channel that holds nothing (its objects all consumed) and
    one with an object queued: the next broker restores only the latter, with its shape,
    and exits when idle once that is consumed. The latter's sender closed after the
    broker died: its end of stream stands (it is in shared memory), so a new sender is
    refused until the channel is drained."""
    empty, full = _name("empty"), _name("full")
    with DataSender(ADDRESS, dataset_name=empty) as sender, DataSender(
        ADDRESS, dataset_name=full, num_shards=2
    ) as keeper, DataReceiver(ADDRESS, dataset_name=empty) as receiver:
        sender.send([0])
        keeper.send(np.arange(2).reshape(2, 1))
        assert receiver.recv(timeout=30) == [0]
        receiver.ack()
        assert receiver.get_queue(0) == []  # a round trip: the broker has had the ack
        os.kill(broker, signal.SIGKILL)
        wait_until(lambda: not daemon.pid_alive(broker), 10, "the broker to die")
    os.environ["SHMCHANNEL_IDLE_TIMEOUT"] = str(QUICK_IDLE)  # the _isolated fixture restores it
    ds = DataSystem(ADDRESS)  # starts the next broker, which recovers
    assert [c["dataset_name"] for c in (shmchannel.status(ADDRESS) or {})["channels"]] == [full]  # type: ignore[index]
    refusal = f"dataset_name {full!r} in namespace 'default' was closed and is still being drained"
    with pytest.raises(InvalidArgument, match=exact(refusal)):
        DataSender(ADDRESS, dataset_name=full, num_shards=1)
    for shard in range(2):
        with DataReceiver(ADDRESS, dataset_name=full, shard_id=shard) as receiver:
            assert receiver.recv(timeout=30).tolist() == [[shard]]
            with pytest.raises(ChannelClosed):
                receiver.recv(timeout=30)
    _assert_clean(ds, full)
    _exits_when_idle(ds)


def test_a_refused_shape_changes_nothing(broker: int) -> None:
    """A refused new shape changes nothing: the channel's status is the same after."""
    name = _name("unchanged")
    with _leaving(ADDRESS, name, num_shards=2) as sender:
        sender.send(np.arange(2).reshape(2, 1))
    before = _entry(ADDRESS, name)
    with pytest.raises(InvalidArgument):
        DataSender(ADDRESS, dataset_name=name, num_shards=3, full_batch=True, max_queue_size=2)
    after = _entry(ADDRESS, name)
    for figures in (before, after):
        assert figures is not None
        figures.pop("rates")
    assert json.dumps(before, sort_keys=True) == json.dumps(after, sort_keys=True)
    for shard in range(2):
        with DataReceiver(ADDRESS, dataset_name=name, shard_id=shard) as receiver:
            assert receiver.recv(timeout=30).tolist() == [[shard]]
    with DataSystem(ADDRESS) as ds:
        _assert_clean(ds, name)


def test_a_refusal_names_holders_first_and_at_most_a_few_receivers() -> None:
    """With many receivers, the refusal names those holding objects first and MAX_NAMED in
    all, then counts the rest."""
    receivers = [rules.ReceiverUse(shard, holds, f"pid {100 + shard}") for shard, holds in enumerate([0, 2, 0, 1, 0, 0])]
    message = _refusal(
        "n", _shape(6), "receiver pid 101 of shard 1 holds 2 objects not acknowledged, receiver pid 103 of shard 3 "
        "holds 1 object not acknowledged, receiver pid 100 of shard 0 holds nothing, receiver pid 102 of shard 2 "
        "holds nothing, 2 more receivers", _shape(3),
    )
    with pytest.raises(InvalidArgument, match=exact(message)):
        rules.check_new_sender(
            "default", "n", attached=False, closed=False, current=rules.Shape(6, False, 10),
            wanted=rules.Shape(3, False, 10), queued=0, receivers=receivers,
        )
    rules.check_new_sender(  # the same shape goes on, whatever is in use
        "default", "n", attached=False, closed=False, current=rules.Shape(6, False, 10),
        wanted=rules.Shape(6, False, 10), queued=5, receivers=receivers,
    )
