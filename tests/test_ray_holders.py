"""The Ray backend's holders: a channel's large objects live on the node of the sender that
made them, owned by the sender until that node's holder (``backends/ray/holder.py``) adopts
them -- once they waited ``SHMCHANNEL_RAY_ADOPT_AFTER`` seconds, or when the sender closes --
never by the channel's actor.

The session's Ray cluster has two nodes on this machine (two raylets, each with its own
object store), told apart by the custom resources ``node_a`` (the head, where this test
process is a driver) and ``node_b``. How much of a node's object store is used is read from
its plasma store's own figures (``log_plasma_usage`` in a task pinned to that node: Ray's
``memory_summary`` needs grpc, which the Ray extra does not install).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from shmchannel import ChannelClosed, DataReceiver, DataSender, InvalidArgument, ObjectLost
from shmchannel.testing import join_ok, start_process, wait_until

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'shmchannel[ray]')")

MIB = 1 << 20


# -- helpers -----------------------------------------------------------------------------


def _nodes() -> dict[str, str]:
    """Node id of each of the session's two nodes, by its custom resource."""
    found = {res: node["NodeID"] for node in ray.nodes() if node["Alive"]
             for res in ("node_a", "node_b") if res in node["Resources"]}
    assert set(found) == {"node_a", "node_b"}, found
    return found


@ray.remote(num_cpus=0)
def _plasma_usage() -> dict[str, int]:
    """The figures of the object store of the node this task runs on ("bytes in use",
    "bytes evictable", "objects received", ...), as its plasma store reports them."""
    import logging

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("ray._raylet")
    logger.addHandler(handler)
    try:
        ray._private.worker.global_worker.core_worker.log_plasma_usage()
    finally:
        logger.removeHandler(handler)
    (report,) = [m for m in messages if m.startswith("Plasma Store Usage")]
    return {key: int(value) for key, value in re.findall(r"^- ([a-z ]+): (\d+)$", report, re.M)}


def _store(resource: str) -> dict[str, int]:
    """``_plasma_usage`` of the node with ``resource``."""
    return ray.get(_plasma_usage.options(resources={resource: 1}).remote(), timeout=60)


def _allocated(usage: dict[str, int]) -> int:
    """Bytes of objects in a node's store, whatever their state."""
    return usage["bytes in use"] + usage["bytes evictable"] + usage["bytes unsealed"]


def _actor_node(handle: Any) -> str:
    """The id of the node an actor runs on (the GCS's actor table: no dashboard needed)."""
    return str(ray._private.state.actors(handle._actor_id.hex())["Address"]["NodeID"])


def _holder(node: str) -> Any:
    """The holder of ``node``, or None."""
    from shmchannel.backends.ray.cluster import HOLDER, SHARED_NAMESPACE

    try:
        return ray.get_actor(HOLDER + node, namespace=SHARED_NAMESPACE)
    except ValueError:
        return None


def _kill_holder(node: str) -> None:
    """Kill the holder of ``node`` if there is one, and wait until its name is free."""
    holder = _holder(node)
    if holder is not None:
        ray.kill(holder)
        wait_until(lambda: _holder(node) is None, 30, f"the holder of node {node} to be gone")


def _channel_actor(name: str) -> Any:
    from shmchannel.backends.ray.actors import actor_name

    try:
        return ray.get_actor(actor_name(name), namespace="default")
    except ValueError:
        return None


def _status(name: str) -> dict[str, Any]:
    return ray.get(_channel_actor(name).status.remote(), timeout=30)


def _wait_adopted(name: str) -> None:
    """Wait until the holders adopted every object the channel queues or lends."""
    wait_until(lambda: _status(name)["unadopted_bytes"] == 0, 30, f"the objects of {name} to be adopted")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmchannel", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))


# -- 1. no second hop ----------------------------------------------------------------------


# ADOPT_AFTER 0.2 s: the objects waiting halfway are adopted (a worker of its own: Ray reuses
# a task's worker process, environment and all)
@ray.remote(num_cpus=0, resources={"node_b": 1}, runtime_env={"env_vars": {"SHMCHANNEL_RAY_ADOPT_AFTER": "0.2"}})
def _send_on_b(name: str, count: int, nbytes: int, max_queue_size: int) -> str:
    with DataSender("ray:auto", dataset_name=name, max_queue_size=max_queue_size) as sender:
        for i in range(count):
            sender.send(np.full(nbytes, i, dtype=np.uint8))
    return str(ray.get_runtime_context().get_node_id())


