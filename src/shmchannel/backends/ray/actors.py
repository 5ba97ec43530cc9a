"""The Ray backend's broker: one named, detached, async actor per channel, keeping metadata only.

Imported only inside Ray (``ray`` is an optional extra). The actor never blocks its event
loop and never polls: a recv waits on an ``asyncio.Condition`` that the put feeding it
notifies; a put that must wait for room waits on the same condition.

What it keeps per shard is a FIFO of *entries*: a key, the part itself when it is small
(``INLINE_THRESHOLD``: it goes back inline with the reply to recv, one call), else a
reference to the part in Ray's object store, on the node of the sender that made it, with
that node's id and the part's size. The bytes of a large part never come here: receivers
pull them from the node that holds them. Who owns each of them, and when that changes:
``ownership.py``.

Order: a sender does not wait for the reply to a put while it knows there is room
(``sender.py``), so its puts carry a sequence number and are queued in that order, whatever
order Ray starts them in (Ray orders the tasks of an async actor by submission, but its
documentation promises it for synchronous actors only).

Delivery: the entries a receiver gets stay *lent* to it until it acknowledges them
(``through``: the key of the last object it handed to its user, sent with its next
``get``, ``ack`` or ``detach``); a receiver fetches up to ``want`` entries per call
(``prefetch``) and gives back at ``detach`` those it never handed out. Each receiver gives
the actor a ``Lease``, a tiny actor it owns, which Ray kills when the receiver's process
dies; while entries are lent, the actor checks the leases every ``LEASE_CHECK`` seconds and
puts a dead receiver's entries back at the head of their queue, in order (at-least-once, as
on the embedded broker).

Replies are tuples: ``("ok", ...)`` or ``("error", code, message)``; the client maps the
code to the same exception class the embedded backend raises (``errors.from_wire``).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import deque
from typing import Any, Awaitable, Callable

import ray

from ...broker import rules
from ...broker.rates import WINDOW, Rates
from ...errors import ChannelError, EndpointClosed, InvalidArgument
from .ownership import Adoption, Entry

PREFIX = "shmchannel:"
LEASE_CHECK = 1.0  # seconds between liveness checks of receivers holding unacknowledged objects
#: How long a closing sender's puts still in flight may take to arrive (they were sent
#: before close, so they normally come within milliseconds).
CLOSE_WAIT = 30.0


@ray.remote(num_cpus=0, max_restarts=0)
class Lease:
    """Owned by an endpoint's process, so it dies with it: the actors that care ping it."""

    def ping(self) -> bool:
        return True


def actor_name(dataset_name: str) -> str:
    return PREFIX + dataset_name


def channel_actor(namespace: str, dataset_name: str) -> Any:
    """The handle of the channel's actor, made (detached, named) if there is none."""
    return ChannelActor.options(  # type: ignore[attr-defined]
        name=actor_name(dataset_name), namespace=namespace, lifetime="detached", get_if_exists=True
    ).remote(namespace, dataset_name)


def error_reply(exc: Exception) -> tuple[str, str, str]:
    return ("error", getattr(exc, "code", "error"), str(exc))


