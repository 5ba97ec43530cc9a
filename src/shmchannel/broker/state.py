"""The broker's state and every decision about it; no I/O, no waiting.

``BrokerState`` decides about channels, clients and the delivery of objects between them;
what they take of the store -- allocations, inline credit, holds, the DataSystem's
objects -- is accounted by its base, ``Accounts`` (accounts.py).

Each operation either completes, raises the error its caller gets, or returns ``WAIT``
when it cannot proceed yet (queue full, queue empty, store full, channel missing). The
server then waits on the ``Signal`` (records.py) named for that case and asks again: the
operation that frees a slot, enqueues a key or frees memory fires exactly that signal, so
a blocked client is woken by the event that unblocks it, never by a timer.

Delivery bookkeeping: a queue entry holds one reference to its object. ``recv`` moves it
to the receiving client's ``Lent`` record and, for an arena object, adds a *hold* for the
client's zero-copy views, released when they are gone. A recv may take several objects
(prefetch): the first is handed to the user, the others are *reserved* -- they wait in the
client and still count as queued (for ``max_queue_size``, ``queue`` and status) until the
client hands the next one out (``take_next``). A handed-out object is acknowledged -- and
its reference dropped -- by the client's next ``recv``/``peek``/``take_next`` of that shard
or by detaching; what it gives back unused (``requeue``), or holds when its connection
drops, goes back to the head of the queue, in order. ``peek`` adds a hold of its own.
"""

from __future__ import annotations

import itertools

from collections import deque
from typing import Any, Collection

from ..errors import EndpointClosed, InvalidArgument
from ..store.table import ObjectTable, StoredObject, describe_all, inline_span
from . import rules
from .accounts import WAIT, Accounts
from .journal import Journal
from .records import Channel, Client, Lent, Part, Signal


