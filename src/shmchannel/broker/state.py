"""The broker's state and every decision about it; no I/O, no waiting.

Each operation either completes, raises the error its caller gets, or returns ``WAIT``
when it cannot proceed yet (queue full, queue empty, store full, channel missing). The
server then waits on the ``Signal`` this module names for that case and asks again: the
operation that frees a slot, enqueues a key or frees memory fires exactly that signal, so
a blocked client is woken by the event that unblocks it, never by a timer.

Delivery bookkeeping: a queue entry holds one reference to its object; ``recv`` moves that
reference to the receiving client (a *hold*) until the client releases it -- when its
zero-copy views are gone -- or disconnects. ``peek`` adds a hold of its own.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import EndpointClosed, InvalidArgument
from . import rules
from ..store.table import ObjectTable, StoredObject

WAIT: Any = object()
"""Returned by an operation that must wait for a signal before it is tried again."""


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
    sent_objects: int = 0
    sent_bytes: int = 0
    received_objects: list[int] = field(default_factory=list)
    received_bytes: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.reshape(self.num_shards)

    def reshape(self, num_shards: int) -> None:
        """Empty queues for ``num_shards`` shards (only while nothing is queued)."""
        self.num_shards = num_shards
        self.queues = [deque() for _ in range(num_shards)]
        self.data = [Signal() for _ in range(num_shards)]
        self.received_objects = [0] * num_shards
        self.received_bytes = [0] * num_shards

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def empty(self) -> bool:
        return not any(self.queues)

    def info(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "dataset_name": self.name,
            "num_shards": self.num_shards,
            "full_batch": self.full_batch,
            "max_queue_size": self.max_queue_size,
        }


@dataclass
class Client:
    id: int
    pid: int
    holds: Counter[str] = field(default_factory=Counter)
    allocations: dict[int, int] = field(default_factory=dict)  # offset -> size
    sends_to: set[tuple[str, str]] = field(default_factory=set)
    receives_from: set[tuple[str, str]] = field(default_factory=set)
    datasystem: bool = False


class BrokerState:
    def __init__(self, table: ObjectTable) -> None:
        self.table = table
        self.channels: dict[tuple[str, str], Channel] = {}
        self.clients: dict[int, Client] = {}
        self.channel_created = Signal()
        self.store_freed = Signal()
        self.pinned: set[str] = set()  # DataSystem keys
        self._next_client = 0

    # -- clients -------------------------------------------------------------------------

    def connect(self, pid: int) -> Client:
        self._next_client += 1
        client = Client(self._next_client, pid)
        self.clients[client.id] = client
        return client

    def disconnect(self, client: Client) -> None:
        """Forget a client: its unfinished allocations and holds are freed, its roles end."""
        self.clients.pop(client.id, None)
        freed = bool(client.allocations)
        for offset in client.allocations:
            self.table.free_allocation(offset)
        client.allocations.clear()
        for key, count in client.holds.items():
            freed |= self.table.unref(key, count)
        client.holds.clear()
        for ident in list(client.sends_to):
            channel = self.channels.get(ident)
            if channel is not None and channel.sender == client.id:
                # The stream does not end: what was sent stays queued, a new sender may go on.
                channel.sender = None
            self._collect(ident)
        for ident in list(client.receives_from):
            channel = self.channels.get(ident)
            if channel is not None:
                channel.receivers.pop(client.id, None)
            self._collect(ident)
        if freed:
            self.store_freed.fire()

    def idle(self) -> bool:
        return not self.clients and not self.channels and len(self.table) == 0

    # -- channels ------------------------------------------------------------------------

    def create_channel(
        self, client: Client, namespace: str, name: str, num_shards: int, full_batch: bool, max_queue_size: int
    ) -> Channel:
        ident = (namespace, name)
        channel = self.channels.get(ident)
        if channel is not None:
            rules.check_new_sender(
                namespace, name, attached=channel.sender is not None, closed=channel.closed,
                holds_data=not channel.empty, current=(channel.num_shards, channel.full_batch),
                wanted=(num_shards, full_batch),
            )
            if channel.empty and channel.num_shards != num_shards:
                channel.reshape(num_shards)
            channel.full_batch = full_batch
            channel.max_queue_size = max_queue_size
            channel.space.fire()
        else:
            channel = Channel(namespace, name, num_shards, full_batch, max_queue_size)
            self.channels[ident] = channel
        channel.sender = client.id
        client.sends_to.add(ident)
        self.channel_created.fire()
        return channel

    def channel(self, namespace: str, name: str) -> Channel:
        channel = self.channels.get((namespace, name))
        if channel is None:
            raise InvalidArgument(f"no channel {namespace}/{name}")
        return channel

    def try_attach_receiver(self, client: Client, namespace: str, name: str, shard: int) -> Any:
        """The channel, now with this client as a receiver of ``shard``; WAIT if it doesn't exist."""
        channel = self.channels.get((namespace, name))
        if channel is None:
            return WAIT
        rules.check_shard(shard, channel.num_shards, channel.label)
        channel.receivers[client.id] = shard
        client.receives_from.add((namespace, name))
        return channel

    def detach(self, client: Client, channel: Channel) -> None:
        """End this client's role (sender or receiver) on ``channel``."""
        ident = (channel.namespace, channel.name)
        channel.receivers.pop(client.id, None)
        if channel.sender == client.id:
            channel.sender = None
        client.receives_from.discard(ident)
        client.sends_to.discard(ident)
        self._collect(ident)

    def close_channel(self, client: Client, channel: Channel) -> None:
        """End of stream: receivers drain what is queued, then get ChannelClosed."""
        self._check_sender(client, channel)
        channel.closed = True
        for signal in channel.data:
            signal.fire()
        self.detach(client, channel)

    def _collect(self, ident: tuple[str, str]) -> None:
        channel = self.channels.get(ident)
        if channel is not None and channel.sender is None and not channel.receivers and channel.empty:
            del self.channels[ident]

    def _check_sender(self, client: Client, channel: Channel) -> None:
        if channel.sender != client.id:
            raise EndpointClosed(f"this client is not the sender of channel {channel.label}")

    # -- memory --------------------------------------------------------------------------

    def try_allocate(self, client: Client, sizes: list[int]) -> Any:
        """Offsets for blobs of ``sizes`` (all or none); WAIT while the store is too full."""
        offsets = self.table.allocate(sizes)
        if offsets is None:
            return WAIT
        for offset, size in zip(offsets, sizes):
            client.allocations[offset] = size
        return offsets

    def free_allocations(self, client: Client, offsets: list[int]) -> None:
        for offset in offsets:
            if client.allocations.pop(offset, None) is not None:
                self.table.free_allocation(offset)
        self.store_freed.fire()

    def _claim(self, client: Client, parts: list[Part]) -> None:
        """Check that every arena part is an allocation of this client, large enough."""
        for part in parts:
            if part.inline is None:
                allocated = client.allocations.get(part.offset)
                if allocated is None or part.size > allocated:
                    raise InvalidArgument(f"offset {part.offset} is not an allocation of {part.size} bytes of this client")

    def _store(self, client: Client, part: Part, refs: int) -> StoredObject:
        if part.inline is None:
            del client.allocations[part.offset]
            return self.table.add(part.size, offset=part.offset, refs=refs)
        return self.table.add(part.size, inline=part.inline, refs=refs)

    # -- sending and receiving -----------------------------------------------------------

    def try_send(self, client: Client, channel: Channel, parts: list[Part]) -> Any:
        """Enqueue one object (one part per shard, or one for all with full_batch), atomically."""
        self._check_sender(client, channel)
        expected = 1 if channel.full_batch else channel.num_shards
        if len(parts) != expected:
            raise InvalidArgument(f"send to {channel.label} needs {expected} parts, got {len(parts)}")
        self._claim(client, parts)
        if any(len(q) >= channel.max_queue_size for q in channel.queues):
            return WAIT
        if channel.full_batch:
            obj = self._store(client, parts[0], refs=channel.num_shards)
            for queue in channel.queues:
                queue.append(obj.key)
        else:
            for queue, part in zip(channel.queues, parts):
                queue.append(self._store(client, part, refs=1).key)
        channel.sent_objects += 1
        channel.sent_bytes += sum(p.size for p in parts)
        for signal in channel.data:
            signal.fire()
        return True

    def try_recv(self, client: Client, channel: Channel, shard: int, peek: bool) -> Any:
        """The oldest object of ``shard``, held for this client; WAIT if none yet.

        Raises:
            ChannelClosed: the channel was closed and this shard is drained.
        """
        queue = channel.queues[shard]
        if not queue:
            if channel.closed:
                raise rules.drained(channel.label, shard)
            return WAIT
        key = queue[0]
        obj = self.table.get(key)
        assert obj is not None, key
        if not peek:
            queue.popleft()
            channel.received_objects[shard] += 1
            channel.received_bytes[shard] += obj.size
            channel.space.fire()
        if obj.inline is not None:
            # The bytes travel in the reply: nothing for the client to hold or release.
            if not peek and self.table.unref(key):
                self.store_freed.fire()
        else:
            if peek:
                obj.refs += 1
            client.holds[key] += 1
        if not peek and channel.closed and channel.empty:
            for signal in channel.data:
                signal.fire()
        return obj

    def requeue(self, client: Client, channel: Channel, shard: int, key: str, inline: bytes | None) -> None:
        """Put an object a client received but never used back at the head of its queue.

        An inline object left the table when it was received; its bytes come back with the call.
        """
        if inline is not None:
            key = self.table.add(len(inline), inline=inline, refs=1).key
        elif client.holds.get(key, 0) > 0:
            client.holds[key] -= 1
            if not client.holds[key]:
                del client.holds[key]
        else:
            return
        channel.queues[shard].appendleft(key)
        channel.received_objects[shard] -= 1
        channel.data[shard].fire()

    def release(self, client: Client, keys: list[str]) -> None:
        freed = False
        for key in keys:
            if client.holds.get(key, 0) <= 0:
                continue
            client.holds[key] -= 1
            if not client.holds[key]:
                del client.holds[key]
            freed |= self.table.unref(key)
        if freed:
            self.store_freed.fire()

    def queue(self, channel: Channel, shard: int | None) -> Any:
        if shard is None:
            return {str(i): list(q) for i, q in enumerate(channel.queues)}
        return list(channel.queues[shard])

    # -- data system ---------------------------------------------------------------------

    def put(self, client: Client, part: Part) -> str:
        self._claim(client, [part])
        key = self._store(client, part, refs=1).key
        self.pinned.add(key)
        return key

    def get(self, client: Client, key: str) -> StoredObject:
        obj = self.table.get(key)
        if obj is None or key not in self.pinned:
            raise rules.no_such_key(key)
        if obj.inline is None:
            obj.refs += 1
            client.holds[key] += 1
        return obj

    def delete(self, key: str) -> None:
        if key not in self.pinned:
            raise rules.no_such_key(key)
        self.pinned.discard(key)
        if self.table.unref(key):
            self.store_freed.fire()

    # -- reporting -----------------------------------------------------------------------

    def channel_status(self, channel: Channel) -> dict[str, Any]:
        return {
            **channel.info(),
            "closed": channel.closed,
            "sender": channel.sender is not None,
            "receivers": len(channel.receivers),
            "depths": [len(q) for q in channel.queues],
            "sent_objects": channel.sent_objects,
            "sent_bytes": channel.sent_bytes,
            "received_objects": list(channel.received_objects),
            "received_bytes": list(channel.received_bytes),
            "created": channel.created,
        }