@ray.remote(num_cpus=0, resources={"node_b": 1})
def _receive_on_b_and_look(name: str, count: int, prefetch: int, queued: int) -> dict[str, Any]:
    """Receive ``count`` objects; each time the receiver's buffer is filled (one call to the
    channel actor), ask Ray where every object in it is. Once ``queued`` objects wait in the
    channel's queue (halfway through) and were adopted, read the object store of node_a and
    the channel's ``held_bytes``."""
    seen, where, halfway = [], {}, None
    with DataReceiver("ray:auto", dataset_name=name, prefetch=prefetch, wait=60) as receiver:
        endpoint = receiver._endpoint
        for i in range(count):
            if not endpoint._buffer:
                endpoint.fetch(60)  # what recv would do; done here to see every reference
                held = [entry for entry in endpoint._buffer if not entry[1]]
                locations = ray.experimental.get_object_locations([e[2] for e in held], timeout_ms=30_000)
                for key, _, ref, node, _owner in held:
                    where[key] = (node, locations[ref]["node_ids"], locations[ref]["object_size"])
            block = receiver.recv(timeout=60)
            assert block.shape == (MIB,) and (block == i).all(), f"object {i} corrupted"
            seen.append(i)
            del block
            if i == count // 2:
                wait_until(lambda: len(receiver.get_queue(0)) >= queued, 60, f"{queued} objects queued")
                _wait_adopted(name)
                status = _status(name)
                halfway = {"node_a": _store("node_a"), "held_bytes": status["held_bytes"],
                           "queued": len(receiver.get_queue(0))}
    return {"node": str(ray.get_runtime_context().get_node_id()), "seen": seen, "where": where, "halfway": halfway}


def test_objects_stay_on_the_senders_node_when_the_channel_actor_is_elsewhere(ray_two_nodes: str) -> None:
    """No second hop: with the channel's actor on node_a and its sender and receiver on
    node_b, every object's bytes are on node_b only (Ray's object directory), whether its
    sender owns them or node_b's holder adopted them (those that waited halfway: ADOPT_AFTER
    0.2 s); node_a's object store takes none of them while they are queued, and
    the channel counts all queued bytes as held on node_b."""
    from shmchannel.backends.ray.actors import ChannelActor, actor_name

    nodes = _nodes()
    name = f"no-second-hop-{os.getpid()}"
    count, max_queue_size = 20, 4
    actor = ChannelActor.options(
        name=actor_name(name), namespace="default", lifetime="detached", get_if_exists=True, resources={"node_a": 1},
    ).remote("default", name)
    ray.get(actor.__ray_ready__.remote(), timeout=60)
    assert _actor_node(actor) == nodes["node_a"]
    before = _store("node_a")

    receiving = _receive_on_b_and_look.remote(name, count, 4, max_queue_size)
    try:
        sender_node = ray.get(_send_on_b.remote(name, count, MIB, max_queue_size), timeout=120)
        got = ray.get(receiving, timeout=120)
    finally:
        if not ray.wait([receiving], timeout=0)[0]:
            ray.cancel(receiving, force=True)  # the sender failed: do not leave it waiting

    assert sender_node == got["node"] == nodes["node_b"]
    assert got["seen"] == list(range(count))
    assert _actor_node(actor) == nodes["node_a"], "the sender or receiver made a channel actor of its own"
    assert len(got["where"]) == count, f"not every object was looked up: {sorted(got['where'])}"
    for key, (node, located, size) in got["where"].items():
        assert node == nodes["node_b"], f"object {key}: the channel names node {node} as its holder's"
        assert located == [nodes["node_b"]], f"object {key} ({size} bytes) is on {located}, not only on node_b"
        assert size > MIB, (key, size)
    halfway = got["halfway"]
    assert halfway["queued"] >= max_queue_size, halfway
    assert set(halfway["held_bytes"]) == {nodes["node_b"]}, halfway["held_bytes"]
    assert halfway["held_bytes"][nodes["node_b"]] >= max_queue_size * MIB, halfway["held_bytes"]
    on_a = halfway["node_a"]
    assert _allocated(on_a) - _allocated(before) < MIB, f"node_a's store took payload bytes: {on_a} (before: {before})"
    assert on_a["objects received"] == before["objects received"], f"objects were pulled to node_a: {on_a}"
    holder = _holder(nodes["node_b"])
    assert holder is not None and _actor_node(holder) == nodes["node_b"]
    assert ray.get(holder.stats.remote(), timeout=30)["adopted"] >= max_queue_size
    other = _holder(nodes["node_a"])
    if other is not None:
        served = [tuple(channel) for channel in ray.get(other.stats.remote(), timeout=30)["channels"]]
        assert ("default", name) not in served, "node_a's holder took objects of a sender on node_b"


