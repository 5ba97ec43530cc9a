"""Status of the Ray backend's channels (issue 6, items 3 and 4): ``shmchannel.status("ray:...")``
and ``shmchannel status --ray``, figures from the channel actors. Needs the Ray cluster of conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import numpy as np
import pytest

import shmchannel
from shmchannel import DataReceiver, DataSender
from shmchannel.broker.rates import WINDOW

from .test_status import HEADER_SLACK, PART, PART_BYTES, RATE_KEYS, _channel, _cli_args, _interrupt, _Lines

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'shmchannel[ray]')")


def test_ray_status_reports_counts_bytes_and_rates(ray_two_nodes: str) -> None:
    """`shmchannel.status("ray:...")` lists a Ray channel with depths, counts, bytes and rates."""
    name = f"ray-status-{os.getpid()}"
    with DataSender(ray_two_nodes, dataset_name=name, num_shards=2) as sender, \
            DataReceiver(ray_two_nodes, dataset_name=name, shard_id=0, prefetch=1) as receiver:
        for _ in range(5):
            sender.send(np.zeros((2, PART)))
        assert receiver.recv(timeout=60).shape == (1, PART)
        sender.get_queue()  # returns once the sends are queued (on Ray a send may return before)
        status: Any = shmchannel.status(ray_two_nodes)
    assert status["backend"] == "ray" and status["address"] == ray_two_nodes
    c = _channel(status, name)
    assert (c["depths"], c["sent_objects"], c["received_objects"]) == ([4, 5], 5, [1, 0])
    assert c["shard_receivers"] == [1, 0]
    assert 10 * PART_BYTES <= c["sent_bytes"] <= 10 * (PART_BYTES + HEADER_SLACK)
    assert PART_BYTES <= c["received_bytes"][0] <= PART_BYTES + HEADER_SLACK and c["received_bytes"][1] == 0
    assert set(c["rates"]) == RATE_KEYS and c["rates"]["sent_objects"] > 0 and c["rate_window"] == WINDOW


def test_ray_cli_status_json_table_and_watch(ray_two_nodes: str) -> None:
    """`status --ray` prints the channel as JSON and in the rich table, and `--watch --json` ends on SIGINT."""
    name = f"ray-cli-{os.getpid()}"
    with DataSender(ray_two_nodes, dataset_name=name) as sender:
        sender.send([1])
        as_json = subprocess.run(_cli_args("status", "--ray", ray_two_nodes, "--json"), capture_output=True,
                                 text=True, timeout=120, env=dict(os.environ))
        table = subprocess.run(_cli_args("status", "--ray", ray_two_nodes), capture_output=True, text=True,
                               timeout=120, env={**os.environ, "COLUMNS": "200"})
        proc = subprocess.Popen(_cli_args("status", "--ray", ray_two_nodes, "--watch", "--json", "--interval", "0.5"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
        try:
            lines = _Lines(proc)
            for _ in range(2):
                lines.json_until(lambda s: any(c["dataset_name"] == name for c in s.get("channels", [])), 120,
                                 "a refresh with the channel")
        finally:
            _, err = _interrupt(proc)
    assert as_json.returncode == 0, as_json.stderr
    c = _channel(json.loads(as_json.stdout), name)
    assert c["depths"] == [1] and c["sent_objects"] == 1 and c["sent_bytes"] > 0
    (row,) = [line for line in table.stdout.splitlines() if name in line]
    assert [cell.strip() for cell in row.split("│")][:4] == ["default", name, "1", "1 / 10"], row
    assert proc.returncode == 0, err