class BrokerState(Accounts):
    """Channels, clients and the objects between them (see the module docstring)."""

    def __init__(self, table: ObjectTable, journal: Journal | None = None) -> None:
        super().__init__(table)
        self.journal = journal
        self.channels: dict[tuple[str, str], Channel] = {}
        self.clients: dict[int, Client] = {}
        self.channel_created = Signal()
        self._next_client = 0

    # -- the journal (see journal.py and recovery.py) --------------------------------------

    def _log(self, msg: dict[str, Any], payload: bytes = b"") -> None:
        if self.journal is not None:
            self.journal.record(msg, payload)

    # -- clients -------------------------------------------------------------------------

    def connect(self, pid: int) -> Client:
        self._next_client += 1
        client = Client(self._next_client, pid)
        self.clients[client.id] = client
        return client

    def disconnect(self, client: Client) -> None:
        """Forget a client: its unfinished allocations and holds are freed, its roles end."""
        self.clients.pop(client.id, None)
        for namespace, name, shard in list(client.lent):
            channel = self.channels.get((namespace, name))
            if channel is not None:  # delivered, never acknowledged: the next receiver gets it
                self._give_back(client, channel, shard)
        client.lent.clear()
        freed = self._settle(client)
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
        in_use = sum(c.num_shards for c in self.channels.values()) - (channel.num_shards if channel else 0)
        rules.check_shards_in_all(in_use, num_shards)
        if channel is not None:
            rules.check_new_sender(
                namespace, name, attached=channel.sender is not None, closed=channel.closed,
                current=channel.shape, wanted=rules.Shape(num_shards, full_batch, max_queue_size),
                queued=sum(map(len, channel.queues)), receivers=self._receivers(channel),
            )
            if channel.num_shards != num_shards:  # nothing is built on the old shape (checked above)
                channel.reshape(num_shards)
            channel.full_batch = full_batch
            channel.max_queue_size = max_queue_size
            channel.space.fire()
        else:
            channel = Channel(namespace, name, num_shards, full_batch, max_queue_size)
            self.channels[ident] = channel
        self._log(channel.record())
        channel.sender = client.id
        client.sends_to.add(ident)
        self.channel_created.fire()
        return channel

    def _receivers(self, channel: Channel) -> list[rules.ReceiverUse]:
        """The receivers attached to ``channel``, each with the objects of it it holds."""
        ident = (channel.namespace, channel.name)
        uses = []
        for client_id, shard in channel.receivers.items():
            client = self.clients[client_id]
            held = sum(len(lent.keys) for (ns, name, _), lent in client.lent.items() if (ns, name) == ident)
            uses.append(rules.ReceiverUse(shard, held, f"pid {client.pid}"))
        return uses

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

    def detach(self, client: Client, channel: Channel, give_back: list[str] | None = None) -> None:
        """End this client's role (sender or receiver) on ``channel``; the objects it handed
        out named in ``give_back`` go back to the head of their queue with the ones it has
        not handed out, in order (an object received for a call that gave up: aio.py)."""
        ident = (channel.namespace, channel.name)
        for shard in range(channel.num_shards):
            lent = client.lent.get((channel.namespace, channel.name, shard))
            if lent is not None and give_back:
                handed = [k for k in itertools.islice(lent.keys, lent.taken) if k in give_back]
                self.requeue(client, channel, shard, handed + list(itertools.islice(lent.keys, lent.taken, None)))
            self.acknowledge(client, channel, shard)
            self._give_back(client, channel, shard)  # reserved, never handed out: for the next receiver
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
        self._log({"r": "close", "ns": channel.namespace, "name": channel.name})
        for signal in channel.data:
            signal.fire()
        self.detach(client, channel)

    def _collect(self, ident: tuple[str, str]) -> None:
        channel = self.channels.get(ident)
        if channel is not None and channel.sender is None and not channel.receivers and channel.empty:
            del self.channels[ident]
            self._log({"r": "drop", "ns": channel.namespace, "name": channel.name})

    def _check_sender(self, client: Client, channel: Channel) -> None:
        if channel.sender != client.id:
            raise EndpointClosed(f"this client is not the sender of channel {channel.label}")

    def _check_receiver(self, client: Client, channel: Channel, shard: int) -> None:
        """Only an attached receiver takes objects: what it is lent is given back when it
        detaches or leaves, and the channel is collected after that. A client that never
        opened would drain the channel and never be counted (issue 13: the channel stayed,
        and the broker never idled out)."""
        if channel.receivers.get(client.id) != shard:
            raise EndpointClosed(f"this client is not a receiver of shard {shard} of channel {channel.label}: open it first")

    # -- sending and receiving -----------------------------------------------------------

    def try_send(self, client: Client, channel: Channel, parts: list[Part]) -> Any:
        """Enqueue one object (one part per shard, or one for all with full_batch), atomically;
        return the room left (see ``Channel.room``)."""
        self._check_sender(client, channel)
        expected = 1 if channel.full_batch else channel.num_shards
        if len(parts) != expected:
            raise InvalidArgument(f"send to {channel.label} needs {expected} parts, got {len(parts)}")
        self._claim(client, parts)
        if channel.room() == 0 or not self._spend_credit(client, parts):
            return WAIT
        if channel.full_batch:
            stored = [self._store(client, parts[0], refs=channel.num_shards)]
            for queue in channel.queues:
                queue.append(stored[0].key)
        else:
            stored = [self._store(client, part, refs=1) for part in parts]
            for queue, obj in zip(channel.queues, stored):
                queue.append(obj.key)
        if self.journal is not None:  # one record: the objects and where they were queued
            objects, inline = describe_all(stored)
            self._log({"r": "send", "ns": channel.namespace, "name": channel.name, "objects": objects}, inline)
        nbytes = sum(p.size for p in parts)
        channel.sent_objects += 1
        channel.sent_bytes += nbytes
        channel.rates.add(1, nbytes, 0, 0)
        for signal in channel.data:
            signal.fire()
        return channel.room()

    def try_recv(
        self, client: Client, channel: Channel, shard: int, peek: bool, limit: int = 1, max_inline: int | None = None
    ) -> Any:
        """The oldest (up to ``limit``) objects of ``shard``, lent to this client, the first
        handed out and the others reserved; WAIT if none yet. Acknowledges the objects the
        client was handed from this shard before. With ``max_inline``, no object joins the
        batch whose inline bytes would take the reply's payload past it (the first always
        goes: one object's payload is within the bound it was sent under).

        Raises:
            ChannelClosed: the channel was closed and this shard is drained.
            EndpointClosed: this client is not attached as a receiver of ``shard``.
        """
        self._check_receiver(client, channel, shard)
        self.acknowledge(client, channel, shard)
        queue = channel.queues[shard]
        if not queue:
            if channel.closed:
                raise rules.drained(channel.label, shard)
            return WAIT
        if peek:
            obj = self.table.get(queue[0])
            assert obj is not None, queue[0]
            self._hold(client, obj)
            return [obj]
        lent = client.lent.setdefault((channel.namespace, channel.name, shard), Lent())
        objs: list[StoredObject] = []
        payload = 0
        while queue and len(objs) < limit:
            obj = self.table.get(queue[0])
            assert obj is not None
            payload = inline_span(payload, obj)
            if objs and max_inline is not None and payload > max_inline:
                break
            queue.popleft()
            lent.keys.append(obj.key)  # the queue's reference goes with it
            self._hold(client, obj)
            channel.received_objects[shard] += 1
            channel.received_bytes[shard] += obj.size
            objs.append(obj)
        lent.taken += 1
        channel.reserved[shard] += len(objs) - 1
        channel.rates.add(0, 0, len(objs), sum(obj.size for obj in objs))
        channel.space.fire()
        if channel.closed and channel.empty:
            for signal in channel.data:
                signal.fire()
        return objs

    def take_next(self, client: Client, channel: Channel, shard: int, key: str | None = None) -> None:
        """The client hands its next reserved object (``key``) to the user, acknowledging
        the ones before. Said twice of one object (an interrupted recv hands it out again)
        it changes nothing the second time."""
        lent = client.lent.get((channel.namespace, channel.name, shard))
        if key is not None and lent is not None and key in itertools.islice(lent.keys, lent.taken):
            return  # handed out already
        self.acknowledge(client, channel, shard)
        if lent is None or len(lent.keys) <= lent.taken:
            return
        lent.taken += 1
        channel.reserved[shard] -= 1
        channel.space.fire()

    def acknowledge(self, client: Client, channel: Channel, shard: int, keep: Collection[str] = ()) -> None:
        """The objects handed out from ``shard`` to ``client`` are consumed: drop their
        references -- but those in ``keep``, which the client still has unused (its note
        went, then an interrupt put the object back in its buffer)."""
        ident = (channel.namespace, channel.name, shard)
        lent = client.lent.get(ident)
        if lent is None or not lent.taken:
            return
        freed = False
        taken = [lent.keys.popleft() for _ in range(lent.taken)]
        kept = [key for key in taken if key in keep]
        if kept:
            taken = [key for key in taken if key not in keep]
            lent.keys.extendleft(reversed(kept))
        lent.taken = len(kept)
        self._log({"r": "ack", "ns": channel.namespace, "name": channel.name, "shard": shard, "keys": taken})
        for key in taken:
            freed |= self.table.unref(key)
        if not lent.keys:
            del client.lent[ident]
        if freed:
            self.store_freed.fire()

    def _give_back(self, client: Client, channel: Channel, shard: int) -> None:
        """Requeue everything ``client`` still has lent from ``shard``, and forget the record."""
        ident = (channel.namespace, channel.name, shard)
        lent = client.lent.get(ident)
        if lent is not None:
            self.requeue(client, channel, shard, list(lent.keys))
            client.lent.pop(ident, None)

    def requeue(self, client: Client, channel: Channel, shard: int, keys: list[str]) -> None:
        """Put objects lent to ``client`` back at the head of ``shard``'s queue, in order:
        it gave them back unused, or its connection dropped before it acknowledged them."""
        lent = client.lent.get((channel.namespace, channel.name, shard))
        if lent is None:
            return
        wanted = set(keys)
        back: list[str] = []
        kept: deque[str] = deque()
        taken = 0
        for i, key in enumerate(lent.keys):
            if key in wanted:
                back.append(key)
                if i >= lent.taken:
                    channel.reserved[shard] -= 1
            else:
                kept.append(key)
                taken += i < lent.taken
        lent.keys, lent.taken = kept, taken
        nbytes = 0
        for key in back:
            if client.holds.get(key, 0) > 0:  # the views' hold; the lent reference stays
                self.release(client, [key])
            nbytes += self.table.get(key).size  # type: ignore[union-attr]
        if back:
            channel.received_objects[shard] -= len(back)
            channel.received_bytes[shard] -= nbytes
            channel.rates.add(0, 0, -len(back), -nbytes)
            channel.queues[shard].extendleft(reversed(back))
            channel.data[shard].fire()

    def queue(self, channel: Channel, shard: int | None, lent: bool = False) -> Any:
        """Keys not handed to a user yet, oldest first: reserved by receivers, then queued
        (with ``lent``: also those handed out and not acknowledged, first)."""
        if shard is None:
            return {str(i): self.queue(channel, i, lent) for i in range(channel.num_shards)}
        out = []
        for client_id in channel.receivers:
            record = self.clients[client_id].lent.get((channel.namespace, channel.name, shard))
            if record is not None:
                out += list(record.keys) if lent else record.reserved
        return out + list(channel.queues[shard])
