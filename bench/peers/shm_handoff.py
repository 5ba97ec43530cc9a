"""Peer: a hand-rolled ``multiprocessing.shared_memory`` hand-off.

Per message the sender creates a new shared-memory block, copies the object's out-of-band
pickle buffers into it and sends the block's name (plus the small pickle header) over a
bounded ``multiprocessing.Queue``; the receiver attaches, unpickles over views of the block,
and closes and unlinks it once the data was used. Blocks are named ``shb_<pid>_<n>`` so the
driver can remove any that a failed run leaves in /dev/shm.
"""

from __future__ import annotations

import glob
import itertools
import os
import pickle
import queue
from multiprocessing import shared_memory
from typing import Any

from harness import END, Peer, QueueFanout, close_mp_queues, mp_queues, split_rows
from workloads import Workload
PREFIX = "shb_"


class _Sender:
    def __init__(self, queues: list[Any]) -> None:
        self.queues = queues
        self.names = (f"{PREFIX}{os.getpid()}_{n}" for n in itertools.count())

    def send(self, obj: Any) -> None:
        for q, part in zip(self.queues, split_rows(obj, len(self.queues))):
            buffers: list[pickle.PickleBuffer] = []
            header = pickle.dumps(part, protocol=5, buffer_callback=buffers.append)
            raws = [b.raw() for b in buffers]
            sizes = [r.nbytes for r in raws]
            shm = shared_memory.SharedMemory(next(self.names), create=True, size=max(1, sum(sizes)))
            offset = 0
            for raw in raws:
                shm.buf[offset:offset + raw.nbytes] = raw
                offset += raw.nbytes
            name = shm.name
            shm.close()  # the receiver unlinks it (which also unregisters it from the resource
            # tracker that the spawned processes share with the driver)
            q.put((name, header, sizes), timeout=60)

    close = QueueFanout.close


class _Receiver:
    def __init__(self, q: Any) -> None:
        self.q = q
        self.shm: shared_memory.SharedMemory | None = None

    def recv(self, timeout: float) -> Any:
        try:
            item = self.q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("multiprocessing.Queue.get timed out") from None
        if item is None:
            return END
        name, header, sizes = item
        self.shm = shm = shared_memory.SharedMemory(name)
        views, offset = [], 0
        for size in sizes:
            views.append(shm.buf[offset:offset + size])
            offset += size
        return pickle.loads(header, buffers=views)

    def release(self) -> None:
        """The caller dropped the object: unmap and remove its block."""
        shm, self.shm = self.shm, None
        if shm is not None:
            shm.unlink()
            shm.close()

    def close(self) -> None:
        self.release()


class ShmHandoffPeer(Peer):
    name = "shm-handoff"

    def setup(self, w: Workload) -> Any:
        return mp_queues(w)

    def teardown(self, handles: Any) -> None:
        close_mp_queues(handles)
        for path in glob.glob(f"/dev/shm/{PREFIX}*"):  # left by a failed run
            os.unlink(path)

    def sender(self, handles: Any, w: Workload, rep: int) -> Any:
        return _Sender(handles)

    def receiver(self, handles: Any, w: Workload, rep: int, shard: int) -> Any:
        return _Receiver(handles[shard])
