"""Slabs granted to senders, and the blocks still in use when a sender lets its slabs go.

A sender carves its objects' blocks out of slabs of the store the broker grants it
(store/slabs.py). When it leaves (or dies), what of its slabs no block uses goes back to
the store at once; each block still in use -- queued, claimed, or viewed by a receiver --
stays allocated on its own (``loose``), with its slab's header (whose *freed* word its
receivers bump), until it is freed: receivers free blocks in shared memory and tell no
one, so the broker finds out by looking (``BrokerState.sweep``). Which blocks are in use
is read from the queues and claim logs themselves (``_live_blocks``).

The base of ``BrokerState`` (state.py), whose channels, clients, orphans and backlogs it
reads; no I/O, no waiting.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, Iterable

from .._native import Region
from ..queue import layout, reap
from ..queue.log import ACKED, CLAIMED, RELEASING, STATUS
from ..store import block, slabs
from ..store.blob import external_ranges
from ..store.table import StoreStats
from .accounts import WAIT, Accounts
from .records import Channel, Client, Orphan


class SlabGrants(Accounts):
    """Slabs of senders and the blocks they left in use (see the module docstring)."""

    region: Region
    view: memoryview
    channels: dict[tuple[str, str], Channel]
    clients: dict[int, Client]
    orphans: list[Orphan]
    backlogs: list[reap.Backlog]
    loose: dict[int, int]  # block offset -> reference bits
    _lent: dict[int, list[str]]  # loose block offset -> the objects its blob references
    _headers: dict[int, int]  # slab offset -> loose blocks of it

    def sweep(self) -> bool:
        raise NotImplementedError

    # -- slabs ---------------------------------------------------------------------------

    def try_grant_slab(self, client: Client, size: int) -> Any:
        """A new slab of ``size`` bytes for a sender; WAIT while the store is too full.

        Raises:
            StoreFull: it could never fit, even in an empty store.
        """
        offsets = self.table.allocate([size])
        if offsets is None:
            return WAIT
        client.slabs[offsets[0]] = size
        self._log({"r": "slab", "offset": offsets[0], "size": size, "pid": client.pid})
        return offsets[0]

    def return_slabs(self, client: Client, offsets: Iterable[int]) -> None:
        """Slabs the sender is done with: what of them no block uses goes back to the store
        at once, each block in use when it is freed. Also slabs its process had from a dead
        broker (a sender whose broker died gives them back through the next one)."""
        wanted = set(offsets)
        self._orphan_slabs(client, [offset for offset in wanted if offset in client.slabs])
        for orphan in list(self.orphans):
            if orphan.pid == client.pid and orphan.log is None and orphan.offset in wanted:
                self.orphans.remove(orphan)
                self._loosen(orphan.offset, orphan.size)
        self.sweep()

    def _orphan_slabs(self, client: Client, offsets: list[int]) -> None:
        for offset in offsets:
            self._loosen(offset, client.slabs.pop(offset))

    def _loosen(self, offset: int, size: int) -> None:
        """Give a slab back to the store but for the blocks in it still in use, which stay
        allocated one by one (``loose``) until they are freed."""
        live = self._live_blocks([(offset, size)])
        self.table.free_allocation(offset)
        for start, refs in live.items():
            self._keep_loose(start, refs)
        self._log({"r": "unslab", "offset": offset})
        self.store_freed.fire()

    def _keep_loose(self, start: int, refs: int) -> None:
        """Keep a block in use (and its slab's header) allocated on its own, and the
        objects its blob references (a loan, a DataSystem object sent by key: issue 15),
        each with a reference of its own until the block is freed. The sender held those
        through its connection while it ran; that hold is dropped after this (``disconnect``)."""
        _, length = block.check(self.view, start)
        self.table.allocator.take(start, length)
        self.loose[start] = refs
        keys = []
        for offset, _ in external_ranges(self.view, self.table.capacity, start + block.header_size(refs), start + length):
            obj = self.table.containing(offset)
            if obj is not None:
                obj.refs += 1
                keys.append(obj.key)
        if keys:
            self._lent[start] = keys
        header = self._header_of(start)
        if header >= 0:
            if header not in self._headers:
                try:
                    self.table.allocator.take(header, slabs.SLAB_HEADER)
                except ValueError:
                    header = -1  # taken already (a slab kept whole): nothing to keep
            if header >= 0:
                self._headers[header] = self._headers.get(header, 0) + 1

    def _header_of(self, start: int) -> int:
        """The slab header a block's freed word is in (-1 if it names none we can use)."""
        owner = struct.unpack_from("<Q", self.view, start + 16)[0]
        header = owner - 1 - slabs.FREED
        return header if owner and 0 <= header < self.table.capacity and header % 64 == 0 else -1

    def _free_loose(self, start: int) -> None:
        header = self._header_of(start)
        del self.loose[start]
        self.table.free_allocation(start)
        for key in self._lent.pop(start, ()):
            self._unref(key)
        if header in self._headers:
            self._headers[header] -= 1
            if not self._headers[header]:
                del self._headers[header]
                self.table.free_allocation(header)

    def _live_blocks(self, ranges: list[tuple[int, int]]) -> dict[int, int]:
        """Blocks inside ``ranges`` that a queue or a claim log still names, with their
        reference counts. Slots are read before logs: a claim moves a block's name from its
        slot to a log entry written before the slot is freed, so it is seen in one of them."""
        found: set[int] = set()

        def inside(offset: int) -> bool:
            return any(start <= offset < start + size for start, size in ranges)

        for channel in list(self.channels.values()):
            q, lay = channel.queues, channel.queues.layout
            tail = q.tail
            for shard in range(lay.num_shards):
                for slot_of in (lay.slot, lay.returned_slot):
                    for i in range(lay.ring):
                        at = q.base + slot_of(shard, i)
                        state = self.region.load(at)
                        code = layout.code_of(state)
                        if code == layout.FREE:
                            continue
                        offset, _, pos = layout.read_slot(self.view, at)
                        if code == layout.READY and slot_of == lay.slot and pos >= tail:
                            continue  # written by a sender that died before committing it
                        if inside(offset):
                            found.add(offset)
        logs = [c.log for c in self.clients.values() if c.log is not None]
        logs += [o.log for o in self.orphans if o.log is not None]
        for log in logs:
            for index, state in log.entries():
                if state & STATUS in (CLAIMED, ACKED, RELEASING):
                    offset = log.fields(index)[4]
                    if inside(offset):
                        found.add(offset)
        for backlog in self.backlogs:
            found.update(item.offset for item in backlog.items if inside(item.offset))
        live = {}
        for offset in found:
            try:
                refs, _ = block.check(self.view, offset)
            except Exception:
                continue  # not a block (a hostile descriptor): nothing to wait for
            if not block.is_free(self.region, offset, refs):
                live[offset] = refs
        return live

    def stats(self, reserved: int) -> StoreStats:
        """The store's figures; ``objects`` counts the DataSystem's and every channel object
        still in use somewhere (queued, claimed, or viewed): a look through the queues and
        logs, as a status is rare."""
        ranges = [(o, n) for c in self.clients.values() for o, n in c.slabs.items()]
        ranges += [(o.offset, o.size) for o in self.orphans if o.log is None]
        live = len(self._live_blocks(ranges)) + sum(not block.is_free(self.region, b, r) for b, r in self.loose.items())
        stats = self.table.stats(reserved)
        return dataclasses.replace(stats, objects=stats.objects + live)
