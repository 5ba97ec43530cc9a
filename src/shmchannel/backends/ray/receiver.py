"""The Ray backend's receiver: entries from the channel actor, bytes from the node holding them.

One call to the channel actor fetches up to ``prefetch`` entries of the shard; they stay
lent to this receiver (at-least-once) until it acknowledges them, by naming the last one it
handed to its user (``through``) in its next call. An entry's bytes come inline or from the
object store of the node of the sender that made them: Ray pulls them from there straight
to this node. When one object is handed out the pull of the next one is started
(``ray.wait(fetch_local=True)``), so a transfer between nodes overlaps the user's work.

An entry names who owns its object: the sender, or the holder of its node once it adopted
it (``ownership.py``). An object whose sender closed after we fetched the entry was
adopted meanwhile: we ask the actor for the entry as it is now. Objects whose owner died
are lost (Ray keeps no copy of an object put by a process that is gone): their recv raises
``ObjectLost`` naming the object, the node and the owner, and the next recv goes on.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import deque
from typing import Any

from ...errors import BrokerUnavailable, ChannelError, ChannelNotFound, EndpointClosed, ObjectLost
from .cluster import Calls
from .wire import decode

#: An entry as the channel actor hands it out: (key, inline, payload, node, owner).
Entry = tuple[str, bool, Any, "str | None", str]

_SENDER = "its sender's process (it died before the node's holder adopted the object)"
_OWNERS = {"sender": _SENDER, "gone": _SENDER, "holder": "the node's holder (a node that dies takes its objects with it)"}


class RayReceiver:
    def __init__(self, ray: Any, namespace: str, dataset_name: str, shard_id: int, wait: float | None, prefetch: int) -> None:
        from .actors import Lease, actor_name, channel_actor

        self._ray = ray
        self._token = uuid.uuid4().hex
        self._shard = shard_id
        self._want = prefetch
        self._lease = Lease.remote()  # type: ignore[attr-defined]  # owned here: dies with this process
        self._pid = os.getpid()
        self._buffer: deque[Entry] = deque()  # lent, not yet handed out
        self._through: str | None = None  # key of the object handed out last
        self._before: str | None = None  # and of the one before it
        # Taken by a hand-out and by close() of another thread: what close gives back is
        # then exactly what was not handed out.
        self._lock = threading.Lock()
        self._closed = False
        label = f"{namespace}/{dataset_name}"
        if wait == 0:
            try:
                actor = ray.get_actor(actor_name(dataset_name), namespace=namespace)
            except ValueError:
                raise ChannelNotFound(
                    f"no sender has created dataset_name {dataset_name!r} in namespace {namespace!r}"
                ) from None
        else:  # create it if need be: the sender's attach then wakes us, no polling
            actor = channel_actor(namespace, dataset_name)
        self._calls = Calls(ray, actor, label)
        try:
            info = self._calls.call("attach_receiver", self._token, shard_id, wait, self._lease)[1]
        except ChannelError:
            self._calls.dispose("detach", self._token)
            raise
        self.num_shards = int(info["num_shards"])

    def recv(self, timeout: float | None, peek: bool) -> Any:
        if peek:
            if self._buffer:
                return self._open(self._buffer[0])
            entries = self._calls.call("get", self._token, self._shard, True, timeout, timeout, 1, None)[1]
            return self._open(entries[0])
        if not self._buffer:
            self.fetch(timeout)
        return self.hand_out()[0]

    def fetch(self, timeout: float | None) -> None:
        """Up to ``prefetch`` entries into the buffer, waiting up to ``timeout`` for the first;
        what was handed out before is acknowledged by the same call."""
        entries = self._calls.call(
            "get", self._token, self._shard, False, timeout, timeout, self._want, self._through,
            on_interrupt=self._put_back,
        )[1]
        with self._lock:
            self._check_open()  # closed meanwhile: the detach gave these back already
            self._buffer.extend(entries)

    def _check_open(self) -> None:
        if self._closed:
            raise EndpointClosed("closed by close() from another thread while waiting")

    def buffered(self) -> bool:
        return bool(self._buffer)

    def hand_out(self, note: bool = False) -> tuple[Any, Any]:
        """The oldest fetched object. It counts as handed out (acknowledged by the next
        call) once it is open, or found lost; any other failure leaves it first."""
        with self._lock:
            self._check_open()
            entry = self._buffer[0]
            try:
                obj = self._open(entry)
            except ObjectLost:
                self._handed(entry)
                raise
            self._handed(entry)
            following = self._buffer[0] if self._buffer else None
        if following is not None and not following[1]:
            self._ray.wait([following[2]], timeout=0, fetch_local=True)  # start pulling the next
        return obj, None

    def _handed(self, entry: Entry) -> None:
        self._buffer.popleft()
        self._before, self._through = self._through, entry[0]

    def _open(self, entry: Entry) -> Any:
        """The object of an entry; its arrays are read-only views of Ray's memory."""
        key, inline, payload, node, owner = entry
        if inline:
            return decode(payload)
        if owner == "gone":  # its holder found its owner dead: no wait for Ray to say so again
            raise self._lost(key, node, owner, "its owner died before the holder could adopt it")
        try:
            try:
                wire = self._ray.get(payload)
            except self._ray.exceptions.ObjectLostError:  # also OwnerDiedError
                now = self._calls.call("current", self._token, key) if owner == "sender" else None
                if now is None or now[4] != "holder":
                    raise
                key, inline, payload, node, owner = now  # its sender closed: its holder adopted it
                wire = self._ray.get(payload)
        except self._ray.exceptions.ObjectLostError as exc:
            raise self._lost(key, node, owner, f"Ray said: {type(exc).__name__}") from None
        except self._ray.exceptions.RayError as exc:
            raise BrokerUnavailable(f"fetching object {key} of {self._calls.label} failed in Ray: {exc}") from exc
        return decode(wire)

    def _lost(self, key: str, node: str | None, owner: str, cause: str) -> ObjectLost:
        return ObjectLost(
            f"object {key} of shard {self._shard} of channel {self._calls.label} is lost: it was held on "
            f"node {node} by {_OWNERS.get(owner, owner)}, which is gone (README, Guarantees); {cause}"
        )

    def withdraw(self, thread: int | None) -> None:
        """Nothing: an actor call cannot be withdrawn; ``close`` ends it."""

    def _put_back(self, reply: Any) -> None:
        self._calls.actor.requeue.remote(self._token, self._shard, [entry[0] for entry in reply[1]])

    def queue(self, shard_id: int | None) -> Any:
        return self._calls.call("queue", shard_id)[1]

    def ack(self) -> None:
        self._calls.call("ack", self._token, self._through)

    def close(self, give_back_last: bool = False) -> None:
        """Leave: acknowledged up to the object handed out last (the one before it with
        ``give_back_last``: that one never reached the user); the actor puts back the rest
        of what we fetched at the head of the shard, in order."""
        if os.getpid() == self._pid:
            with self._lock:
                self._closed = True
                self._buffer.clear()
                through = self._before if give_back_last else self._through
            self._calls.dispose("detach", self._token, through)
            try:
                self._ray.kill(self._lease)
            except Exception:  # noqa: BLE001 -- Ray already gone: so is the lease
                pass
