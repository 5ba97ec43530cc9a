"""Peer: ``faster_fifo.Queue`` (pickle into a shared-memory circular buffer guarded by a
process-shared pthread mutex), one bounded queue per receiver.

Each queue holds at most ``MAX_IN_FLIGHT`` messages (``maxsize``, from faster-fifo 1.5), like
every other peer's; its byte capacity (``max_size_bytes``) is sized so that those messages
always fit, so the message count is what bounds it. Objects go through single ``put``/``get``
calls, as with ``multiprocessing.Queue``: faster-fifo's ``put_many``/``get_many`` batch several
messages under one lock, which the other peers (and shmchannel's send/recv) do not do, so
they are not used, to compare like with like. The package is ``faster-fifo`` (the `bench` extra);
without it the peer is skipped with a message, not failed.
"""

from __future__ import annotations

from typing import Any

from harness import MAX_IN_FLIGHT, Peer, PeerUnavailable, QueueFanout, QueueReceiver
from workloads import Workload

PICKLE_SLACK = 64 << 10  # bytes per message on top of its payload: pickle framing, the queue's header


class FasterFifoPeer(Peer):
    name = "faster-fifo"

    def session(self) -> Any:
        try:
            import faster_fifo  # noqa: F401
        except ImportError as exc:
            raise PeerUnavailable(f"faster-fifo is not installed ({exc}); `pip install faster-fifo` "
                                  "(it is in the `bench` extra) to include it") from None
        return super().session()

    def setup(self, w: Workload) -> Any:
        from faster_fifo import Queue

        # The payload of one receiver's part; a DataFrame's deep memory usage (Python str
        # objects) is larger than its pickle, so this over-estimates it.
        part = w.payload_bytes(w.template()) // w.consumers
        size = MAX_IN_FLIGHT * (part + PICKLE_SLACK)
        return [Queue(max_size_bytes=size, maxsize=MAX_IN_FLIGHT) for _ in range(w.consumers)]

    def teardown(self, handles: Any) -> None:
        for q in handles:
            q.close()

    def sender(self, handles: Any, w: Workload, rep: int) -> Any:
        return QueueFanout(handles)  # put(obj, timeout=60); None ends the stream

    def receiver(self, handles: Any, w: Workload, rep: int, shard: int) -> Any:
        return QueueReceiver(handles[shard], "faster_fifo.Queue")
