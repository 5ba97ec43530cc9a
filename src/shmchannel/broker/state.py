"""The broker's state and every decision about it; no I/O, no waiting.

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
from typing import Any, Callable

from ..errors import EndpointClosed, InvalidArgument
from ..store.table import ObjectTable, StoredObject, charge, describe_all, inline_span
from . import rules
from .journal import Journal
from .records import Channel, Client, Lent, Part, Signal

WAIT: Any = object()
"""Returned by an operation that must wait for a signal before it is tried again."""

#: Most inline credit one client keeps (``grant_credit``), and at most a sixteenth of the
#: store: room set aside, like a sender's spare blocks, that others cannot use meanwhile.
MAX_CREDIT = 2 << 20


class BrokerState:
    """Channels, clients and the objects between them (see the module docstring)."""

    def __init__(self, table: ObjectTable, journal: Journal | None = None) -> None:
        self.table = table
        self.journal = journal
        self.channels: dict[tuple[str, str], Channel] = {}
        self.clients: dict[int, Client] = {}
        self.channel_created = Signal()
        self.store_freed = Signal()
        self.pinned: set[str] = set()  # DataSystem keys
        self._next_client = 0
        self.foreign: dict[str, int] = {}  # dead brokers' arenas -> objects of ours still in them
        self.on_foreign_empty: Callable[[str], None] = lambda name: None
        table.on_foreign_freed = self._foreign_freed

    # -- the journal (see journal.py and recovery.py) --------------------------------------

    def _log(self, msg: dict[str, Any], payload: bytes = b"") -> None:
        if self.journal is not None:
            self.journal.record(msg, payload)

    def _foreign_freed(self, obj: StoredObject) -> None:
        assert obj.arena is not None
        self.foreign[obj.arena] -= 1
        if not self.foreign[obj.arena]:
            del self.foreign[obj.arena]
            self.on_foreign_empty(obj.arena)

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
        freed = bool(client.allocations)
        for offset in client.allocations:
            self.table.free_allocation(offset)
        client.allocations.clear()
        if client.credit:
            self.table.revoke(client.credit)
            client.credit, freed = 0, True
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

    # -- memory --------------------------------------------------------------------------

    def try_allocate(self, client: Client, sizes: list[int], spares: int = 0) -> Any:
        """Offsets for blobs of ``sizes`` (all or none), then as many as fit of up to
        ``spares`` more such sets, which never wait: (offsets, spare sets). WAIT while the
        store is too full for the first set."""
        offsets = self.table.allocate(sizes)
        if offsets is None:
            return WAIT
        sets = [offsets]
        for _ in range(spares):
            try:
                spare = self.table.allocate(sizes)
            except OSError:
                spare = None
            if spare is None:
                break
            sets.append(spare)
        for block in sets:
            for offset, size in zip(block, sizes):
                client.allocations[offset] = size
        return offsets, sets[1:]

    def free_allocations(self, client: Client, offsets: list[int]) -> None:
        for offset in offsets:
            if client.allocations.pop(offset, None) is not None:
                self.table.free_allocation(offset)
        self.store_freed.fire()

    def _claim(self, client: Client, parts: list[Part]) -> None:
        """Check that every arena part is an allocation of this client, large enough, named
        once: a block named twice would be stored once and then fail the send half done,
        leaving an object in no queue (issue 13)."""
        offsets = [part.offset for part in parts if part.inline is None]
        if len(set(offsets)) < len(offsets):
            twice = next(offset for offset in offsets if offsets.count(offset) > 1)
            raise InvalidArgument(f"offset {twice} is named by more than one part of one send")
        for part in parts:
            if part.inline is None:
                allocated = client.allocations.get(part.offset)
                if allocated is None or part.size > allocated:
                    raise InvalidArgument(f"offset {part.offset} is not an allocation of {part.size} bytes of this client")

    def _spend_credit(self, client: Client, parts: list[Part]) -> bool:
        """Count the inline parts against the store (``table.charge``): from the client's
        credit first, the rest from free room; False, with nothing counted, if the store is
        too full: the caller waits for ``store_freed`` (issue 13: inline bytes were not
        bounded at all).

        Raises:
            StoreFull: they could never fit, even in an empty store.
        """
        sizes = [len(part.inline) for part in parts if part.inline is not None]
        if not sizes:
            return True
        need = sum(map(charge, sizes))
        spent = min(client.credit, need)
        if not self.table.fits(need - spent):
            self.table.check_fits(sizes)
            return False
        client.credit -= spent
        self.table.revoke(spent)  # the objects count from now on (``table.add``)
        return True

    def grant_credit(self, client: Client, want: int) -> int:
        """Top the client's inline credit up towards ``want`` bytes with room free now (at
        most MAX_CREDIT, and a sixteenth of the store), never waiting; its credit. A sender
        posts inline sends its credit covers without waiting for their replies, as it posts
        sends into arena blocks it was given: a posted send never waits for memory."""
        more = min(want, MAX_CREDIT, self.table.capacity // 16) - client.credit
        more = min(more, self.table.free)
        if more > 0:
            self.table.grant(more)
            client.credit += more
        return client.credit

    def _store(self, client: Client, part: Part, refs: int) -> StoredObject:
        if part.inline is None:
            del client.allocations[part.offset]
            return self.table.add(part.size, offset=part.offset, refs=refs)
        return self.table.add(part.size, inline=part.inline, refs=refs)

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

    def _hold(self, client: Client, obj: StoredObject) -> None:
        """A reference for the client's zero-copy views (inline bytes travel: nothing to hold)."""
        if obj.inline is None:
            obj.refs += 1
            client.holds[obj.key] += 1

    def hold(self, client: Client, key: str) -> None:
        """One more hold on an object the client already holds (it views it once more)."""
        obj = self.table.get(key)
        if obj is not None and client.holds.get(key, 0) > 0:
            self._hold(client, obj)

    def acknowledge(self, client: Client, channel: Channel, shard: int) -> None:
        """The objects handed out from ``shard`` to ``client`` are consumed: drop their references."""
        ident = (channel.namespace, channel.name, shard)
        lent = client.lent.get(ident)
        if lent is None or not lent.taken:
            return
        freed = False
        taken = [lent.keys.popleft() for _ in range(lent.taken)]
        self._log({"r": "ack", "ns": channel.namespace, "name": channel.name, "shard": shard, "keys": taken})
        for key in taken:
            freed |= self.table.unref(key)
        lent.taken = 0
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

    # -- data system ---------------------------------------------------------------------

    def try_put(self, client: Client, part: Part) -> Any:
        """Store a DataSystem object; its key. WAIT while the store has no room for its
        inline bytes (its arena block was allocated before)."""
        self._claim(client, [part])
        if not self._spend_credit(client, [part]):
            return WAIT
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
