"""The embedded backend: this machine's broker over its Unix socket, data in its arena.

Sending: serialize each part (no copy), ask the broker for arena blocks (one round trip
for all parts), write each buffer once into the block, then enqueue -- without waiting
for the reply while the queue has room (see ``EmbeddedSender``). Parts whose blob is at
most ``inline_threshold`` bytes skip the arena and travel inline with the send: no round
trip at all while there is room, and no release needed on the receiving side.

Receiving: the reply names a block; the object is rebuilt over a uint8 array that views
it. Every array of the object is a view whose ``base`` chain ends at that array, so when
the user drops the last of them a ``weakref.finalize`` on it tells the broker to release
the block -- the memory is valid exactly as long as the user holds any part of it.

Packing and unpacking live in arena_client.py; this module holds the endpoints.
"""

from __future__ import annotations

import collections
import time
import weakref
from typing import Any

from ..errors import ChannelError
from ..serialization.arrays import aligned_copy
from ..store.table import StoreStats, charge
from .arena_client import INLINE_THRESHOLD, MAX_SPARES, ArenaClient, items_of, remaining

class EmbeddedSender:
    """Sends are posted (not waited for) while the channel is known to have room, and the
    store memory for their inline parts is set aside.

    The channel has one sender, and only receiving makes room, so the room the broker last
    reported, minus the sends posted since, is room the next send is sure to find: such a
    send cannot block or time out, and waiting for its reply would only add a round trip.
    When that count is used up, a send waits for its reply, which reports the room again.
    Memory works the same way: arena blocks are allocated before the send, and inline
    parts count against the store too (issue 13), so a send waits for its reply unless
    the *credit* the broker set aside for this sender's inline bytes covers them; that
    reply asks for more credit, about ``max_queue_size`` objects of the size just sent.
    """

    #: Its main-thread calls are interrupt-safe as they are (see DataSender.send).
    interrupt_safe = True

    def __init__(
        self, client: ArenaClient, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int
    ) -> None:
        self._client = client
        self._ident = {"namespace": namespace, "dataset_name": dataset_name}
        try:
            reply, _ = client.conn.request(
                {"op": "create", **self._ident, "num_shards": num_shards, "full_batch": full_batch,
                 "max_queue_size": max_queue_size}
            )
        except BaseException:
            client.conn.close()
            raise
        self._room = int(reply["room"])
        self._max_queue_size = max_queue_size
        self._credit = 0  # inline bytes the broker set aside for our posted sends

    def send(self, parts: list[Any], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        # Spare blocks only for objects the queue could take anyway: they hold store memory.
        spares = max(0, min(self._room - 1, MAX_SPARES))
        descriptions, payload, room = self._client.pack(parts, timeout, deadline, self._ident, spares)
        if room is not None:
            self._room = room
        # On failure the broker frees the blocks named in the request.
        msg = {"op": "send", **self._ident, "parts": descriptions, "timeout": remaining(deadline), "asked": timeout}
        need = sum(charge(d["inline"][1]) for d in descriptions if "inline" in d)
        spent = min(self._credit, need)
        self._credit -= spent  # the broker spends the same credit first, in the same order
        if self._room > 0 and spent == need:
            self._room -= 1  # first: an interrupt after the post must not leave room counted twice
            self._client.conn.post(msg, payload)
        else:
            if need:
                msg["credit"] = need * self._max_queue_size  # the broker bounds it
            reply, _ = self._client.conn.request(msg, payload)
            self._room = int(reply["room"])
            self._credit = int(reply.get("credit", self._credit))

    def queue(self, shard_id: int | None) -> Any:
        reply, _ = self._client.conn.request({"op": "queue", **self._ident, "shard": shard_id}, look=True)
        return _queue(reply["queue"])

    def withdraw(self, thread: int | None) -> None:
        self._client.conn.withdraw(thread)

    def close(self, end_of_stream: bool) -> None:
        self._client.conn.close({"op": "close", **self._ident} if end_of_stream else None)


def _queue(raw: Any) -> Any:
    return {int(k): v for k, v in raw.items()} if isinstance(raw, dict) else raw


class EmbeddedReceiver:
    """Receives up to ``prefetch`` objects per round trip when that many are queued.

    The extra ones wait here, reserved for this receiver, and are handed out in order by
    the next calls, each with a one-way note to the broker, which counts them as queued
    until then (so ``max_queue_size`` still bounds what the sender is ahead). ``close``
    puts back any not handed out, at the head of the queue.
    """

    def __init__(
        self, client: ArenaClient, namespace: str, dataset_name: str, shard_id: int, wait: float | None, prefetch: int
    ) -> None:
        self._client = client
        self._ident = {"namespace": namespace, "dataset_name": dataset_name}
        self._shard = shard_id
        self._prefetch = prefetch
        self._buffer: collections.deque[tuple[dict[str, Any], memoryview]] = collections.deque()
        self.buffer = self._buffer  # for DataReceiver._recv_buffered's put-back
        self.handing: tuple[dict[str, Any], memoryview] | None = None  # see hand_out
        self._shared = False
        self._last: str | None = None  # key of the object handed out last
        try:
            reply, _ = client.conn.request({"op": "open", **self._ident, "shard": shard_id, "timeout": wait})
        except BaseException:
            client.conn.close()
            raise
        self.num_shards = int(reply["num_shards"])
        self.full_batch = bool(reply["full_batch"])

    def recv(self, timeout: float | None, peek: bool) -> Any:
        if not self._buffer:
            reply, data = self._client.conn.request(
                {"op": "recv", **self._ident, "shard": self._shard, "peek": peek, "timeout": timeout,
                 "limit": 1 if peek else self._prefetch},
                on_interrupt=self._client.unhold if peek else self._put_back,
            )
            if peek:
                return self._client.unpack(*items_of(reply, data)[0], bool(reply["shared"]))
            self._arrive(reply, data)
        elif not peek:  # a reserved one: the broker counts it as queued until told
            self._client.conn.one_way({"op": "next", **self._ident, "shard": self._shard, "key": self._buffer[0][0]["key"]})
        if not peek:
            item, inline = self._buffer.popleft()
            self._last = item["key"]
            return self._client.unpack(item, inline, self._shared)
        item, inline = self._buffer[0]
        if "offset" in item:  # the view needs a hold of its own: the object may still go back
            self._client.conn.one_way({"op": "hold", "key": item["key"]})
            own = {k: v for k, v in item.items() if not k.startswith("_")}  # not the recv's view (unpack)
            return self._client.unpack(own, inline, self._shared)
        return self._client.unpack(item, aligned_copy(inline), self._shared)  # its own copy, as from the broker

    #: Its main-thread calls are interrupt-safe as they are (see DataReceiver.recv).
    interrupt_safe = True

    def buffered(self) -> bool:
        return bool(self._buffer)

    def withdraw(self, thread: int | None) -> None:
        self._client.conn.withdraw(thread)

    def fetch(self, timeout: float | None) -> None:
        """Fetch up to ``prefetch`` objects into the buffer, waiting up to ``timeout`` for
        the first. The reply lands in the buffer on the connection's reader thread: an
        interrupt of the caller cannot lose it (its objects are the next ones handed out)."""
        self._client.conn.request(
            {"op": "recv", **self._ident, "shard": self._shard, "peek": False, "timeout": timeout,
             "limit": self._prefetch},
            on_reply=self._arrive,
        )

    def _arrive(self, reply: dict[str, Any], data: memoryview) -> None:
        """Take a recv reply's objects into the buffer, each arena one with its view and
        hold (``ArenaClient.view``)."""
        self._shared = shared = bool(reply["shared"])
        items = items_of(reply, data)
        for item, _ in items:
            if "offset" in item:
                item["_base"] = self._client.view(item, shared)
        self._buffer.extend(items)

    def hand_out(self) -> tuple[Any, Any]:
        """The next prefetched object, and what ``buffer.appendleft`` takes to put it back:
        for the main thread, which takes it without the worker (see DataReceiver._recv_buffered).
        It is removed from the buffer last, by one ``del``: an interrupt before leaves it
        there, and the note to the broker, said again, changes nothing (``take_next``).
        ``handing`` names it from before the ``del`` until the caller has it: an interrupt
        in between (at any instruction on Python 3.10) finds it there to put back."""
        entry = self._buffer[0]
        self.handing = entry
        item, inline = entry
        obj = self._client.unpack(item, inline, self._shared)
        self._client.conn.one_way({"op": "next", **self._ident, "shard": self._shard, "key": item["key"]}, wait=False)
        self._last = item["key"]
        del self._buffer[0]
        return obj, entry

    def _put_back(self, reply: dict[str, Any], data: memoryview) -> None:
        self._requeue([item["key"] for item in reply["items"]])

    def _requeue(self, keys: list[str]) -> None:
        self._client.conn.one_way({"op": "requeue", **self._ident, "shard": self._shard, "keys": keys})

    def queue(self, shard_id: int | None) -> Any:
        reply, _ = self._client.conn.request({"op": "queue", **self._ident, "shard": shard_id}, look=True)
        return _queue(reply["queue"])

    def ack(self) -> None:
        # Not what is still in the buffer: an object whose note went, then put back by an
        # interrupt (DataReceiver._recv_buffered), was never the user's.
        keep = [item["key"] for item, _ in list(self._buffer)]
        self._client.conn.one_way({"op": "ack", **self._ident, "shard": self._shard, **({"keep": keep} if keep else {})})

    def close(self, give_back_last: bool = False) -> None:
        """Leave; prefetched objects not handed out go back to the head of the queue with
        the detach (the broker knows which: ``next`` told it what was handed out, so a
        recv of another thread racing this close cannot make one go back twice), behind
        the last one handed out with ``give_back_last`` -- in order."""
        back = ([self._last] if give_back_last and self._last is not None else []) + [
            item["key"] for item, _ in list(self._buffer)  # (ones noted, then put back: see ack)
        ]
        self._client.conn.close({"op": "detach", **self._ident, **({"give_back": back} if back else {})})
        self._buffer.clear()


class EmbeddedDataSystem:
    def __init__(self, client: ArenaClient) -> None:
        self._client = client

    def put(self, obj: Any, timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        (part,), payload, _ = self._client.pack([obj], timeout, deadline)
        # An inline object waits at the broker for room, as an arena block waits in pack.
        track: list[Any] = []
        try:
            reply, _ = self._client.conn.request(
                {"op": "put", "parts": [part], "timeout": remaining(deadline), "asked": timeout}, payload,
                on_interrupt=self._forget, track=track,
            )
        except BaseException as exc:
            # Interrupted before the broker had it: its block is still ours to free (once it
            # had it, the broker frees it on failure, and _forget deletes what it stored).
            if "offset" in part and not isinstance(exc, ChannelError) and self._client.conn.unsent(track):
                self._client.conn.post({"op": "free", "offsets": [part["offset"]]}, quiet=True)
            raise
        return reply["key"]  # no call: nothing an interrupt could lose after it

    def _forget(self, reply: dict[str, Any], data: memoryview) -> None:
        """Delete what a put stored as its caller was interrupted: nobody has its key."""
        self._client.conn.post({"op": "delete", "key": reply["key"]}, quiet=True)

    def get(self, key: str) -> Any:
        reply, data = self._client.conn.request({"op": "get", "key": key}, on_interrupt=self._client.unhold)
        return self._client.unpack(reply, data, True)

    def delete(self, key: str) -> None:
        self._client.conn.request({"op": "delete", "key": key})

    def contains(self, key: str) -> bool:
        reply, _ = self._client.conn.request({"op": "contains", "key": key}, look=True)
        return bool(reply["found"])

    def stats(self) -> StoreStats:
        reply, _ = self._client.conn.request({"op": "stats"}, look=True)
        return StoreStats(**{k: reply[k] for k in StoreStats.__dataclass_fields__})

    def close(self) -> None:
        self._client.conn.close()


class EmbeddedBackend:
    """This machine's broker (started on first use) and its shared-memory store."""

    def __init__(self, inline_threshold: int | None = None) -> None:
        self.inline_threshold = INLINE_THRESHOLD if inline_threshold is None else inline_threshold

    def _client(self) -> ArenaClient:
        return ArenaClient(self.inline_threshold)

    def create_sender(
        self, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int
    ) -> EmbeddedSender:
        return EmbeddedSender(self._client(), namespace, dataset_name, num_shards, full_batch, max_queue_size)

    def open_receiver(
        self, namespace: str, dataset_name: str, shard_id: int, wait: float | None, prefetch: int = 1
    ) -> EmbeddedReceiver:
        return EmbeddedReceiver(self._client(), namespace, dataset_name, shard_id, wait, prefetch)

    def data_system(self) -> EmbeddedDataSystem:
        return EmbeddedDataSystem(self._client())


__all__ = ["INLINE_THRESHOLD", "EmbeddedBackend"]
