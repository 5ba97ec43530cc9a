"""What only the Ray backend has: actor lifetime, the CLI's --ray views, the missing extra."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from shmchannel import DataReceiver, DataSender
from shmchannel.testing import wait_until

MIB = 1 << 20

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'shmchannel[ray]')")


def _channel_actors() -> list[str]:
    from shmchannel.backends.ray.actors import PREFIX
    from shmchannel.backends.ray.cluster import DATASYSTEM, HOLDER

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(PREFIX) and a["name"] != DATASYSTEM and not a["name"].startswith(HOLDER)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmchannel", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))


def test_closed_and_drained_channel_kills_its_actor(ray_two_nodes: str) -> None:
    """Once the sender closed, everything was received and the receiver closed, the actor is gone."""
    with DataSender(ray_two_nodes, dataset_name="ephemeral") as sender:
        receiver = DataReceiver(ray_two_nodes, dataset_name="ephemeral")
        sender.send(np.arange(4))
    assert "shmchannel:ephemeral" in _channel_actors()
    np.testing.assert_array_equal(receiver.recv(timeout=30), np.arange(4))
    receiver.close()
    wait_until(lambda: "shmchannel:ephemeral" not in _channel_actors(), 30, "the channel actor to be killed")


def test_received_array_is_a_zero_copy_view(ray_two_nodes: str) -> None:
    """A received array does not own its data: it views Ray's object store."""
    with DataSender(ray_two_nodes, dataset_name="view") as sender, \
            DataReceiver(ray_two_nodes, dataset_name="view") as receiver:
        sender.send(np.ones((256, 1024)))
        got = receiver.recv(timeout=30)
        assert not got.flags.owndata and not got.flags.writeable
        assert got.sum() == 256 * 1024


def test_cli_lists_and_removes_a_ray_channel(ray_two_nodes: str) -> None:
    """`status --ray` shows a channel's queue depths; `stop --ray --channel` removes it."""
    sender = DataSender(ray_two_nodes, dataset_name="listed", num_shards=2)
    for _ in range(3):
        sender.send(np.zeros(8))
    status = _cli("status", "--ray", ray_two_nodes, "--plain")
    assert status.returncode == 0, status.stderr
    (row,) = [line for line in status.stdout.splitlines() if line.startswith("default/listed")]
    assert row.split()[1:4] == ["2", "3", "3"], row
    stop = _cli("stop", "--ray", ray_two_nodes, "--channel", "default/listed")
    assert stop.returncode == 0 and stop.stdout.strip() == "channel default/listed removed", stop
    assert "shmchannel:listed" not in _channel_actors()
    sender.close()  # its actor is gone: close has nothing left to do, and says nothing


def test_missing_ray_extra_is_named() -> None:
    """Without Ray installed, a Ray address says which extra to install."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from shmchannel import DataSender\n"
        "try:\n    DataSender('ray:local')\n"
        "except ValueError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "the ray backend needs Ray: pip install 'shmchannel[ray]'", out


def _hold_first_and_wait(address: str, name: str, ready: object) -> None:
    import signal

    receiver = DataReceiver(address, dataset_name=name, wait=30)
    assert receiver.recv(timeout=30) == [0]
    ready.set()  # type: ignore[attr-defined]
    signal.pause()  # SIGKILLed here, holding object 0 unacknowledged


def test_objects_of_a_killed_ray_receiver_go_to_the_next_one(ray_two_nodes: str) -> None:
    """On Ray too: a receiver SIGKILLed while holding an unacknowledged object and four it
    prefetched; they all go back to the head of the queue, in order, and a new receiver
    gets them."""
    import multiprocessing
    import signal

    from shmchannel.testing import start_process

    name = f"ray-killed-rx-{os.getpid()}"
    ready = multiprocessing.get_context("spawn").Event()
    with DataSender(ray_two_nodes, dataset_name=name) as sender:
        for i in range(5):
            sender.send([i])
        proc = start_process(_hold_first_and_wait, ray_two_nodes, name, ready)
        assert ready.wait(60)
        assert len(sender.get_queue(0)) == 0  # the default prefetch (8) lent it all five
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        wait_until(lambda: len(sender.get_queue(0)) == 5, 30, "the dead receiver's object to be queued again")
        with DataReceiver(ray_two_nodes, dataset_name=name) as receiver:
            assert [receiver.recv(timeout=30) for _ in range(5)] == [[i] for i in range(5)]


def test_ray_ack_and_recv_consume_what_was_received(ray_two_nodes: str) -> None:
    """An acknowledged object (by ack() or the next recv) is not given to anyone again."""
    name = f"ray-ack-{os.getpid()}"
    with DataSender(ray_two_nodes, dataset_name=name) as sender:
        for i in range(3):
            sender.send([i])
        with DataReceiver(ray_two_nodes, dataset_name=name) as first:
            assert first.recv(timeout=30) == [0]
            assert first.recv(timeout=30) == [1]
            first.ack()
        with DataReceiver(ray_two_nodes, dataset_name=name) as second:
            assert second.recv(timeout=30) == [2]
            assert second.get_queue(0) == []


def test_each_shard_of_a_split_tensor_and_table_carries_only_its_rows(ray_two_nodes: str) -> None:
    """Row blocks of a split tensor and Arrow table (views of all of their parent's memory)
    travel as their own rows: each shard's received object, and the bytes the channel
    counts, are about a quarter of the whole."""
    import pyarrow as pa
    import torch

    from shmchannel.backends.ray import list_channels

    n = 400_000
    tensor = torch.arange(n)
    table = pa.table({"a": np.arange(n), "s": [str(i) for i in range(n)]})
    with DataSender(ray_two_nodes, dataset_name="blocks", num_shards=4) as sender:
        receivers = [DataReceiver(ray_two_nodes, dataset_name="blocks", shard_id=i) for i in range(4)]
        try:
            sender.send(tensor)
            sender.send(table)
            for i, receiver in enumerate(receivers):
                got_tensor, got_table = receiver.recv(timeout=60), receiver.recv(timeout=60)
                assert torch.equal(got_tensor, tensor[i * n // 4 : (i + 1) * n // 4])
                assert got_tensor.untyped_storage().nbytes() == got_tensor.numel() * 8
                assert got_table.equals(table.slice(i * n // 4, n // 4))
                assert got_table.get_total_buffer_size() < table.get_total_buffer_size() * 0.3
            (channel,) = [c for c in list_channels(ray_two_nodes) if c["dataset_name"] == "blocks"]
            whole = tensor.numel() * 8 + table.get_total_buffer_size()
            assert channel["sent_bytes"] < whole * 1.1, channel  # four quarters, not four wholes
        finally:
            for receiver in receivers:
                receiver.close()


def test_a_burst_of_small_sends_mixed_with_large_ones_arrives_in_order(ray_two_nodes: str) -> None:
    """Small objects sent while the actor is busy go in batches (sender.py), large ones through
    the holder: 600 sends, every 50th a 1 MiB array, arrive in order; get_queue right after the
    burst lists every one not yet received, and close right after a burst loses none."""
    name = f"ray-burst-{os.getpid()}"
    with DataSender(ray_two_nodes, dataset_name=name, max_queue_size=1000) as sender:
        for i in range(600):
            sender.send(np.full(MIB if i % 50 == 0 else 4, i, dtype=np.int32))
        assert len(sender.get_queue(0)) == 600
        for i in range(600, 700):
            sender.send([i])
    with DataReceiver(ray_two_nodes, dataset_name=name) as receiver:
        got = [int(obj[0]) for obj in receiver]
    assert got == list(range(700))