# -- 2. a killed holder --------------------------------------------------------------------


@ray.remote(num_cpus=0, resources={"node_b": 1}, max_restarts=0)
class _SenderOnB:
    """A DataSender living on node_b between the test's steps (so that a receiver here, on
    node_a, must pull its objects through their owner: on its own node Ray may still read an
    object whose owner died, from the store, until the store frees it)."""

    def __init__(self, name: str, adopt_after: str = "1") -> None:
        os.environ["SHMCHANNEL_RAY_ADOPT_AFTER"] = adopt_after  # (read as the sender attaches)
        self.sender = DataSender("ray:auto", dataset_name=name, max_queue_size=20)

    def send(self, values: list[int], nbytes: int) -> list[str]:
        """Send an array of ``nbytes`` per value; the queue's keys once the puts are in."""
        for value in values:
            self.sender.send(np.full(nbytes, value, dtype=np.uint8))
        return list(self.sender.get_queue(0))

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.sender.close()


def _sigkill(actor: Any) -> None:
    """SIGKILL an actor's process (no close, no atexit) and wait until Ray knows it died."""
    os.kill(ray.get(actor.pid.remote(), timeout=30), signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.pid.remote(), timeout=30)


def test_receivers_of_a_killed_holders_objects_get_object_lost(ray_two_nodes: str) -> None:
    """Killing the holder that adopted three queued objects: each of their recvs raises
    ObjectLost within 5 s, naming the object's key, its node and its holder, and the next
    recv goes on (no hang); small objects sent after the kill travel inline and are received."""
    nodes = _nodes()
    name = f"killed-holder-{os.getpid()}"
    sender = _SenderOnB.remote(name)  # type: ignore[attr-defined]
    try:
        keys = ray.get(sender.send.remote([0, 1, 2], MIB), timeout=60)
        assert len(keys) == 3
        _wait_adopted(name)  # 1 s after they were queued
        holder = _holder(nodes["node_b"])
        assert holder is not None
        ray.kill(holder)
        wait_until(lambda: _holder(nodes["node_b"]) is None, 30, "the killed holder's name to be free")
        keys = ray.get(sender.send.remote([100, 101], 16), timeout=60)
        assert len(keys) == 5
        ray.get(sender.close.remote(), timeout=60)

        with DataReceiver(ray_two_nodes, dataset_name=name, wait=30) as receiver:
            for key in keys[:3]:
                start = time.monotonic()
                with pytest.raises(ObjectLost) as lost:
                    receiver.recv(timeout=30)
                took = time.monotonic() - start
                assert took < 5, f"ObjectLost for object {key} took {took:.1f} s"
                message = str(lost.value)
                assert f"object {key} " in message and nodes["node_b"] in message and "holder" in message, message
            for value in (100, 101):
                start = time.monotonic()
                got = receiver.recv(timeout=10)
                assert time.monotonic() - start < 5
                np.testing.assert_array_equal(got, np.full(16, value, dtype=np.uint8))
            with pytest.raises(ChannelClosed):
                receiver.recv(timeout=10)
    finally:
        ray.kill(sender)


