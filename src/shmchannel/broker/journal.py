"""The journal: what the broker decided, kept next to the arena, so that the next broker
can take over the arena of one that died (SIGKILL) and lose nothing that was sent.

The queues themselves, and every object in them, are in the arena (queue/): they need no
record. What only the broker knows is where things are and whose they are -- each
channel's queues, each process's claim log, each sender's slabs. A broker appends a record
for every such change to a file in the same tmpfs as its arena
(``shmchannel-<uid>-<pid>-journal``), in the wire format (protocol.py), before any reply
that confirms it, and otherwise within 10 ms (daemon.JOURNAL_DELAY).

The next broker of the same runtime directory replays the journal of the dead one
(``Recovered.replay``), renames its arena to its own and carries on with it
(recovery.py): the channels over their queues, dead processes' claims given back, slabs
and logs of processes still alive kept for them. A journal is rewritten as a snapshot of
the live state when it grows past ``COMPACT_AT`` bytes and four times its last snapshot.

Records (field ``r``):
    channel  ns, name, shards, full, max, region   made, or re-made by a new sender
    close    ns, name                               end of stream
    drop     ns, name                               the channel is gone
    log      offset, capacity, claimer, pid         a process's claim log
    unlog    offset                                 freed
    slab     offset, size, pid                      a sender's slab
    unslab   offset                                 freed
    loan     offset, size, pid                      a sender's loan (issue 15)
    unloan   offset                                 freed
    hold     offset, size, pid                      a DataSystem object a sender sends by key
    unhold   offset, pid                            done
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
    """What a dead broker's journal says: its channels, claim logs and slabs."""

    # (ns, name) -> {"shards", "full", "max", "region", "closed"}
    channels: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    logs: dict[int, dict[str, Any]] = field(default_factory=dict)  # offset -> capacity, claimer, pid
    slabs: dict[int, dict[str, Any]] = field(default_factory=dict)  # offset -> size, pid
    loans: dict[int, dict[str, Any]] = field(default_factory=dict)  # offset -> size, pid
    holds: dict[tuple[int, int], int] = field(default_factory=dict)  # (offset, pid) -> size

    def replay(self, path: Path) -> None:
        for msg, _ in read(path):
            kind, ident = msg.get("r"), (str(msg.get("ns")), str(msg.get("name")))
            if kind == "channel":
                self.channels[ident] = {"shards": int(msg["shards"]), "full": bool(msg["full"]),
                                        "max": int(msg["max"]), "region": int(msg["region"]), "closed": False}
            elif kind == "close" and ident in self.channels:
                self.channels[ident]["closed"] = True
            elif kind == "drop":
                self.channels.pop(ident, None)
            elif kind == "log":
                self.logs[int(msg["offset"])] = {"capacity": int(msg["capacity"]), "claimer": int(msg["claimer"]),
                                                 "pid": int(msg["pid"])}
            elif kind == "unlog":
                self.logs.pop(int(msg["offset"]), None)
            elif kind == "slab":
                self.slabs[int(msg["offset"])] = {"size": int(msg["size"]), "pid": int(msg["pid"])}
            elif kind == "unslab":
                self.slabs.pop(int(msg["offset"]), None)
            elif kind == "loan":
                self.loans[int(msg["offset"])] = {"size": int(msg["size"]), "pid": int(msg["pid"])}
            elif kind == "unloan":
                self.loans.pop(int(msg["offset"]), None)
            elif kind == "hold":
                self.holds[int(msg["offset"]), int(msg["pid"])] = int(msg["size"])
            elif kind == "unhold":
                self.holds.pop((int(msg["offset"]), int(msg["pid"])), None)

    @property
    def empty(self) -> bool:
        return not (self.channels or self.logs or self.slabs or self.loans or self.holds)
