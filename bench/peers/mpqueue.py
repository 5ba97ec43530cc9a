"""Peer: ``multiprocessing.Queue`` (pickle through a pipe), one bounded queue per receiver."""

from __future__ import annotations

import multiprocessing as mp
import queue
from typing import Any

from harness import END, Peer, split_rows
from workloads import Workload

MAX_IN_FLIGHT = 10


class _Sender:
    def __init__(self, queues: list[Any]) -> None:
        self.queues = queues

    def send(self, obj: Any) -> None:
        for q, part in zip(self.queues, split_rows(obj, len(self.queues))):
            q.put(part, timeout=60)

    def close(self) -> None:
        for q in self.queues:
            q.put(None, timeout=60)


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
        ctx = mp.get_context("spawn")
        return [ctx.Queue(maxsize=MAX_IN_FLIGHT) for _ in range(w.consumers)]

    def teardown(self, handles: Any) -> None:
        for q in handles:
            q.close()
            q.cancel_join_thread()

    def sender(self, handles: Any, w: Workload, rep: int) -> Any:
        return _Sender(handles)

    def receiver(self, handles: Any, w: Workload, rep: int, shard: int) -> Any:
        return _Receiver(handles[shard])
