"""The embedded backend: this machine's broker (the control plane) and its arena.

Channels move objects straight through shared memory: senders (sending.py) write blocks
of their own slabs and publish them into the channel's queues; receivers (receiving.py)
claim them from there. The broker is on the path of no object.

The DataSystem (here) keeps objects by key at the broker: a put writes its blob into an
arena block (or inline, up to ``inline_threshold`` bytes) and hands it over; a get views
it, holding it until the view is dropped (arena_client.py packs and unpacks).
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import ChannelError
from ..store.table import StoreStats
from .arena_client import INLINE_THRESHOLD, ArenaClient, remaining
from .receiving import EmbeddedReceiver
from .sending import EmbeddedSender

class EmbeddedDataSystem:
    def __init__(self, client: ArenaClient, made: list[Any]) -> None:
        self._client = client
        made.append(self)

    def put(self, obj: Any, timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        (part,), payload = self._client.pack([obj], timeout, deadline)
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
        key: str = reply["key"]  # no call: nothing an interrupt could lose after it
        return key

    def _forget(self, reply: dict[str, Any], data: memoryview) -> None:
        """Delete what a put stored as its caller was interrupted: nobody has its key."""
        self._client.conn.post({"op": "delete", "key": reply["key"]}, quiet=True)

    def get(self, key: str) -> Any:
        # The view of an arena object, and the hold it counts, are made on the reader
        # thread as the reply comes: an interrupt of ours cannot come between the hold and
        # the finalizer that releases it (ArenaClient.view).
        reply, data = self._client.conn.request({"op": "get", "key": key}, on_reply=self._arrive)
        return self._client.unpack(reply, data)

    def _arrive(self, reply: dict[str, Any], data: memoryview) -> None:
        if "offset" in reply:
            reply["_base"] = self._client.view(reply)

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
        self._client.releases.closing = True
        self._client.releases.settle()


class EmbeddedBackend:
    """This machine's broker (started on first use) and its shared-memory store."""

    def __init__(self, inline_threshold: int | None = None) -> None:
        self.inline_threshold = INLINE_THRESHOLD if inline_threshold is None else inline_threshold

    def _client(self) -> ArenaClient:
        return ArenaClient(self.inline_threshold)

    def create_sender(
        self, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int,
        made: list[Any],
    ) -> EmbeddedSender:
        return EmbeddedSender(self._client(), namespace, dataset_name, num_shards, full_batch, max_queue_size, made)

    def open_receiver(
        self, namespace: str, dataset_name: str, shard_id: int, wait: float | None, prefetch: int, made: list[Any],
    ) -> EmbeddedReceiver:
        return EmbeddedReceiver(self._client(), namespace, dataset_name, shard_id, wait, prefetch, made)

    def data_system(self, made: list[Any]) -> EmbeddedDataSystem:
        return EmbeddedDataSystem(self._client(), made)


__all__ = ["INLINE_THRESHOLD", "EmbeddedBackend"]
