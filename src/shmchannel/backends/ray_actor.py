"""The Ray backend's broker: one named, detached, async actor per channel (and one for DataSystem).

Imported only inside Ray (``ray`` is an optional extra). The actor never blocks its event
loop and never polls: a recv waits on an ``asyncio.Condition`` that the put feeding it
notifies; a put waits on the same condition for space.

Ownership: a Ray object dies with the process that created it (ray-notes.md). So the data
is passed to ``put`` by value and the actor stores it with ``ray.put`` itself: the actor
owns every queued object, which therefore outlives the sender. That costs one copy inside
the object store on the actor's node -- the price of "data outlives the sender" in Ray.

What the actor keeps is encoded parts, never user objects: each part arrives as a few uint8
arrays in our layout (``ray.encode``), is stored and returned as it is, and only the
receiving client decodes it; so the layout, not Ray's pickling of the object, decides
where the user's buffers start (64-byte boundaries, issue 11).

Delivery: an object a receiver gets stays *lent* to it until it acknowledges it (its next
``get``, ``ack`` or ``detach``). Each receiver gives the actor a ``Lease``, a tiny actor it
owns, which Ray kills when the receiver's process dies; while objects are lent, the actor
checks the leases every ``LEASE_CHECK`` seconds and puts a dead receiver's objects back at
the head of their queue, in order (at-least-once, as on the embedded broker).

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

from ..broker import rules
from ..broker.rates import WINDOW, Rates
from ..errors import ChannelError, EndpointClosed, InvalidArgument

PREFIX = "shmchannel:"
DATASYSTEM = PREFIX + "datasystem"
LEASE_CHECK = 1.0  # seconds between liveness checks of receivers holding unacknowledged objects


@ray.remote(num_cpus=0, max_restarts=0)
class Lease:
    """Owned by a receiver's process, so it dies with it: the channel actor pings it."""

    def ping(self) -> bool:
        return True


def actor_name(dataset_name: str) -> str:
    return PREFIX + dataset_name


def _error(exc: Exception) -> tuple[str, str, str]:
    return ("error", getattr(exc, "code", "error"), str(exc))


