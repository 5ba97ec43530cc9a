"""What only the Ray backend has: actor lifetime, the CLI's --ray views, the missing extra."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from shmchannel import DataReceiver, DataSender
from shmchannel.testing import wait_until

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'shmchannel[ray]')")


def _channel_actors() -> list[str]:
    from shmchannel.backends.ray_actor import DATASYSTEM, PREFIX

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(PREFIX) and a["name"] != DATASYSTEM]


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
    status = _cli("status", "--ray", ray_two_nodes)
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
