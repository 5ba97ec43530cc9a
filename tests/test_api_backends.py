"""A first behaviour run on both backends: one object through a 2-shard channel."""

from __future__ import annotations

import numpy as np

from shmchannel import DataReceiver, DataSender


def test_two_shards_get_their_halves(address: str) -> None:
    """Each shard receiver gets its contiguous half of an array."""
    with DataSender(address, dataset_name="halves", num_shards=2) as sender, \
            DataReceiver(address, dataset_name="halves", shard_id=0) as r0, \
            DataReceiver(address, dataset_name="halves", shard_id=1) as r1:
        sender.send(np.arange(10))
        np.testing.assert_array_equal(r0.recv(timeout=30), np.arange(5))
        np.testing.assert_array_equal(r1.recv(timeout=30), np.arange(5, 10))
