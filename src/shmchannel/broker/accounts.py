"""The broker state's memory accounting: what each client takes of the store; no I/O, no
waiting.

``Accounts`` is the base of ``BrokerState`` (state.py) and knows nothing of channels: it
decides who may use which bytes of the store (``ObjectTable``) and keeps each client's
account of them -- the arena blocks it allocated and has not sent or put yet, the
inline credit set aside for its posted sends, the holds that keep its zero-copy views'
objects alive -- so that a client that leaves gives all of it back (``_settle``). The DataSystem's objects
(``try_put``) are kept here too: they belong to no channel, only to their key.

Its operations keep state.py's contract: each completes, raises, or returns ``WAIT``
while the store is too full, and whatever frees memory fires ``store_freed``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import InvalidArgument
from ..store.table import ObjectTable, StoredObject, charge
from . import rules
from .records import Client, Part, Signal

WAIT: Any = object()
"""Returned by an operation that must wait for a signal before it is tried again."""



class Accounts:
    """The store and what each client has of it (see the module docstring)."""

    def __init__(self, table: ObjectTable) -> None:
        self.table = table
        self.store_freed = Signal()
        self.pinned: set[str] = set()  # DataSystem keys
        self.foreign: dict[str, int] = {}  # dead brokers' arenas -> objects of ours still in them
        self.on_foreign_empty: Callable[[str], None] = lambda name: None
        table.on_foreign_freed = self._foreign_freed

    # -- dead brokers' arenas (see recovery.py) --------------------------------------------

    def _foreign_freed(self, obj: StoredObject) -> None:
        assert obj.arena is not None
        self.foreign[obj.arena] -= 1
        if not self.foreign[obj.arena]:
            del self.foreign[obj.arena]
            self.on_foreign_empty(obj.arena)

    # -- memory --------------------------------------------------------------------------

    def try_allocate(self, client: Client, sizes: list[int], spares: int = 0) -> Any:
        """Offsets for blobs of ``sizes`` (all or none), then as many as fit of up to
        ``spares`` more such sets, which never wait: (offsets, spare sets). WAIT while the
        store is too full for the first set."""
        offsets = self.table.allocate(sizes)
        if offsets is None:
            return WAIT
        sets = [offsets]
        for _ in range(spares):
            try:
                spare = self.table.allocate(sizes)
            except OSError:
                spare = None
            if spare is None:
                break
            sets.append(spare)
        for block in sets:
            for offset, size in zip(block, sizes):
                client.allocations[offset] = size
        return offsets, sets[1:]

    def free_allocations(self, client: Client, offsets: list[int]) -> None:
        for offset in offsets:
            if client.allocations.pop(offset, None) is not None:
                self.table.free_allocation(offset)
        self.store_freed.fire()

    def _claim(self, client: Client, parts: list[Part]) -> None:
        """Check that every arena part is an allocation of this client, large enough, named
        once: a block named twice would be stored once and then fail the send half done,
        leaving an object in no queue (issue 13)."""
        offsets = [part.offset for part in parts if part.inline is None]
        if len(set(offsets)) < len(offsets):
            twice = next(offset for offset in offsets if offsets.count(offset) > 1)
            raise InvalidArgument(f"offset {twice} is named by more than one part of one send")
        for part in parts:
            if part.inline is None:
                allocated = client.allocations.get(part.offset)
                if allocated is None or part.size > allocated:
                    raise InvalidArgument(f"offset {part.offset} is not an allocation of {part.size} bytes of this client")

    def _spend_credit(self, client: Client, parts: list[Part]) -> bool:
        """Count the inline parts against the store (``table.charge``): from the client's
        credit first, the rest from free room; False, with nothing counted, if the store is
        too full: the caller waits for ``store_freed`` (issue 13: inline bytes were not
        bounded at all).

        Raises:
            StoreFull: they could never fit, even in an empty store.
        """
        sizes = [len(part.inline) for part in parts if part.inline is not None]
        if not sizes:
            return True
        need = sum(map(charge, sizes))
        spent = min(client.credit, need)
        if not self.table.fits(need - spent):
            self.table.check_fits(sizes)
            return False
        client.credit -= spent
        self.table.revoke(spent)  # the objects count from now on (``table.add``)
        return True

    def _store(self, client: Client, part: Part, refs: int) -> StoredObject:
        if part.inline is None:
            del client.allocations[part.offset]
            return self.table.add(part.size, offset=part.offset, refs=refs)
        return self.table.add(part.size, inline=part.inline, refs=refs)

    # -- holds ---------------------------------------------------------------------------

    def _hold(self, client: Client, obj: StoredObject) -> None:
        """A reference for the client's zero-copy views (inline bytes travel: nothing to hold)."""
        if obj.inline is None:
            obj.refs += 1
            client.holds[obj.key] += 1

    def hold(self, client: Client, key: str) -> None:
        """One more hold on an object the client already holds (it views it once more)."""
        obj = self.table.get(key)
        if obj is not None and client.holds.get(key, 0) > 0:
            self._hold(client, obj)

    def release(self, client: Client, keys: list[str]) -> None:
        freed = False
        for key in keys:
            if client.holds.get(key, 0) <= 0:
                continue
            client.holds[key] -= 1
            if not client.holds[key]:
                del client.holds[key]
            freed |= self.table.unref(key)
        if freed:
            self.store_freed.fire()

    def _settle(self, client: Client) -> bool:
        """Free what a leaving client still has of the store -- its unfinished allocations,
        its unspent credit, its holds -- and say whether that freed anything (the caller,
        ``BrokerState.disconnect``, fires ``store_freed`` once it is done)."""
        freed = bool(client.allocations)
        for offset in client.allocations:
            self.table.free_allocation(offset)
        client.allocations.clear()
        if client.credit:
            self.table.revoke(client.credit)
            client.credit, freed = 0, True
        for key, count in client.holds.items():
            freed |= self.table.unref(key, count)
        client.holds.clear()
        return freed

    # -- data system ---------------------------------------------------------------------

    def try_put(self, client: Client, part: Part) -> Any:
        """Store a DataSystem object; its key. WAIT while the store has no room for its
        inline bytes (its arena block was allocated before)."""
        self._claim(client, [part])
        if not self._spend_credit(client, [part]):
            return WAIT
        key = self._store(client, part, refs=1).key
        self.pinned.add(key)
        return key

    def get(self, client: Client, key: str) -> StoredObject:
        obj = self.table.get(key)
        if obj is None or key not in self.pinned:
            raise rules.no_such_key(key)
        if obj.inline is None:
            obj.refs += 1
            client.holds[key] += 1
        return obj

    def delete(self, key: str) -> None:
        if key not in self.pinned:
            raise rules.no_such_key(key)
        self.pinned.discard(key)
        if self.table.unref(key):
            self.store_freed.fire()
