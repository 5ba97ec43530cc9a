"""The Ray backend across two nodes: the sender pinned to one, the receivers to the other.

The session's Ray cluster has two nodes on this machine (two raylets, each with its own
object store), told apart by the custom resources ``node_a`` and ``node_b``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'shmchannel[ray]')")

ROWS, COLS = 64, 1 << 16  # 4 MiB of uint8 per object, 2 MiB per shard
COUNT = 12


@ray.remote(num_cpus=0, resources={"node_a": 1})
def _produce(name: str) -> str:
    from shmchannel import DataSender

    with DataSender("ray:auto", dataset_name=name, num_shards=2, max_queue_size=4) as sender:
        for i in range(COUNT):
            block = np.full((ROWS, COLS), i, dtype=np.uint8)
            block[:, 0] = np.arange(ROWS)  # row ids: each shard must get its own half
            sender.send(block)
    return str(ray.get_runtime_context().get_node_id())


@ray.remote(num_cpus=0, resources={"node_b": 1})
def _consume(name: str, shard: int) -> tuple[str, list[Any]]:
    from shmchannel import DataReceiver

    seen = []
    with DataReceiver("ray:auto", dataset_name=name, shard_id=shard, wait=60) as receiver:
        for i, block in enumerate(receiver):
            half = ROWS // 2
            assert block.shape == (half, COLS), block.shape
            assert (block[:, 0] == np.arange(shard * half, (shard + 1) * half)).all(), "wrong rows"
            assert (block[:, 1:] == i).all(), f"object {i} corrupted"
            seen.append((i, block.flags.writeable))
    return str(ray.get_runtime_context().get_node_id()), seen


def test_data_crosses_nodes_intact(ray_two_nodes: str) -> None:
    """A sender on node_a streams to two receivers on node_b; every row arrives, in order, intact."""
    consumers = [_consume.remote("xnode", shard) for shard in (0, 1)]
    producer_node = ray.get(_produce.remote("xnode"), timeout=180)
    results = ray.get(consumers, timeout=180)
    for node, seen in results:
        assert node != producer_node, "receiver ran on the sender's node: nothing crossed"
        assert [i for i, _ in seen] == list(range(COUNT))
        assert not any(writable for _, writable in seen), "Ray's zero-copy arrays are read-only views"