def test_a_holder_dying_mid_stream_loses_only_what_it_adopted(ray_two_nodes: str) -> None:
    """The holder of a sender's node dies while the sender streams 1 MiB arrays: the five
    objects it had adopted raise ObjectLost at their recv; the sender never notices; the
    node's next holder adopts the five sent after, which arrive, in order."""
    nodes = _nodes()
    name = f"holder-dies-{os.getpid()}"
    sender = _SenderOnB.remote(name, "0.2")  # type: ignore[attr-defined]
    try:
        ray.get(sender.send.remote(list(range(5)), MIB), timeout=60)
        _wait_adopted(name)
        first = _holder(nodes["node_b"])
        _kill_holder(nodes["node_b"])
        ray.get(sender.send.remote(list(range(5, 10)), MIB), timeout=60)
        _wait_adopted(name)
        second = _holder(nodes["node_b"])
        assert second is not None and second._actor_id != first._actor_id
        ray.get(sender.close.remote(), timeout=60)
        with DataReceiver(ray_two_nodes, dataset_name=name, prefetch=1) as receiver:
            for _ in range(5):
                with pytest.raises(ObjectLost, match="holder"):
                    receiver.recv(timeout=30)
            got = [int(receiver.recv(timeout=30)[0]) for _ in range(5)]
            assert got == list(range(5, 10))
    finally:
        ray.kill(sender)


# -- 3. a SIGKILLed sender -----------------------------------------------------------------


def _sigkilled_sender(name: str, adopt_after: str, adopted: bool) -> list[str]:
    """Five 1 MiB arrays and an inline one sent from node_b, then the sender SIGKILLed
    (after its objects were adopted, with ``adopted``); the queue's keys."""
    sender = _SenderOnB.remote(name, adopt_after)  # type: ignore[attr-defined]
    try:
        ray.get(sender.send.remote([10, 11, 12, 13, 14], MIB), timeout=60)
        keys = ray.get(sender.send.remote([99], 16), timeout=60)
        if adopted:
            _wait_adopted(name)
        _sigkill(sender)
    finally:
        ray.kill(sender)
    assert len(keys) == 6
    return keys


def test_adopted_objects_outlive_their_sigkilled_sender(ray_two_nodes: str) -> None:
    """A sender process SIGKILLed after its five 1 MiB arrays were adopted (they waited
    SHMCHANNEL_RAY_ADOPT_AFTER, 1 s): a receiver on the other node still gets all five and
    the inline one, intact and in order."""
    name = f"killed-sender-{os.getpid()}"
    _sigkilled_sender(name, "1", adopted=True)
    with DataReceiver(ray_two_nodes, dataset_name=name, wait=10) as receiver:
        for i in range(5):
            got = receiver.recv(timeout=30)
            assert got.shape == (MIB,) and (got == 10 + i).all(), f"object {i} is not the one sent"
        assert (receiver.recv(timeout=30) == 99).all()
        assert receiver.get_queue(0) == []


@pytest.mark.parametrize("adopt_after", ["60", "2"], ids=["ray-finds", "holder-found"])
def test_objects_a_sigkilled_sender_still_owned_are_lost_and_named(ray_two_nodes: str, adopt_after: str) -> None:
    """A sender process SIGKILLed before its objects were adopted: each of the five recvs
    raises ObjectLost within 5 s naming the object and its sender, whether Ray finds the
    owner dead at the recv (ADOPT_AFTER 60 s) or the holder found it when it came to adopt
    them (2 s: then at once, without asking Ray again); the inline object after them
    arrives; nothing hangs."""
    name = f"killed-owner-{adopt_after}-{os.getpid()}"
    keys = _sigkilled_sender(name, adopt_after, adopted=False)
    if adopt_after == "2":
        _wait_adopted(name)  # tried: the holder found their owner dead ("gone")
    with DataReceiver(ray_two_nodes, dataset_name=name, wait=10) as receiver:
        for key in keys[:5]:
            start = time.monotonic()
            with pytest.raises(ObjectLost, match="sender's process") as lost:
                receiver.recv(timeout=30)
            assert time.monotonic() - start < 5
            assert f"object {key} " in str(lost.value)
            if adopt_after == "2":
                assert "before the holder could adopt it" in str(lost.value), lost.value
        assert (receiver.recv(timeout=30) == 99).all()


