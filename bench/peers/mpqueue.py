"""Peer: ``multiprocessing.Queue`` (pickle through a pipe), one bounded queue per receiver."""

from __future__ import annotations

from typing import Any

from harness import Peer, QueueFanout, QueueReceiver, close_mp_queues, mp_queues
from workloads import Workload


class MPQueuePeer(Peer):
    name = "mp.Queue"

    def setup(self, w: Workload) -> Any:
        return mp_queues(w)

    def teardown(self, handles: Any) -> None:
        close_mp_queues(handles)

    def sender(self, handles: Any, w: Workload, rep: int) -> Any:
        return QueueFanout(handles)

    def receiver(self, handles: Any, w: Workload, rep: int, shard: int) -> Any:
        return QueueReceiver(handles[shard], "multiprocessing.Queue")