def _answers(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A ChannelError the method raises becomes its ("error", code, message) reply."""

    @functools.wraps(method)
    async def answer(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except ChannelError as exc:
            return _error(exc)

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
class ChannelActor:
    """Per-shard FIFO queues of (key, ref) for one (namespace, dataset_name)."""

    def __init__(self, namespace: str, dataset_name: str) -> None:
        self.namespace = namespace
        self.name = dataset_name
        self.configured = False
        self.num_shards = 0
        self.full_batch = False
        self.max_queue_size = 0
        # (key, inline, payload, size): payload is the encoded part itself (small ones) or
        # [ref] of it; size is its data's size, as the sender measured it (for status)
        self.queues: list[deque[tuple[str, bool, Any, int]]] = []
        self.sender: str | None = None
        self.closed = False
        self.receivers: dict[str, int] = {}
        self.leases: dict[str, Any] = {}  # receiver token -> its Lease
        self.lent: dict[str, list[tuple[int, tuple[str, bool, Any, int]]]] = {}  # token -> (shard, entry)
        self._watch: asyncio.Task[None] | None = None
        self.sent_objects = 0
        self.sent_bytes = 0
        self.received: list[int] = []
        self.received_bytes: list[int] = []
        self.rates = Rates()
        self.created = time.time()
        self._keys = (f"{n:x}" for n in itertools.count(1))
        self._cond: asyncio.Condition | None = None

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:  # made in the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"

    def _info(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace, "dataset_name": self.name, "num_shards": self.num_shards,
            "full_batch": self.full_batch, "max_queue_size": self.max_queue_size,
        }

    def _disposable(self) -> bool:
        """Nothing left to deliver and nobody attached: the client that sees this kills us."""
        return self.sender is None and not self.receivers and not any(self.queues) and not self.lent

    @_answers
    async def attach_sender(self, token: str, num_shards: int, full_batch: bool, max_queue_size: int) -> Any:
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
            self.sender = token
            self.cond.notify_all()
            return ("ok", self._info())

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
    async def put(
        self, token: str, parts: list[Any], inline: list[bool], timeout: float | None, asked: float | None,
        sizes: list[int] | None = None,
    ) -> Any:
        """Queue one object, given as its encoded parts; ``inline[i]``: part i is small
        and is kept (and returned) by value; ``sizes[i]``: its size (counted for status; 0
        if a client does not say)."""
        if self.sender != token:
            raise EndpointClosed(f"this client is not the sender of channel {self.label}")
        expected = 1 if self.full_batch else self.num_shards
        if len(parts) != expected:
            raise InvalidArgument(f"send to {self.label} needs {expected} parts, got {len(parts)}")
        # We own what we keep: it outlives the sender. Small parts stay values here and go
        # back inline with get (one RPC instead of get + fetch from this actor).
        sizes = list(sizes) if sizes is not None and len(sizes) == len(parts) else [0] * len(parts)
        entries = [
            (True, part, size) if small else (False, [ray.put(part)], size)
            for part, small, size in zip(parts, inline, sizes)
        ]
        async with self.cond:
            room = await _wait(
                self.cond, lambda: self.sender != token or all(len(q) < self.max_queue_size for q in self.queues), timeout
            )
            if self.sender != token:  # close() from another thread of the sender while this waited
                raise EndpointClosed("closed by close() from another thread while waiting")
            if not room:
                raise rules.send_timeout(asked, self.label, self.max_queue_size)
            if self.full_batch:
                key = next(self._keys)
                for queue in self.queues:
                    queue.append((key, *entries[0]))
            else:
                for queue, entry in zip(self.queues, entries):
                    queue.append((next(self._keys), *entry))
            self.sent_objects += 1
            self.sent_bytes += sum(sizes)
            self.rates.add(1, sum(sizes), 0, 0)
            self.cond.notify_all()
        return ("ok",)

    @_answers
    async def get(self, token: str, shard: int, peek: bool, timeout: float | None, asked: float | None) -> Any:
        rules.check_shard(shard, self.num_shards)
        async with self.cond:
            self.lent.pop(token, None)  # what it had is consumed: it asks for more
            queue = self.queues[shard]
            attached = token in self.receivers
            ready = await _wait(self.cond, lambda: bool(queue) or self.closed or (attached and token not in self.receivers), timeout)
            if attached and token not in self.receivers:  # close() from another thread of the receiver
                raise EndpointClosed("closed by close() from another thread while waiting")
            if not ready:
                raise rules.recv_timeout(peek, asked, shard, self.label)
            if not queue:
                raise rules.drained(self.label, shard)
            entry = queue[0] if peek else queue.popleft()
            if not peek:
                self.received[shard] += 1
                self.received_bytes[shard] += entry[3]
                self.rates.add(0, 0, 1, entry[3])
                self.lent.setdefault(token, []).append((shard, entry))
                if token in self.leases and self._watch is None:
                    self._watch = asyncio.ensure_future(self._watch_leases())
                self.cond.notify_all()
            return ("ok", *entry[:3])

    async def ack(self, token: str) -> Any:
        async with self.cond:
            self.lent.pop(token, None)
        return ("ok",)

    async def requeue(self, token: str, shard: int, key: str) -> None:
        """Put back an object lent to ``token`` (it never reached the user)."""
        async with self.cond:
            lent = self.lent.get(token, [])
            for i, (lent_shard, entry) in enumerate(lent):
                if entry[0] == key and lent_shard == shard:
                    del lent[i]
                    self._put_back(shard, [entry])
                    break

    def _put_back(self, shard: int, entries: list[tuple[str, bool, Any, int]]) -> None:
        if not entries:
            return
        nbytes = sum(entry[3] for entry in entries)
        self.queues[shard].extendleft(reversed(entries))
        self.received[shard] -= len(entries)
        self.received_bytes[shard] -= nbytes
        self.rates.add(0, 0, -len(entries), -nbytes)
        self.cond.notify_all()

    async def _watch_leases(self) -> None:
        """While objects are lent, put those of receivers whose process died back."""
        try:
            while any(token in self.leases for token in self.lent):
                await asyncio.sleep(LEASE_CHECK)
                for token in [t for t in self.lent if t in self.leases]:
                    try:
                        await asyncio.wait_for(self.leases[token].ping.remote(), 10)
                    except ray.exceptions.RayActorError:
                        await self._receiver_died(token)
                    except asyncio.TimeoutError:
                        pass  # unreachable for now (a busy or partitioned node): not proven dead
        finally:
            self._watch = None

    async def _receiver_died(self, token: str) -> None:
        async with self.cond:
            lent = self.lent.pop(token, [])
            self.receivers.pop(token, None)
            self.leases.pop(token, None)
            for shard in range(self.num_shards):
                self._put_back(shard, [entry for lent_shard, entry in lent if lent_shard == shard])

    @_answers
    async def queue(self, shard: int | None) -> Any:
        if shard is None:
            return ("ok", {i: [e[0] for e in q] for i, q in enumerate(self.queues)})
        rules.check_shard(shard, self.num_shards)
        return ("ok", [e[0] for e in self.queues[shard]])

    async def close(self, token: str, end_of_stream: bool) -> bool:
        """The sender leaves (ending the stream if asked); True if the actor may now be killed."""
        async with self.cond:
            if self.sender == token:
                self.sender = None
                self.closed = self.closed or end_of_stream
                self.cond.notify_all()
            return self._disposable()

    async def detach(self, token: str) -> bool:
        async with self.cond:
            self.receivers.pop(token, None)
            self.leases.pop(token, None)
            self.lent.pop(token, None)  # consumed: it leaves after using them
            self.cond.notify_all()  # a get of this receiver's other thread ends
            return self._disposable()

    async def status(self) -> dict[str, Any]:
        """This channel's figures, with the same keys as the embedded broker's (``shmchannel.status``)."""
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
        }


@ray.remote(num_cpus=0, max_restarts=0)
class DataSystemActor:
    """Key -> an encoded object, each stored (and owned) by this actor."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self._keys = (f"d{n:x}" for n in itertools.count(1))

    async def put(self, value: Any) -> str:
        key = next(self._keys)
        self.objects[key] = ray.put(value)
        return key

    async def get(self, key: str) -> Any:
        ref = self.objects.get(key)
        if ref is None:
            return _error(rules.no_such_key(key))
        return ("ok", [ref])

    async def delete(self, key: str) -> Any:
        if self.objects.pop(key, None) is None:
            return _error(rules.no_such_key(key))
        return ("ok",)

    async def contains(self, key: str) -> bool:
        return key in self.objects

    async def count(self) -> int:
        return len(self.objects)
