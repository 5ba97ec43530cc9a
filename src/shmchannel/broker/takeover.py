"""A dead broker's arena, carried on with, and the journal records a snapshot writes
(recovery.py reads the journal, this acts on it).

The base of ``BrokerState`` (state.py), whose channels, logs, slabs and loans it adopts:
the queues and blocks are in the arena and need no record; what only the broker knew --
where each channel's queues are, whose logs, slabs and loans -- comes from the journal,
and what blocks in use reference that no record names is kept as it is found. No I/O.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..queue import layout
from ..queue.log import ClaimLog
from ..queue.ring import Queues
from ..store import block
from ..store.allocator import Allocator
from ..store.blob import external_ranges
from .records import Channel, Orphan
from .slab_grants import SlabGrants


class Takeover(SlabGrants):
    """Adopting a dead broker's arena; the records of a snapshot (module docstring)."""

    control: Allocator
    _control_base: int
    _adopted: set[tuple[str, str]]
    _claimers: set[int]
    orphan_loans: list[tuple[str, int]]
    _unowned: list[str]

    def adopt(self, channels: dict[tuple[str, str], dict[str, Any]], logs: dict[int, dict[str, Any]],
              slabs: dict[int, dict[str, Any]], loans: dict[int, dict[str, Any]] | None = None,
              holds: dict[tuple[int, int], int] | None = None) -> None:
        """Carry on with what a dead broker left in this arena: its channels over their
        queues; its clients' claim logs and slabs, kept whole while their process runs
        (it may still claim into them, or write blocks) and cleaned up after it."""
        for (namespace, name), saved in channels.items():
            base = saved["region"]
            queues = Queues(self.region, self.view, base)  # checks the header it finds
            self.control.take(base - self._control_base, queues.layout.size)
            channel = Channel(namespace, name, queues.layout.num_shards, queues.layout.full_batch,
                              queues.layout.max_queue_size, queues, base)
            channel.status()  # its counters so far are no rate of ours
            self._adopted.add((namespace, name))
            for shard in range(channel.num_shards):
                # Claims the dead broker was giving back are found again (``sweep``) and
                # counted again: its count of them died with it.
                self.region.store(base + queues.layout.shard(shard) + layout.S_PENDING, 0)
            self.channels[(namespace, name)] = channel
        for offset, saved in logs.items():
            size = ClaimLog.size_for(saved["capacity"])
            self.control.take(offset - self._control_base, size)
            log = ClaimLog(self.region, self.view, offset, saved["capacity"], saved["claimer"])
            self._claimers.add(log.claimer)
            self.orphans.append(Orphan(offset, size, log=log, pid=saved["pid"]))
        for offset, saved in slabs.items():
            self.table.allocator.take(offset, saved["size"])
            self.orphans.append(Orphan(offset, saved["size"], pid=saved["pid"]))
        for offset, saved in (loans or {}).items():
            self.table.allocator.take(offset, saved["size"])
            obj = self.table.add(saved["size"], offset=offset, refs=1)
            obj.loan_pid = saved["pid"]
            self.orphan_loans.append((obj.key, saved["pid"]))
        for (offset, pid), size in (holds or {}).items():  # objects a process was sending by key
            found = self.table.containing(offset)
            if found is None or found.offset != offset:
                self.table.allocator.take(offset, size)
                found = self.table.add(size, offset=offset, refs=0)
            found.refs += 1
            self.orphan_loans.append((found.key, pid))
        live = self._live_blocks([(0, self.table.capacity)])
        self._keep_referenced(live)
        # Every other block still in use, wherever it is: the queues and logs name them.
        kept = [(o.offset, o.size) for o in self.orphans if o.log is None]
        for start, refs in live.items():
            if not any(o <= start < o + n for o, n in kept):
                self._keep_loose(start, refs)
        self.sweep()

    def _keep_referenced(self, live: dict[int, int]) -> None:
        """Keep what blocks in use reference and no loan record names (a DataSystem object
        sent by key: the DataSystem is not journaled), as objects of their own: the extents
        referenced, merged, each held until no slab of a running process is kept whole
        (from then on, each block holds what it references itself: ``_keep_loose``)."""
        ranges = []
        for start, refs in live.items():
            _, length = block.check(self.view, start)
            for offset, size in external_ranges(self.view, self.table.capacity, start + block.header_size(refs),
                                                start + length):
                if self.table.containing(offset) is None:
                    ranges.append((offset // 64 * 64, offset + size))
        merged: list[list[int]] = []
        for begin, end in sorted(ranges):
            if merged and begin <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([begin, end])
        for begin, end in merged:
            try:
                self.table.allocator.take(begin, end - begin)
            except ValueError:
                continue  # overlaps something kept already (a hostile descriptor): not ours to keep
            self._unowned.append(self.table.add(end - begin, offset=begin, refs=1).key)

    def records(self) -> Iterable[dict[str, Any]]:
        """Journal records of where everything is (a snapshot: recovery.py)."""
        for channel in self.channels.values():
            yield channel.record()
            if channel.closed:
                yield {"r": "close", "ns": channel.namespace, "name": channel.name}
        for client in self.clients.values():
            if client.log is not None:
                yield {"r": "log", "offset": client.log.base, "capacity": client.log.capacity,
                       "claimer": client.log.claimer, "pid": client.pid}
            for offset, size in client.slabs.items():
                yield {"r": "slab", "offset": offset, "size": size, "pid": client.pid}
            for key in client.lends:
                obj = self.table.get(key)
                if obj is not None:
                    yield {"r": "hold", "offset": obj.offset, "size": obj.size, "pid": client.pid}
        for obj in self.table.objects():
            if obj.loan_pid:
                yield {"r": "loan", "offset": obj.offset, "size": obj.size, "pid": obj.loan_pid}
        for key, pid in self.orphan_loans:  # a dead broker's: its senders' holds
            obj = self.table.get(key)
            if obj is not None and not obj.loan_pid:
                yield {"r": "hold", "offset": obj.offset, "size": obj.size, "pid": pid}
        for orphan in self.orphans:
            pid = orphan.pid if orphan.pid is not None else 0  # 0: gone (a later broker frees it at once)
            if orphan.log is not None:
                yield {"r": "log", "offset": orphan.offset, "capacity": orphan.log.capacity,
                       "claimer": orphan.log.claimer, "pid": pid}
            else:
                yield {"r": "slab", "offset": orphan.offset, "size": orphan.size, "pid": pid}
