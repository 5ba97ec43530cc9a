"""The embedded backend: this machine's broker over its Unix socket, data in its arena.

Sending: serialize each part (no copy), ask the broker for arena blocks (one round trip
for all parts), write each buffer once into the block, then enqueue (second round trip).
Parts whose blob is at most ``inline_threshold`` bytes skip the arena and travel inline
with the send: one round trip, and no release needed on the receiving side.

Receiving: the reply names a block; the object is rebuilt over a uint8 array that views
it. Every array of the object is a view whose ``base`` chain ends at that array, so when
the user drops the last of them a ``weakref.finalize`` on it tells the broker to release
the block -- the memory is valid exactly as long as the user holds any part of it.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

from ..broker import daemon
from ..serialization import deserialize, serialize
from ..store.arena import ArenaMap
from ..store.blob import plan_blob, read_blob, write_blob
from ..store.table import StoreStats

#: Blobs up to this many bytes travel inline with their key instead of through the arena:
#: below it a socket copy is cheaper than an arena block's extra round trip and release.
INLINE_THRESHOLD = 64 * 1024

_arena_lock = threading.Lock()
_arena: tuple[int, str, ArenaMap] | None = None  # (pid, path, map) of the current broker


def _arena_for(info: dict[str, Any]) -> ArenaMap:
    """This process's mapping of the broker's arena (one per process and broker)."""
    global _arena
    with _arena_lock:
        if _arena is None or _arena[0] != os.getpid() or _arena[1] != info["arena"]:
            # Dropping an old broker's map unmaps it once no view of it is left.
            _arena = (os.getpid(), info["arena"], ArenaMap(info["arena"], int(info["capacity"])))
        return _arena[2]


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Client:
    """A connection plus the arena: packs objects into blobs and unpacks replies."""

    def __init__(self, inline_threshold: int) -> None:
        self.inline_threshold = inline_threshold
        self.conn = daemon.ensure_running()
        try:
            self.arena = _arena_for(self.conn.info)
        except BaseException:
            self.conn.close()
            raise

    def pack(
        self, objs: list[Any], timeout: float | None, deadline: float | None
    ) -> tuple[list[dict[str, Any]], bytearray]:
        """Write ``objs`` as blobs: (part descriptions, inline payload). Frees on failure."""
        serialized = [serialize(obj) for obj in objs]
        plans = [plan_blob(len(s.header), [int(b.nbytes) for b in s.buffers]) for s in serialized]
        big = [p.size for p in plans if p.size > self.inline_threshold]
        offsets: list[int] = []
        if big:
            reply, _ = self.conn.request(
                {"op": "alloc", "sizes": big, "timeout": _remaining(deadline), "asked": timeout}
            )
            offsets = reply["offsets"]
        try:
            payload = bytearray(sum(p.size for p in plans if p.size <= self.inline_threshold))
            inline_view = memoryview(payload)
            parts: list[dict[str, Any]] = []
            pos, arena_offsets = 0, iter(offsets)
            for s, plan in zip(serialized, plans):
                if plan.size <= self.inline_threshold:
                    write_blob(inline_view[pos : pos + plan.size], plan, s.header, s.buffers)
                    parts.append({"inline": [pos, plan.size]})
                    pos += plan.size
                else:
                    offset = next(arena_offsets)
                    write_blob(self.arena.view(offset, plan.size), plan, s.header, s.buffers)
                    parts.append({"offset": offset, "size": plan.size})
        except BaseException:
            if offsets and not self.conn.closed:
                self.conn.request({"op": "free", "offsets": offsets})
            raise
        return parts, payload

    def unpack(self, reply: dict[str, Any], data: bytearray) -> Any:
        """The object a recv/peek/get reply names; arena data is viewed, not copied."""
        if "offset" not in reply:
            view = memoryview(data)
            # Shared objects are read-only whatever their size.
            header, buffers = read_blob(view.toreadonly() if reply.get("shared") else view)
            return deserialize(header, buffers)
        base = self.arena.array(int(reply["offset"]), int(reply["size"]))
        if reply.get("shared"):
            base.flags.writeable = False  # other receivers read the same memory
        self.conn.hold()
        weakref.finalize(base, self.conn.release, reply["key"]).atexit = False
        header, buffers = read_blob(memoryview(base))  # type: ignore[arg-type]  # numpy exports a buffer
        return deserialize(header, buffers)

    def unhold(self, reply: dict[str, Any], data: bytearray) -> None:
        """Undo the hold of a reply that raced an interrupt and was never used."""
        if "offset" in reply:
            self.conn.hold()
            self.conn.release(reply["key"])


class EmbeddedSender:
    def __init__(
        self, client: _Client, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int
    ) -> None:
        self._client = client
        self._ident = {"namespace": namespace, "dataset_name": dataset_name}
        try:
            client.conn.request(
                {"op": "create", **self._ident, "num_shards": num_shards, "full_batch": full_batch,
                 "max_queue_size": max_queue_size}
            )
        except BaseException:
            client.conn.close()
            raise

    def send(self, parts: list[Any], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        descriptions, payload = self._client.pack(parts, timeout, deadline)
        # On failure the broker frees the blocks named in the request.
        self._client.conn.request(
            {"op": "send", **self._ident, "parts": descriptions, "timeout": _remaining(deadline), "asked": timeout},
            payload,
        )

    def queue(self, shard_id: int | None) -> Any:
        reply, _ = self._client.conn.request({"op": "queue", **self._ident, "shard": shard_id})
        return _queue(reply["queue"])

    def close(self, end_of_stream: bool) -> None:
        self._client.conn.close({"op": "close", **self._ident} if end_of_stream else None)


def _queue(raw: Any) -> Any:
    return {int(k): v for k, v in raw.items()} if isinstance(raw, dict) else raw


class EmbeddedReceiver:
    def __init__(self, client: _Client, namespace: str, dataset_name: str, shard_id: int, wait: float | None) -> None:
        self._client = client
        self._ident = {"namespace": namespace, "dataset_name": dataset_name}
        self._shard = shard_id
        try:
            reply, _ = client.conn.request({"op": "open", **self._ident, "shard": shard_id, "timeout": wait})
        except BaseException:
            client.conn.close()
            raise
        self.num_shards = int(reply["num_shards"])
        self.full_batch = bool(reply["full_batch"])

    def recv(self, timeout: float | None, peek: bool) -> Any:
        reply, data = self._client.conn.request(
            {"op": "recv", **self._ident, "shard": self._shard, "peek": peek, "timeout": timeout},
            on_interrupt=self._client.unhold if peek else self._put_back,
        )
        return self._client.unpack(reply, data)

    def _put_back(self, reply: dict[str, Any], data: bytearray) -> None:
        inline = "offset" not in reply
        self._client.conn.one_way(
            {"op": "requeue", **self._ident, "shard": self._shard, "key": reply["key"], "inline": inline},
            data if inline else b"",
        )

    def queue(self, shard_id: int | None) -> Any:
        reply, _ = self._client.conn.request({"op": "queue", **self._ident, "shard": shard_id})
        return _queue(reply["queue"])

    def close(self) -> None:
        self._client.conn.close({"op": "detach", **self._ident})


class EmbeddedDataSystem:
    def __init__(self, client: _Client) -> None:
        self._client = client

    def put(self, obj: Any, timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        (part,), payload = self._client.pack([obj], timeout, deadline)
        reply, _ = self._client.conn.request({"op": "put", "parts": [part]}, payload)
        return str(reply["key"])

    def get(self, key: str) -> Any:
        reply, data = self._client.conn.request({"op": "get", "key": key}, on_interrupt=self._client.unhold)
        return self._client.unpack(reply, data)

    def delete(self, key: str) -> None:
        self._client.conn.request({"op": "delete", "key": key})

    def contains(self, key: str) -> bool:
        reply, _ = self._client.conn.request({"op": "contains", "key": key})
        return bool(reply["found"])

    def stats(self) -> StoreStats:
        reply, _ = self._client.conn.request({"op": "stats"})
        return StoreStats(**{k: reply[k] for k in StoreStats.__dataclass_fields__})

    def close(self) -> None:
        self._client.conn.close()


class EmbeddedBackend:
    """This machine's broker (started on first use) and its shared-memory store."""

    def __init__(self, inline_threshold: int | None = None) -> None:
        self.inline_threshold = INLINE_THRESHOLD if inline_threshold is None else inline_threshold

    def _client(self) -> _Client:
        return _Client(self.inline_threshold)

    def create_sender(
        self, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int
    ) -> EmbeddedSender:
        return EmbeddedSender(self._client(), namespace, dataset_name, num_shards, full_batch, max_queue_size)

    def open_receiver(self, namespace: str, dataset_name: str, shard_id: int, wait: float | None) -> EmbeddedReceiver:
        return EmbeddedReceiver(self._client(), namespace, dataset_name, shard_id, wait)

    def data_system(self) -> EmbeddedDataSystem:
        return EmbeddedDataSystem(self._client())


__all__ = ["INLINE_THRESHOLD", "EmbeddedBackend"]