@ray.remote(num_cpus=0, resources={"node_b": 1}, max_restarts=0)
class _ReceiverOnB:
    """A DataReceiver living on node_b between the test's steps."""

    def __init__(self, name: str, prefetch: int) -> None:
        self.receiver = DataReceiver("ray:auto", dataset_name=name, prefetch=prefetch, wait=60)

    def fetch(self) -> int:
        """What a first recv does: fetch up to ``prefetch`` entries, hand out none."""
        self.receiver._endpoint.fetch(30)
        return len(self.receiver._endpoint._buffer)

    def recv(self, count: int) -> list[int]:
        """The values of ``count`` 1 MiB arrays received, each checked whole."""
        values = []
        for _ in range(count):
            got = self.receiver.recv(timeout=30)
            assert got.shape == (MIB,) and (got == got[0]).all(), "an array is not the one sent"
            values.append(int(got[0]))
        return values

    def end(self) -> str:
        """The name of the exception the next recv (1 s) raises."""
        try:
            self.receiver.recv(timeout=1)
        except Exception as exc:  # noqa: BLE001 -- reported to the test
            return type(exc).__name__
        return "an object"

    def close(self) -> None:
        self.receiver.close()


def _send_twelve_then_leave(address: str, name: str, close: bool, node: Any, go: Any) -> None:
    sender = DataSender(address, dataset_name=name, max_queue_size=20)
    for i in range(12):
        sender.send(np.full(MIB, i, dtype=np.uint8))
    sender.get_queue(0)
    node.put(ray.get_runtime_context().get_node_id())
    assert go.wait(60), "the receiver did not fetch"
    if close:
        sender.close()  # else the exit leaves the channel (atexit)


@pytest.mark.parametrize("how", ["close", "exit"])
def test_a_leaving_sender_hands_every_object_to_its_holder(ray_two_nodes: str, monkeypatch: Any, how: str) -> None:
    """A sender process whose twelve objects were not adopted yet (ADOPT_AFTER 3 s) closes,
    or exits without close (its atexit leaves), while a receiver on the other node has
    prefetched eight of them and takes none: leaving waits for them to be taken until they
    are due, then has the sender's holder adopt all twelve, queued and lent, so once the
    sender's process is gone the receiver gets all twelve, intact and in order (the lent
    ones by asking the channel for their adopted references)."""
    monkeypatch.setenv("SHMCHANNEL_RAY_ADOPT_AFTER", "3")
    name = f"leaving-owner-{how}-{os.getpid()}"
    ctx = multiprocessing.get_context("spawn")
    node, go = ctx.Queue(), ctx.Event()
    proc = start_process(_send_twelve_then_leave, ray_two_nodes, name, how == "close", node, go)
    receiver = None
    try:
        assert node.get(timeout=90) == _nodes()["node_a"], "the sender is not on node_a"
        receiver = _ReceiverOnB.remote(name, 8)  # type: ignore[attr-defined]
        assert ray.get(receiver.fetch.remote(), timeout=60) == 8
        go.set()
        join_ok(proc, 90)
        assert _status(name)["unadopted_bytes"] == 0
        assert ray.get(receiver.recv.remote(12), timeout=120) == list(range(12))
        assert ray.get(receiver.end.remote(), timeout=60) == ("ChannelClosed" if how == "close" else "ChannelTimeout")
        ray.get(receiver.close.remote(), timeout=60)
    finally:
        if receiver is not None:
            ray.kill(receiver)


def test_prefetched_objects_are_adopted_too_and_outlive_a_sigkilled_sender(ray_two_nodes: str) -> None:
    """Eight of ten objects a sender on node_b sent wait prefetched (lent) in a receiver on
    node_a for longer than ADOPT_AFTER (0.5 s): they are adopted like the queued ones (a
    receiver's reference does not keep an object alive once its owner died), so after the
    sender is SIGKILLed the receiver gets two, gives the other six back at close, and the
    next receiver gets those six and the last two, intact and in order."""
    name = f"lent-adopted-{os.getpid()}"
    sender = _SenderOnB.remote(name, "0.5")  # type: ignore[attr-defined]
    try:
        assert len(ray.get(sender.send.remote(list(range(10)), MIB), timeout=60)) == 10
        with DataReceiver(ray_two_nodes, dataset_name=name, prefetch=8) as first:
            first._endpoint.fetch(30)
            assert len(first._endpoint._buffer) == 8
            _wait_adopted(name)  # queued and lent
            _sigkill(sender)
            assert [int(first.recv(timeout=30)[0]) for _ in range(2)] == [0, 1]
        with DataReceiver(ray_two_nodes, dataset_name=name) as second:
            got = [second.recv(timeout=30) for _ in range(8)]
            assert [int(block[0]) for block in got] == list(range(2, 10))
            assert all(block.shape == (MIB,) and (block == block[0]).all() for block in got)
    finally:
        ray.kill(sender)


