"""The broker's requests that name no channel: the DataSystem's (put, get, delete,
contains) and those about the broker as a whole (stats, the paged status, stop).

``SystemOperations`` adds them to the channels' ``Operations`` (operations.py), whose
request decoding and waiting they share; the Server (server.py) is built on it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from typing import Any

from ..errors import InvalidArgument
from ..store.table import charge
from . import protocol
from .connection import ClientConnection
from .operations import Operations, Reply, Waiter, request_field
from .records import Channel

log = logging.getLogger("shmchannel.broker")

#: A status reply lists at most this many channels, and this many shards in all (or one
#: channel, of at most rules.MAX_SHARDS): the rest follow in further pages, each asked
#: for with ``after`` (issue 13: one reply listing every channel outgrew the frame). The
#: worst page fits ``protocol.MAX_REPLY_JSON`` (64 MiB) with room to spare: a channel's
#: fixed figures and two names of MAX_NAME characters take at most 26 KB of JSON (an
#: astral character is escaped as 12 bytes), a shard's four counters 84 bytes, so
#: 1024 x 26 KB + 16384 x 84 B < 29 MB (``tests/test_status.py`` builds that page).
STATUS_PAGE_CHANNELS = 1024
STATUS_PAGE_SHARDS = 16384


def status_page(
    channels: dict[tuple[str, str], Channel], after: tuple[str, str] | None
) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
    """The figures of the channels that follow ``after`` (None: from the first) in the
    order of their (namespace, dataset_name), at most a page's worth, and the name of the
    last of them if more follow (None if not). A channel made or dropped between pages is
    listed or not, as it happens; no other is left out or listed twice."""
    idents = sorted(channels)
    start = 0 if after is None else bisect.bisect_right(idents, after)
    page: list[dict[str, Any]] = []
    shards = 0
    for ident in idents[start:]:
        channel = channels[ident]
        if page and (len(page) == STATUS_PAGE_CHANNELS or shards + channel.num_shards > STATUS_PAGE_SHARDS):
            return page, idents[start + len(page) - 1]
        page.append(channel.status())
        shards += channel.num_shards
    return page, None


class SystemOperations(Operations):
    """The channels' request handlers and these; the Server adds the connections and the
    lifecycle."""

    started: float
    idle_timeout: float
    stopping: asyncio.Event

    # -- data system ---------------------------------------------------------------------

    def _put(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply | Waiter:
        (part,) = self._parts(msg, payload)
        client = conn.client

        def give_back() -> None:
            self.state.free_allocations(client, [part.offset] if part.inline is None else [])

        try:
            return self._blocking(
                lambda: self.state.try_put(client, part),
                lambda: [self.state.store_freed],
                msg,
                lambda key: (protocol.ok(key=key), b""),
                lambda: self._store_full(charge(part.size), msg),
                give_back,
            )
        except BaseException:
            give_back()
            raise

    def _get(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        obj = self.state.get(conn.client, request_field(msg, "key", str))
        return protocol.ok(**obj.describe()), obj.inline or b""

    def _lend(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        obj = self.state.lend(conn.client, request_field(msg, "key", str))
        return protocol.ok(**obj.describe()), obj.inline or b""

    def _delete(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        self.state.delete(request_field(msg, "key", str))
        return protocol.ok(), b""

    def _contains(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        return protocol.ok(found=request_field(msg, "key", str) in self.state.pinned), b""

    # -- the broker as a whole -----------------------------------------------------------

    def _stats(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        return protocol.ok(**vars(self.state.stats(self.arena.reserved))), b""

    def _status(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        after = msg.get("after")
        if after is not None and not (isinstance(after, list) and len(after) == 2 and all(isinstance(x, str) for x in after)):
            raise InvalidArgument(f"request field 'after' must be null or [namespace, dataset_name], got {after!r:.80}")
        channels, following = status_page(self.state.channels, None if after is None else (after[0], after[1]))
        return (
            protocol.ok(
                pid=os.getpid(),
                started=self.started,
                uptime=time.time() - self.started,
                clients=len(self.state.clients),
                idle_timeout=self.idle_timeout,
                store=vars(self.state.stats(self.arena.reserved)),
                channels=channels,
                **({"next": list(following)} if following is not None else {}),
            ),
            b"",
        )

    def _stop(self, conn: ClientConnection, msg: dict[str, Any], payload: bytes) -> Reply:
        log.info("stop requested by pid %d", conn.client.pid)
        asyncio.get_running_loop().call_soon(self.stopping.set)
        return protocol.ok(pid=os.getpid()), b""
