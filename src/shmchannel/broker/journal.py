"""The journal: the queues' state kept next to the data, so that a broker that dies with
SIGKILL loses nothing that was sent and not consumed.

A broker appends a record for every change of what is queued -- a channel made or
closed, an object sent, objects acknowledged -- to a file in the same tmpfs as its arena
(``shmchannel-<uid>-<pid>-journal``). Records use the wire format (protocol.py): a JSON
object plus, for objects kept in the broker's memory, their bytes. Records are written
before any reply that confirms a change (a send, an allocation, a close, a queue
listing...), and otherwise within 10 ms (daemon.JOURNAL_DELAY): what a sender was told is
queued is in the journal. A broker that dies loses at most the last 10 ms of what it was
told without confirming it -- sends posted without waiting (which it may not even have
read) and acknowledgements (whose objects are then delivered again: at-least-once).

The next broker reads the journals of dead brokers (``replay``), takes over their arenas
for the objects still queued -- read-only: it never allocates in them, because clients of
the dead broker may still view blocks it had freed -- and unlinks each once its last
object is gone. A journal is rewritten as a snapshot of the live state when it grows
past ``COMPACT_AT`` bytes and four times its last snapshot.

Records (field ``r``):
    channel  ns, name, shards, full, max      made, or re-made by a new sender
    object   key, size, offset + arena | inline [start, length] of the payload
    send     ns, name, objects                object records, one per shard (one for full_batch)
    queue    ns, name, shard, keys            a shard's whole queue (snapshots)
    ack      ns, name, shard, keys            consumed
    close    ns, name                         end of stream
    drop     ns, name                         the channel is gone
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import protocol

COMPACT_AT = 1 << 20  # bytes; and at least 4 x the last snapshot, so that rewriting stays rare


def _encode(msg: dict[str, Any], payload: bytes = b"") -> list[Any]:
    """A record in the wire's framing, with a reply's bound on its JSON: a snapshot's queue
    record lists a shard's keys, as a queue reply does (a request's bound cut it short)."""
    return protocol.encode(msg, payload, max_json=protocol.MAX_REPLY_JSON)


class Journal:
    """Append-only writer; ``record`` buffers, ``flush`` writes (scheduled by ``on_pending``)."""

    def __init__(self, path: Path, runtime: str, on_pending: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.on_pending = on_pending
        # First record of every version of the file: whose it is. Brokers of other runtime
        # directories (other projects of the same user) leave it alone.
        self._header = b"".join(_encode({"r": "broker", "runtime": runtime}))
        self._pending: list[bytes] = []
        self._fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND, 0o600)
        os.write(self._fd, self._header)
        self.size = self.snapshot_size = len(self._header)

    def record(self, msg: dict[str, Any], payload: bytes = b"") -> None:
        if not self._pending:
            self.on_pending()
        self._pending.append(b"".join(_encode(msg, payload)))

    def flush(self) -> None:
        if self._pending and self._fd >= 0:
            data = b"".join(self._pending)
            self._pending.clear()
            os.write(self._fd, data)
            self.size += len(data)

    def rewrite(self, records: Iterator[tuple[dict[str, Any], bytes]]) -> None:
        """Replace the journal by ``records`` (a snapshot), atomically."""
        self._pending.clear()
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        os.write(fd, self._header)
        size = len(self._header)
        try:
            for msg, payload in records:
                data = b"".join(_encode(msg, payload))
                os.write(fd, data)
                size += len(data)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = self.snapshot_size = size

    @property
    def due(self) -> bool:
        """Whether the journal has grown enough to be rewritten as a snapshot."""
        return self.size > max(COMPACT_AT, 4 * self.snapshot_size)

    def destroy(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


def runtime_of(path: Path) -> str | None:
    """The runtime directory of the broker that wrote a journal (None if unreadable)."""
    for msg, _ in read(path):
        return str(msg["runtime"]) if msg.get("r") == "broker" else None
    return None


def read(path: Path) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The records of a journal; a torn last record (the writer died mid-write) ends it."""
    data = path.read_bytes()
    pos, head = 0, protocol.HEAD.size
    while pos + head <= len(data):
        try:
            json_len, payload_len = protocol.parse_head(data[pos : pos + head], max_json=protocol.MAX_REPLY_JSON)
            end = pos + head + json_len + payload_len
            if end > len(data):
                return
            msg = protocol.parse_body(data[pos + head : pos + head + json_len], request=False)
        except protocol.FrameError:
            return
        yield msg, data[pos + head + json_len : end]
        pos = end


@dataclass
class Recovered:
    """What the journals of dead brokers say is still queued."""

    # (ns, name) -> {"shards", "full", "max", "closed", "queues": [[key, ...], ...]}
    channels: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # key -> {"size", "offset", "arena"} or {"size", "inline": bytes}
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)

    def replay(self, path: Path, own_arena: str) -> None:
        """Apply one journal; objects without an arena name are in ``own_arena``."""
        for msg, payload in read(path):
            kind, ident = msg.get("r"), (str(msg.get("ns")), str(msg.get("name")))
            if kind == "channel":
                old = self.channels.get(ident)
                queues = old["queues"] if old and any(old["queues"]) else [[] for _ in range(msg["shards"])]
                self.channels[ident] = {
                    "shards": len(queues), "full": msg["full"], "max": msg["max"], "closed": False, "queues": queues,
                }
            elif kind == "object":
                self._object(msg, payload, own_arena)
            elif ident in self.channels:
                channel = self.channels[ident]
                if kind == "send":
                    keys = [self._object(obj, payload, own_arena) for obj in msg["objects"]]
                    for i, queue in enumerate(channel["queues"]):
                        queue.append(keys[0] if len(keys) == 1 else keys[i])
                elif kind == "queue":
                    channel["queues"][msg["shard"]] = list(msg["keys"])
                elif kind == "ack":
                    queue = channel["queues"][msg["shard"]]
                    for key in msg["keys"]:
                        if key in queue:
                            queue.remove(key)
                elif kind == "close":
                    channel["closed"] = True
                elif kind == "drop":
                    del self.channels[ident]

    def _object(self, record: dict[str, Any], payload: bytes, own_arena: str) -> str:
        if "inline" in record:
            start, length = record["inline"]
            self.objects[record["key"]] = {"size": record["size"], "inline": bytes(payload[start : start + length])}
        else:
            self.objects[record["key"]] = {
                "size": record["size"], "offset": record["offset"], "arena": record.get("arena") or own_arena,
            }
        return str(record["key"])

    def live(self) -> Iterator[tuple[tuple[str, str], dict[str, Any]]]:
        """Channels with something queued. An empty one is not kept for a sender that may
        come back: the dead broker's clients are gone with it, and a channel nobody uses is
        collected (else the next broker would never idle out; issue 13)."""
        for ident, channel in self.channels.items():
            if any(channel["queues"]):
                yield ident, channel

    def arenas(self) -> set[str]:
        """Arena files that hold a queued object."""
        queued = {key for _, channel in self.live() for queue in channel["queues"] for key in queue}
        return {self.objects[key]["arena"] for key in queued if key in self.objects and "arena" in self.objects[key]}
