"""What the broker's state is made of: channels (their names, shapes and endpoints; the
queues themselves are in shared memory), clients (what each holds, owns and allocates)
and orphaned slabs. Plain records; the decisions about them are in state.py and accounts.py."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from ..queue.log import ClaimLog
from ..queue.ring import Queues
from . import rules
from .rates import WINDOW, Rates


class Signal:
    """Callbacks to run when something a waiter needs may have happened."""

    __slots__ = ("_callbacks",)

    def __init__(self) -> None:
        self._callbacks: set[Callable[[], None]] = set()

    def add(self, callback: Callable[[], None]) -> None:
        self._callbacks.add(callback)

    def discard(self, callback: Callable[[], None]) -> None:
        self._callbacks.discard(callback)

    def fire(self) -> None:
        for callback in list(self._callbacks):
            callback()


@dataclass
class Part:
    """A DataSystem object's blob in a put: inline bytes, or an allocation the client wrote."""

    size: int
    offset: int = -1
    inline: bytes | None = None


@dataclass
class Channel:
    """A channel as the broker knows it: its name and shape, who is attached, and where
    its queues lie in shared memory (``queues``: queue/ring.py). What is queued, claimed
    and closed is read from there -- the broker is on the path of no object."""

    namespace: str
    name: str
    num_shards: int
    full_batch: bool
    max_queue_size: int
    queues: Queues
    region: int  # offset of the block holding its queues (freed with the channel)
    sender: int | None = None
    receivers: dict[int, int] = field(default_factory=dict)  # client id -> shard
    rates: Rates = field(default_factory=Rates)
    created: float = field(default_factory=time.time)
    # The counters at the last status (at creation: none sent yet), whose change ``rates``
    # counts: the broker sees no object go by, it reads the counters in shared memory.
    sampled: list[int] = field(default_factory=lambda: [0, 0, 0, 0])

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def shape(self) -> rules.Shape:
        return rules.Shape(self.num_shards, self.full_batch, self.max_queue_size)

    @property
    def closed(self) -> bool:
        return self.queues.closed

    @property
    def empty(self) -> bool:
        """Nothing queued and nothing on its way back (objects receivers hold are not seen
        here: ``BrokerState.held``)."""
        return not any(self.queues.queued(s) or self.queues.pending(s) for s in range(self.num_shards))

    def depth(self, shard: int) -> int:
        return self.queues.queued(shard)

    def record(self) -> dict[str, Any]:
        """The journal record that makes (or re-makes) this channel."""
        return {"r": "channel", "ns": self.namespace, "name": self.name, "shards": self.num_shards,
                "full": self.full_batch, "max": self.max_queue_size, "region": self.region}

    def info(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "dataset_name": self.name,
            "num_shards": self.num_shards,
            "full_batch": self.full_batch,
            "max_queue_size": self.max_queue_size,
            "queues": self.queues.base,
        }

    def status(self) -> dict[str, Any]:
        """A channel's figures, as ``shmchannel.status`` documents them: read from shared
        memory, rates from the change since the previous status."""
        sent_objects, sent_bytes = self.queues.sent()
        received = [self.queues.received(s) for s in range(self.num_shards)]
        counters = [sent_objects, sent_bytes, sum(r[0] for r in received), sum(r[1] for r in received)]
        self.rates.add(*(now - before for now, before in zip(counters, self.sampled)))
        self.sampled = counters
        return {
            **{k: v for k, v in self.info().items() if k != "queues"},
            "closed": self.closed,
            "sender": self.sender is not None,
            "receivers": len(self.receivers),
            "shard_receivers": rules.receivers_per_shard(self.receivers.values(), self.num_shards),
            "depths": [self.depth(i) for i in range(self.num_shards)],
            "sent_objects": sent_objects,
            "sent_bytes": sent_bytes,
            "received_objects": [r[0] for r in received],
            "received_bytes": [r[1] for r in received],
            "rates": self.rates.per_second(),
            "rate_window": WINDOW,
            "created": self.created,
        }


@dataclass
class Client:
    id: int
    pid: int
    holds: Counter[str] = field(default_factory=Counter)  # DataSystem objects it views
    lends: Counter[str] = field(default_factory=Counter)  # of those, held for a send (journaled: ``lend``)
    allocations: dict[int, int] = field(default_factory=dict)  # offset -> size, not yet put
    slabs: dict[int, int] = field(default_factory=dict)  # a sender's slabs: offset -> size
    log: ClaimLog | None = None  # its process's claim log (on the session connection)
    log_size: int = 0  # bytes of the log's block
    sends_to: set[tuple[str, str]] = field(default_factory=set)
    receives_from: set[tuple[str, str]] = field(default_factory=set)


@dataclass
class Orphan:
    """Memory whose owner is gone, kept until nothing in it is in use: a dead process's
    claim log (while its claims go back), or a slab or log a dead broker's client had."""

    offset: int
    size: int
    log: ClaimLog | None = None  # None: a slab
    # The process it was taken over from (a dead broker's client): kept whole while it
    # runs, for it may still be using it; None once that process is gone.
    pid: int | None = None
