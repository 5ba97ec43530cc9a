"""Peer: ``multiprocessing.Queue`` (pickle through a pipe), one bounded queue per receiver."""

from __future__ import annotations

import queue
from typing import Any

from harness import END, Peer, QueueFanout, close_mp_queues, mp_queues
from workloads import Workload


class _Receiver:
    def __init__(self, q: Any) -> None:
        self.q = q

    def recv(self, timeout: float) -> Any:
        try:
            obj = self.q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("multiprocessing.Queue.get timed out") from None
        return END if obj is None else obj

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class MPQueuePeer(Peer):
    name = "mp.Queue"

    def setup(self, w: Workload) -> Any:
        return mp_queues(w)

    def teardown(self, handles: Any) -> None:
        close_mp_queues(handles)

    def sender(self, handles: Any, w: Workload, rep: int) -> Any:
        return QueueFanout(handles)

    def receiver(self, handles: Any, w: Workload, rep: int, shard: int) -> Any:
        return _Receiver(handles[shard])
