"""The Ray backend: the same channel across the machines of a Ray cluster.

Addresses: ``"ray://host:port"`` (Ray client), ``"ray:auto"`` (the cluster this process runs
in, or ``ray.init(address="auto")``), ``"ray:local"`` (join a local cluster, or start one
in this process). We use Ray as it is and write no transport of our own.

Where things live:

- the data of a channel stays on the node of the sender that made it, in Ray's object store,
  owned by the sender and, once it has waited a while or the sender leaves, by that node's
  *holder* (``ownership.py``, ``holder.py``: one detached actor per node), so that it
  outlives the sender; receivers pull it straight from there;
- the channel's broker is a named, detached async actor (``actors.ChannelActor``) in the Ray
  namespace ``namespace``, named after ``dataset_name``; it keeps metadata only: per-shard
  queues of references (small parts inline), leases, counters;
- a part travels in our layout (``wire.py``), so the user's buffers start on 64-byte
  boundaries whatever Ray's pickling would do.

Per object: a sender puts its large parts and submits the actor's ``put`` (small objects
in batches) and goes on while it knows there is room (``sender.py``); a receiver fetches
several entries per call to the actor (``receiver.py``).

Differences from the embedded backend, all Ray's: received arrays are read-only views of
Ray's memory (zero-copy on the receiving node); objects held on a node that dies are lost
(``ObjectLost``); ``DataSystem.stats`` reports capacity and object count only (Ray does not
tell a client how much of its store is used).
"""

from __future__ import annotations

from typing import Any

from .cluster import ADDRESS_FORMS, connect, list_channels, remove_channel
from .datasystem import RayDataSystem
from .receiver import RayReceiver
from .sender import RaySender


class RayBackend:
    """Channels on a Ray cluster; ``address`` is one of ``ADDRESS_FORMS``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._ray = connect(address)

    def create_sender(
        self, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int,
        made: list[Any],
    ) -> RaySender:
        made.append(RaySender(self._ray, namespace, dataset_name, num_shards, full_batch, max_queue_size))
        return made[-1]

    def open_receiver(
        self, namespace: str, dataset_name: str, shard_id: int, wait: float | None, prefetch: int, made: list[Any],
    ) -> RayReceiver:
        made.append(RayReceiver(self._ray, namespace, dataset_name, shard_id, wait, prefetch))
        return made[-1]

    def data_system(self, made: list[Any]) -> RayDataSystem:
        made.append(RayDataSystem(self._ray))
        return made[-1]


__all__ = ["ADDRESS_FORMS", "RayBackend", "connect", "list_channels", "remove_channel"]