def _answers(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A ChannelError the method raises becomes its ("error", code, message) reply."""

    @functools.wraps(method)
    async def answer(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except ChannelError as exc:
            return error_reply(exc)

    return answer


async def _wait(cond: asyncio.Condition, ready: Any, timeout: float | None) -> bool:
    """Wait on ``cond`` (held) until ``ready()``; False if ``timeout`` ran out first."""
    if ready():
        return True
    if timeout is not None and timeout <= 0:
        return False
    try:
        await asyncio.wait_for(cond.wait_for(ready), timeout)
    except asyncio.TimeoutError:
        return False
    return True


@ray.remote(num_cpus=0, max_restarts=0)
class ChannelActor(Adoption):
    """Per-shard FIFO queues of entries for one (namespace, dataset_name)."""

    def __init__(self, namespace: str, dataset_name: str) -> None:
        self.namespace = namespace
        self.name = dataset_name
        self.configured = False
        self.num_shards = 0
        self.full_batch = False
        self.max_queue_size = 0
        self.queues: list[deque[Entry]] = []
        self.sender: str | None = None
        self.next_seq = 0  # the sender's next put to queue (see the module docstring: order)
        self.adopt_after = 1.0  # seconds an entry waits in its queue before its holder adopts it
        self.holder_idle = 60.0  # the idle time of holders we start (holder.py)
        self._adopter: asyncio.Task[None] | None = None
        self._adopting = asyncio.Lock()  # one adoption at a time (ownership.py)
        self.closing = False  # the sender's close waits for its puts in flight
        self.waiting_room = False  # the sender's next put waits for room
        self.closed = False
        self.receivers: dict[str, int] = {}
        self.leases: dict[str, Any] = {}  # receiver token -> its Lease
        self.lent: dict[str, list[tuple[int, Entry]]] = {}  # token -> (shard, entry), in the order lent
        self._watch: asyncio.Task[None] | None = None
        self.sent_objects = 0
        self.sent_bytes = 0
        self.received: list[int] = []
        self.received_bytes: list[int] = []
        self.rates = Rates()
        self.created = time.time()
        self._keys = (f"{n:x}" for n in itertools.count(1))
        # (Since Python 3.10 an asyncio primitive binds to the loop that first waits on it,
        # not the one running when it is made: the actor's loop runs in another thread.)
        self.cond = asyncio.Condition()

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    def _info(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace, "dataset_name": self.name, "num_shards": self.num_shards,
            "full_batch": self.full_batch, "max_queue_size": self.max_queue_size,
        }

    def _room(self) -> int:
        """Objects the sender may still queue before a shard is full."""
        return self.max_queue_size - max(map(len, self.queues), default=0)

    def _disposable(self) -> bool:
        """Nothing left to deliver and nobody attached: the client that sees this kills us."""
        return self.sender is None and not self.receivers and not any(self.queues) and not self.lent

    @_answers
    async def attach_sender(
        self, token: str, num_shards: int, full_batch: bool, max_queue_size: int, adopt_after: float = 1.0,
        holder_idle: float = 60.0,
    ) -> Any:
        rules.check_channel_shape(num_shards, max_queue_size)
        async with self.cond:
            wanted = rules.Shape(num_shards, full_batch, max_queue_size)
            current = rules.Shape(self.num_shards, self.full_batch, self.max_queue_size) if self.configured else wanted
            rules.check_new_sender(
                self.namespace, self.name, attached=self.sender is not None, closed=self.closed,
                current=current, wanted=wanted, queued=sum(map(len, self.queues)),
                receivers=[rules.ReceiverUse(shard, len(self.lent.get(t, ()))) for t, shard in self.receivers.items()],
            )
            if self.num_shards != num_shards:  # nothing is built on the old shape (checked above)
                self.queues = [deque() for _ in range(num_shards)]
                self.received = [0] * num_shards
                self.received_bytes = [0] * num_shards
            self.num_shards, self.full_batch, self.max_queue_size = num_shards, full_batch, max_queue_size
            self.configured = True
            self.sender, self.next_seq, self.closing = token, 0, False
            self.adopt_after, self.holder_idle = adopt_after, holder_idle
            self.cond.notify_all()
            return ("ok", {**self._info(), "room": self._room()})

    @_answers
    async def attach_receiver(self, token: str, shard: int, wait: float | None, lease: Any = None) -> Any:
        async with self.cond:
            if not await _wait(self.cond, lambda: self.configured, wait):
                raise rules.not_found(self.namespace, self.name, wait)
            rules.check_shard(shard, self.num_shards, self.label)
            self.receivers[token] = shard
            if lease is not None:
                self.leases[token] = lease
            return ("ok", self._info())

    @_answers
    async def put(self, token: str, seq: int, puts: list[tuple[Any, ...]]) -> Any:
        """Queue the sender's objects number ``seq``, ``seq + 1``... (one per item of ``puts``),
        after its number ``seq - 1``.

        Each put is (parts, refs, timeout, asked, sizes, node, credited). ``parts[i]``: part
        i encoded (``wire.encode``) when it travels inline, else None, and its reference is
        the next of ``refs`` (put, and owned, by the sender on ``node``; we borrow it).
        ``credited``: the sender counted room for it, so it does not wait for room (a
        receiver's death may have put entries back meanwhile: the queue then holds a few
        more than ``max_queue_size`` for a moment). Replies ("ok", room).
        """
        async with self.cond:
            await self.cond.wait_for(lambda: self.sender != token or self.next_seq >= seq)
            if self.sender != token:
                raise EndpointClosed(f"this client is not the sender of channel {self.label}")
            try:
                answer: Any = ("ok", self._room())
                for parts, refs, timeout, asked, sizes, node, credited in puts:
                    answer = self._queue(parts, refs, sizes, node) if credited else await self._queue_when_room(
                        token, parts, refs, sizes, node, timeout, asked)
                return answer
            finally:
                self.next_seq = seq + len(puts)  # queued or refused: the turn passes on
                self.cond.notify_all()

    async def _queue_when_room(
        self, token: str, parts: list[Any], refs: list[Any], sizes: list[int], node: str | None,
        timeout: float | None, asked: float | None,
    ) -> Any:
        self.waiting_room = True
        self.cond.notify_all()  # a queue() of the sender waits for this or for its puts
        try:
            room = await _wait(self.cond, lambda: self.closing or self.sender != token or self._room() > 0, timeout)
        finally:
            self.waiting_room = False
        if self.closing or self.sender != token:  # close() from another thread of the sender while this waited
            raise EndpointClosed("closed by close() from another thread while waiting")
        if not room:
            raise rules.send_timeout(asked, self.label, self.max_queue_size)
        return self._queue(parts, refs, sizes, node)

    def _queue(self, parts: list[Any], refs: list[Any], sizes: list[int], node: str | None) -> Any:
        expected = 1 if self.full_batch else self.num_shards
        if len(parts) != expected or len(sizes) != expected:
            raise InvalidArgument(f"send to {self.label} needs {expected} parts, got {len(parts)}")
        if len(refs) != sum(part is None for part in parts):
            raise InvalidArgument(f"send to {self.label}: {len(refs)} references for {len(parts)} parts")
        held = iter(refs)
        entries = [
            Entry(next(self._keys), True, part, size, None) if part is not None
            else Entry(next(self._keys), False, next(held), size, node)
            for part, size in zip(parts, sizes)
        ]
        for queue, entry in zip(self.queues, entries * self.num_shards if self.full_batch else entries):
            queue.append(entry)
        if not all(entry.inline for entry in entries):
            self._adopt_soon()
        self.sent_objects += 1
        self.sent_bytes += sum(sizes)
        self.rates.add(1, sum(sizes), 0, 0)
        return ("ok", self._room())

    @_answers
    async def get(
        self, token: str, shard: int, peek: bool, timeout: float | None, asked: float | None, want: int = 1,
        through: str | None = None,
    ) -> Any:
        """Up to ``want`` entries of ``shard`` (one for a peek, which lends nothing), after
        acknowledging what was lent to ``token`` up to key ``through``. Replies ("ok",
        [entry.public(), ...])."""
        rules.check_shard(shard, self.num_shards)
        async with self.cond:
            self._ack(token, through)
            queue = self.queues[shard]
            if token not in self.receivers:  # detached by close() from another thread before this came
                raise EndpointClosed("closed by close() from another thread while waiting")
            ready = await _wait(self.cond, lambda: bool(queue) or self.closed or token not in self.receivers, timeout)
            if token not in self.receivers:  # close() from another thread of the receiver
                raise EndpointClosed("closed by close() from another thread while waiting")
            if not ready:
                raise rules.recv_timeout(peek, asked, shard, self.label)
            if not queue:
                raise rules.drained(self.label, shard)
            if peek:
                return ("ok", [queue[0].public()])
            taken = [queue.popleft() for _ in range(min(max(want, 1), len(queue)))]
            nbytes = sum(entry.size for entry in taken)
            self.received[shard] += len(taken)
            self.received_bytes[shard] += nbytes
            self.rates.add(0, 0, len(taken), nbytes)
            self.lent.setdefault(token, []).extend((shard, entry) for entry in taken)
            if token in self.leases and self._watch is None:
                self._watch = asyncio.ensure_future(self._watch_leases())
            self.cond.notify_all()  # room for the sender
            return ("ok", [entry.public() for entry in taken])

    def _ack(self, token: str, through: str | None) -> None:
        """What was lent to ``token`` up to key ``through`` is consumed (said again: nothing)."""
        lent = self.lent.get(token)
        if not lent or through is None:
            return
        for i, (_, entry) in enumerate(lent):
            if entry.key == through:
                del lent[: i + 1]
                self.cond.notify_all()  # a closing sender waits for its objects to be taken
                break
        if not lent:
            del self.lent[token]

    async def ack(self, token: str, through: str | None) -> Any:
        async with self.cond:
            self._ack(token, through)
        return ("ok",)

    async def current(self, token: str, key: str) -> Any:
        """The entry under ``key`` lent to ``token`` or queued (a peek's), as it is now
        (adopted since it was handed out, perhaps), or None."""
        queued = (entry for queue in self.queues for entry in queue)
        for entry in itertools.chain((e for _, e in self.lent.get(token, ())), queued):
            if entry.key == key:
                return entry.public()
        return None

    async def requeue(self, token: str, shard: int, keys: list[str]) -> None:
        """Put back entries lent to ``token`` that never reached its user (a cut-short get)."""
        async with self.cond:
            lent = self.lent.get(token, [])
            back = [entry for lent_shard, entry in lent if lent_shard == shard and entry.key in keys]
            self.lent[token] = [(s, e) for s, e in lent if not (s == shard and e.key in keys)]
            self._put_back(shard, back)

    def _put_back(self, shard: int, entries: list[Entry]) -> None:
        if not entries:
            return
        nbytes = sum(entry.size for entry in entries)
        self.queues[shard].extendleft(reversed(entries))
        self.received[shard] -= len(entries)
        self.received_bytes[shard] -= nbytes
        self.rates.add(0, 0, -len(entries), -nbytes)
        self.cond.notify_all()

    def _give_back(self, token: str) -> None:
        lent = self.lent.pop(token, [])
        for shard in range(self.num_shards):
            self._put_back(shard, [entry for lent_shard, entry in lent if lent_shard == shard])

    async def _watch_leases(self) -> None:
        """While objects are lent, put those of receivers whose process died back."""
        try:
            while any(token in self.leases for token in self.lent):
                await asyncio.sleep(LEASE_CHECK)
                for token in [t for t in self.lent if t in self.leases]:
                    try:
                        await asyncio.wait_for(self.leases[token].ping.remote(), 10)
                    except ray.exceptions.RayActorError:
                        async with self.cond:
                            self._give_back(token)
                            self.receivers.pop(token, None)
                            self.leases.pop(token, None)
                    except asyncio.TimeoutError:
                        pass  # unreachable for now (a busy or partitioned node): not proven dead
        finally:
            self._watch = None

    @_answers
    async def queue(self, shard: int | None, token: str | None = None, sent: int = 0) -> Any:
        """The keys queued, oldest first; asked by the sender ``token``, after its puts in
        flight (``sent``: how many it made) are queued, or one waits for room."""
        if token is not None:
            async with self.cond:
                await _wait(self.cond, lambda: self.sender != token or self.next_seq >= sent or self.waiting_room, CLOSE_WAIT)
        if shard is None:
            return ("ok", {i: [e.key for e in q] for i, q in enumerate(self.queues)})
        rules.check_shard(shard, self.num_shards)
        return ("ok", [e.key for e in self.queues[shard]])

    async def close(self, token: str, end_of_stream: bool, sent: int) -> tuple[bool, int]:
        """The sender leaves (ending the stream if asked) once its ``sent`` puts are queued or
        failed, and no object it still owns is left, queued or lent: each is taken and
        acknowledged by a receiver or, at the latest when it has waited ``adopt_after``
        seconds, adopted (the sender may exit once we answer). Replies (may the actor now be
        killed, how many objects could not be adopted: they die with the sender's process).

        Waiting for the receivers first spares a copy of what they take at once, the usual
        end of a stream whose receivers keep up: adopting every object still lent or queued
        at once, ``make bench``'s large (24 objects of 64 MiB per rep, 10 queued) ran at
        93-121 msgs/s, against 166-173 waiting (two A/B rounds, same minutes)."""
        failed = 0
        try:
            async with self.cond:
                if self.sender == token:
                    self.closing = True
                    self.cond.notify_all()  # a put waiting for room ends (EndpointClosed)
                    await _wait(self.cond, lambda: self.sender != token or self.next_seq >= sent, CLOSE_WAIT)
                    left = self._unadopted()
                    if left:
                        due = max(e.since for e in left) + self.adopt_after - time.monotonic()
                        await _wait(self.cond, lambda: not self._unadopted(), due)
            if self.sender == token:
                failed = await self._adopt_for_close()
        finally:  # whatever failed, the sender leaves: a channel kept by a dead one would be stuck
            async with self.cond:
                if self.sender == token:
                    self.sender = None
                    self.closed = self.closed or end_of_stream
                    self.cond.notify_all()
        return self._disposable(), failed

    async def detach(self, token: str, through: str | None = None) -> bool:
        """A receiver leaves: acknowledged up to ``through``, the rest of what it was lent
        goes back to the head of its queue, in order."""
        async with self.cond:
            self._ack(token, through)
            self._give_back(token)
            self.receivers.pop(token, None)
            self.leases.pop(token, None)
            self.cond.notify_all()  # a get of this receiver's other thread ends
            return self._disposable()

    async def status(self) -> dict[str, Any]:
        """This channel's figures, with the same keys as the embedded broker's (``shmchannel.status``),
        and ``held_bytes``: bytes queued per node that holds them (inline ones: here), and
        ``unadopted_bytes``: bytes queued or lent whose sender still owns them (ownership.py)."""
        held: dict[str, int] = {}
        for queue in self.queues:
            for entry in queue:
                where = entry.node or "inline"
                held[where] = held.get(where, 0) + entry.size
        return {
            **self._info(),
            "closed": self.closed,
            "sender": self.sender is not None,
            "receivers": len(self.receivers),
            "shard_receivers": rules.receivers_per_shard(self.receivers.values(), self.num_shards),
            "depths": [len(q) for q in self.queues],
            "sent_objects": self.sent_objects,
            "sent_bytes": self.sent_bytes,
            "received_objects": list(self.received),
            "received_bytes": list(self.received_bytes),
            "rates": self.rates.per_second(),
            "rate_window": WINDOW,
            "created": self.created,
            "held_bytes": held,
            "unadopted_bytes": sum(entry.size for entry in self._unadopted()),
        }
