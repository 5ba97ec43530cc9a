"""shmchannel itself, both backends: the embedded broker and the Ray backend.

The embedded runs use an isolated broker (own runtime directory, 2 GiB store) so the bench
never touches a user's broker; it is stopped (and checked for leftovers) when they end.

``shmchannel-loan`` (the in-place workloads only, issue 15): the embedded backend where the
producer fills a loan of the store (``sender.empty``, one broker round trip per batch) and
sends it without a copy, against ``shmchannel`` filling its own array and sending a copy.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from harness import END, MAX_IN_FLIGHT, Peer, RayPeer
from workloads import Workload


class _Receiver:
    def __init__(self, rx: Any) -> None:
        from shmchannel import ChannelClosed

        self.rx = rx
        self._closed = ChannelClosed  # imported once, not per message (the other peers import nothing per message)

    def recv(self, timeout: float) -> Any:
        try:
            return self.rx.recv(timeout=timeout)
        except self._closed:
            return END

    def release(self) -> None:
        pass

    def close(self) -> None:
        self.rx.close()


class ShmChannelEmbedded(Peer):
    name = "shmchannel"
    address = "127.0.0.1"

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        from shmchannel.testing import isolated_broker

        with isolated_broker(memory="2G"):
            yield

    def runs(self, w: Workload) -> bool:
        return True   # the in-place workloads too: the copying send ("copy")

    def sender(self, handles: Any, w: Workload, rep: int) -> Any:
        from shmchannel import DataSender

        return DataSender(self.address, dataset_name=f"bench-{w.name}-{rep}", num_shards=w.consumers,
                          max_queue_size=MAX_IN_FLIGHT)

    def receiver(self, handles: Any, w: Workload, rep: int, shard: int) -> Any:
        from shmchannel import DataReceiver

        return _Receiver(DataReceiver(self.address, dataset_name=f"bench-{w.name}-{rep}", shard_id=shard, wait=60))


class ShmChannelLoan(ShmChannelEmbedded):
    """Each batch is a new ``sender.empty`` loan, filled by the producer and sent uncopied."""

    name = "shmchannel-loan"
    lends = True

    def runs(self, w: Workload) -> bool:
        return w.inplace

    def batch(self, tx: Any, w: Workload, pool: list[Any], seq: int) -> Any:
        return tx.empty(w.shape, np.float32)


class ShmChannelRay(RayPeer, ShmChannelEmbedded):
    name = "shmchannel-ray"
    address = "ray:auto"

    def runs(self, w: Workload) -> bool:
        return not w.inplace
