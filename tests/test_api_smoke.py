"""Smoke: one object through a channel in one process."""

from __future__ import annotations

import numpy as np

from shmchannel import DataReceiver, DataSender

from .conftest import ADDRESS


def test_array_round_trip(broker: int) -> None:
    """An array sent is received equal, as a writable view."""
    with DataSender(ADDRESS, dataset_name="smoke") as sender, DataReceiver(ADDRESS, dataset_name="smoke") as receiver:
        data = np.arange(100_000, dtype=np.float32)
        sender.send(data)
        got = receiver.recv(timeout=10)
        np.testing.assert_array_equal(got, data)
        assert got.flags.writeable
