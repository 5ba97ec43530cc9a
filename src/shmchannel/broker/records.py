"""What the broker's state is made of: channels (per-shard queues of keys, their
counters and the signals their waiters wait on) and clients (what each holds, has lent
and is allocating). Plain records; the decisions about them are in state.py and accounts.py."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

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
    """One shard's blob in a send: inline bytes, or an allocation the client wrote."""

    size: int
    offset: int = -1
    inline: bytes | None = None


@dataclass
class Lent:
    """Objects of one shard lent to one client, oldest first: the first ``taken`` were
    handed to the user (not yet acknowledged), the rest wait in the client (reserved)."""

    keys: deque[str] = field(default_factory=deque)
    taken: int = 0

    @property
    def reserved(self) -> list[str]:
        return list(self.keys)[self.taken :]


@dataclass
class Channel:
    namespace: str
    name: str
    num_shards: int
    full_batch: bool
    max_queue_size: int
    sender: int | None = None
    closed: bool = False
    queues: list[deque[str]] = field(default_factory=list)
    receivers: dict[int, int] = field(default_factory=dict)  # client id -> shard
    data: list[Signal] = field(default_factory=list)  # per shard: something to receive
    space: Signal = field(default_factory=Signal)  # a slot came free
    reserved: list[int] = field(default_factory=list)  # per shard: prefetched, not handed out
    sent_objects: int = 0
    sent_bytes: int = 0
    received_objects: list[int] = field(default_factory=list)
    received_bytes: list[int] = field(default_factory=list)
    rates: Rates = field(default_factory=Rates)  # the four counters above, per second
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.reshape(self.num_shards)

    def reshape(self, num_shards: int) -> None:
        """Empty queues for ``num_shards`` shards (only while nothing is built on the old
        ones: no object queued or lent, no receiver attached; see ``rules.check_new_sender``)."""
        self.num_shards = num_shards
        self.queues = [deque() for _ in range(num_shards)]
        self.data = [Signal() for _ in range(num_shards)]
        self.reserved = [0] * num_shards
        self.received_objects = [0] * num_shards
        self.received_bytes = [0] * num_shards

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def shape(self) -> rules.Shape:
        return rules.Shape(self.num_shards, self.full_batch, self.max_queue_size)

    @property
    def empty(self) -> bool:
        return not any(self.queues)

    def depth(self, shard: int) -> int:
        """Objects of ``shard`` not handed to a user yet: queued, or reserved by a receiver."""
        return len(self.queues[shard]) + self.reserved[shard]

    def room(self) -> int:
        """Sends the channel takes now without waiting (its fullest shard decides)."""
        return max(0, self.max_queue_size - max(map(self.depth, range(self.num_shards))))

    def record(self) -> dict[str, Any]:
        """The journal record that makes (or re-makes) this channel."""
        return {"r": "channel", "ns": self.namespace, "name": self.name, "shards": self.num_shards,
                "full": self.full_batch, "max": self.max_queue_size}

    def info(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "dataset_name": self.name,
            "num_shards": self.num_shards,
            "full_batch": self.full_batch,
            "max_queue_size": self.max_queue_size,
        }

    def status(self) -> dict[str, Any]:
        """A channel's figures, as ``shmchannel.status`` documents them."""
        return {
            **self.info(),
            "closed": self.closed,
            "sender": self.sender is not None,
            "receivers": len(self.receivers),
            "shard_receivers": rules.receivers_per_shard(self.receivers.values(), self.num_shards),
            "depths": [self.depth(i) for i in range(self.num_shards)],
            "sent_objects": self.sent_objects,
            "sent_bytes": self.sent_bytes,
            "received_objects": list(self.received_objects),
            "received_bytes": list(self.received_bytes),
            "rates": self.rates.per_second(),
            "rate_window": WINDOW,
            "created": self.created,
        }


@dataclass
class Client:
    id: int
    pid: int
    holds: Counter[str] = field(default_factory=Counter)
    allocations: dict[int, int] = field(default_factory=dict)  # offset -> size
    lent: dict[tuple[str, str, int], Lent] = field(default_factory=dict)  # by (namespace, name, shard)
    sends_to: set[tuple[str, str]] = field(default_factory=set)
    receives_from: set[tuple[str, str]] = field(default_factory=set)
    datasystem: bool = False
    credit: int = 0  # inline bytes set aside for its next sends (accounts.Accounts.grant_credit)
