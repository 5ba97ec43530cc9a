"""The interface the public API (channel.py) calls; one implementation per backend.

The API layer checks every argument and splits objects; a backend only moves the parts.
Timeouts are ``None`` (wait forever) or seconds >= 0 (0: do not wait).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..store.table import StoreStats

class SenderEndpoint(Protocol):
    def send(self, parts: list[Any], timeout: float | None) -> None:
        """Enqueue one object: part i to shard i (one part for every shard with full_batch)."""

    def empty(self, shape: tuple[int, ...], dtype: Any, order: str, timeout: float | None) -> Any:
        """A writable array a send of which copies nothing where the backend can (a loan)."""

    def borrow(self, key: str) -> tuple[Any, Any]:
        """The DataSystem object under ``key``, held for a send, and what ends that hold."""

    def queue(self, shard_id: int | None) -> Any:
        """Keys not yet consumed: of one shard, or ``{shard: keys}`` when shard_id is None."""

    def withdraw(self, thread: int | None) -> None:
        """End the waits of the send ``thread`` makes (its caller was interrupted): the send
        then raises, having queued nothing, unless it was queued already."""

    def close(self, end_of_stream: bool) -> None:
        """Leave the channel; with ``end_of_stream`` receivers drain and then get ChannelClosed."""


class ReceiverEndpoint(Protocol):
    num_shards: int

    def recv(self, timeout: float | None, peek: bool) -> Any:
        """The oldest object of this shard (removed unless ``peek``)."""

    def queue(self, shard_id: int | None) -> Any: ...

    def ack(self) -> None: ...

    def buffered(self) -> bool:
        """Whether ``recv`` can return at once, from objects already fetched (no I/O wait)."""

    def withdraw(self, thread: int | None) -> None:
        """End the wait of the recv ``thread`` makes (its caller gives up)."""

    def hand_out(self, note: bool = False) -> tuple[Any, Any]:
        """When ``buffered()``: the next fetched object, and the entry that
        ``buffer.appendleft`` takes to put it back (it left ``buffer`` by its last step);
        ``note``: name that entry in ``handing`` before it leaves (main thread only)."""

    def close(self, give_back_last: bool = False) -> None:
        """Leave the channel; with ``give_back_last`` the object handed out last goes back to
        the head of the queue (it never reached the user: see aio.py)."""


class DataSystemEndpoint(Protocol):
    def put(self, obj: Any, timeout: float | None) -> str: ...

    def get(self, key: str) -> Any: ...

    def delete(self, key: str) -> None: ...

    def contains(self, key: str) -> bool: ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Each method's endpoint appends itself to ``made`` as the last step of its making:
    the caller then has it though an interrupt comes before the call returns (and closes
    it if it cannot keep it)."""

    def create_sender(
        self, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int,
        made: list[Any],
    ) -> SenderEndpoint: ...

    def open_receiver(
        self, namespace: str, dataset_name: str, shard_id: int, wait: float | None, prefetch: int, made: list[Any],
    ) -> ReceiverEndpoint: ...

    def data_system(self, made: list[Any]) -> DataSystemEndpoint: ...