def test_a_closing_sender_whose_receiver_keeps_up_has_nothing_adopted(ray_two_nodes: str) -> None:
    """A sender on node_b (ADOPT_AFTER 10 s) sends twenty 1 MiB arrays to a receiver on
    node_a that takes each at once, and closes: its close waits for the receiver to take
    the last ones instead of having them copied, so node_b's holder adopts none of them."""
    nodes = _nodes()
    name = f"kept-up-{os.getpid()}"

    def adopted() -> int:
        holder = _holder(nodes["node_b"])
        return 0 if holder is None else int(ray.get(holder.stats.remote(), timeout=30)["adopted"])

    before = adopted()
    sender = _SenderOnB.remote(name, "10")  # type: ignore[attr-defined]
    try:
        ray.get(sender.pid.remote(), timeout=60)  # attached: the receiver does not wait for it
        with DataReceiver(ray_two_nodes, dataset_name=name, wait=60) as receiver:
            sending = sender.send.remote(list(range(20)), MIB)
            got = [int(receiver.recv(timeout=30)[0]) for _ in range(20)]
            ray.get(sending, timeout=60)
            closing = sender.close.remote()
            with pytest.raises(ChannelClosed):
                receiver.recv(timeout=30)  # acknowledges the last one: the close goes on
            ray.get(closing, timeout=60)
        assert got == list(range(20))
        assert adopted() == before
    finally:
        ray.kill(sender)


# -- 4. an idle holder exits ----------------------------------------------------------------


def _send_one_and_close(address: str, name: str, report: Any) -> None:
    with DataSender(address, dataset_name=name) as sender:
        sender.send(np.full(MIB, 7, dtype=np.uint8))
        report.put(str(ray.get_runtime_context().get_node_id()))


def test_holder_exits_once_idle_and_holding_nothing(ray_two_nodes: str) -> None:
    """A holder made with SHMCHANNEL_RAY_HOLDER_IDLE=2 stays while a channel queues an object
    it owns (well past 2 s without senders), and exits within 15 s once that object was
    received and the channel is gone."""
    driver_node = ray.get_runtime_context().get_node_id()
    _kill_holder(driver_node)  # the next one is made by the child, with the child's idle
    name = f"idle-holder-{os.getpid()}"
    report = multiprocessing.get_context("spawn").Queue()
    os.environ["SHMCHANNEL_RAY_HOLDER_IDLE"] = "2"  # the child's sender passes it to the channel
    try:
        proc = start_process(_send_one_and_close, ray_two_nodes, name, report)
    finally:
        del os.environ["SHMCHANNEL_RAY_HOLDER_IDLE"]
    node = ""
    try:
        join_ok(proc, 90)
        node = report.get(timeout=10)
        assert node == driver_node, "the child ran on another node than this process"
        holder = _holder(node)
        assert holder is not None, "the child's holder is gone before its object was received"
        time.sleep(4)  # two idle periods and more without a sender
        assert _holder(node) is not None, "the holder left while a channel still queued its object"
        stats = ray.get(holder.stats.remote(), timeout=30)
        assert stats["adopted"] == 1, stats  # at the child's close

        with DataReceiver(ray_two_nodes, dataset_name=name, wait=10) as receiver:
            got = receiver.recv(timeout=30)
            assert (got == 7).all()
            del got
            with pytest.raises(ChannelClosed):
                receiver.recv(timeout=10)  # acknowledges the object
        received = time.monotonic()
        wait_until(lambda: _channel_actor(name) is None, 15, "the drained channel's actor to go")
        wait_until(lambda: _holder(node) is None, 15, "the idle holder to exit")
        assert time.monotonic() - received < 15
    finally:
        if node:
            _kill_holder(node)  # if it is still there: it has a 2 s idle


# -- 5. shmchannel stop --ray ---------------------------------------------------------------


@ray.remote(num_cpus=0, resources={"node_b": 1})
def _send_and_close_on_b(name: str, count: int, nbytes: int) -> list[str]:
    with DataSender("ray:auto", dataset_name=name, max_queue_size=count) as sender:
        for i in range(count):
            sender.send(np.full(nbytes, i, dtype=np.uint8))
        return list(sender.get_queue(0))


def test_cli_stop_frees_a_channels_objects(ray_two_nodes: str) -> None:
    """`shmchannel stop --ray --channel` kills the channel's actor, and with it the only
    references to its queued objects: node_b's store frees them, while their holder lives
    on."""
    nodes = _nodes()
    name = f"stopped-{os.getpid()}"
    count, nbytes = 5, 4 * MIB
    before = _store("node_b")["bytes in use"]
    keys = ray.get(_send_and_close_on_b.remote(name, count, nbytes), timeout=120)
    assert len(keys) == count
    queued = _store("node_b")["bytes in use"]
    assert queued - before >= count * nbytes, (before, queued)
    holder = _holder(nodes["node_b"])
    assert holder is not None

    stop = _cli("stop", "--ray", ray_two_nodes, "--channel", f"default/{name}")
    assert stop.returncode == 0 and stop.stdout.strip() == f"channel default/{name} removed", stop
    assert _channel_actor(name) is None
    wait_until(lambda: _store("node_b")["bytes in use"] - before < MIB, 15, "node_b's store to free the channel's objects")
    assert ray.get(holder.stats.remote(), timeout=30)["node"] == nodes["node_b"], "the holder went too"


# -- 6. prefetched objects go back --------------------------------------------------------


@pytest.mark.parametrize("nbytes", [16, 128 * 1024], ids=["inline", "held"])
def test_prefetched_objects_go_back_in_order_at_close(ray_two_nodes: str, nbytes: int) -> None:
    """A receiver with prefetch=8 that received 2 of 10 objects and closes gives the other
    6 it fetched back to the head of the queue (8 keys queued, in order); the next receiver
    gets objects 2 to 9 in order."""
    name = f"prefetch-back-{nbytes}-{os.getpid()}"
    with DataSender(ray_two_nodes, dataset_name=name, max_queue_size=10) as sender:
        for i in range(10):
            sender.send(np.full(nbytes, i, dtype=np.uint8))
        keys = sender.get_queue(0)
        assert len(keys) == 10
        with DataReceiver(ray_two_nodes, dataset_name=name, prefetch=8) as first:
            assert (first.recv(timeout=30) == 0).all()
            assert sender.get_queue(0) == keys[8:], "the first recv did not fetch 8"
            assert (first.recv(timeout=30) == 1).all()
        assert sender.get_queue(0) == keys[2:]
        with DataReceiver(ray_two_nodes, dataset_name=name) as second:
            got = [second.recv(timeout=30) for _ in range(8)]
            assert [int(block[0]) for block in got] == list(range(2, 10))
            assert all(block.shape == (nbytes,) and (block == block[0]).all() for block in got)
            assert second.get_queue(0) == []


# -- 7. configuration -----------------------------------------------------------------------


BAD_SECONDS = [(variable, least, value)
               for variable, least in (("SHMCHANNEL_RAY_ADOPT_AFTER", "0"), ("SHMCHANNEL_RAY_HOLDER_IDLE", "2"))
               for value in ("soon", "-1", "inf", "nan")] + [("SHMCHANNEL_RAY_HOLDER_IDLE", "2", "1.5")]


@pytest.mark.parametrize(("variable", "least", "value"), BAD_SECONDS)
def test_a_bad_seconds_variable_is_named(ray_two_nodes: str, monkeypatch: Any, variable: str, least: str, value: str) -> None:
    """A sender refuses a value of the Ray backend's seconds variables that is not a
    finite number of seconds from their least value, naming the variable, what it must be
    and what it got, before it makes the channel's actor (none is left)."""
    name = f"bad-env-{os.getpid()}"
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidArgument, match=f"^{variable} must be a number of seconds >= {least}, got '{value}'$"):
        DataSender(ray_two_nodes, dataset_name=name)
    assert _channel_actor(name) is None
