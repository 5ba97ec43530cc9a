"""The broker state's memory accounting: what each client takes of the store; no I/O, no
waiting.

``Accounts`` is the base of ``BrokerState`` (state.py) and knows nothing of channels: it
decides who may use which bytes of the store (``ObjectTable``) and keeps each client's
account of them -- the arena blocks it allocated and has not put yet, the holds that keep
its zero-copy views' objects alive -- so that a client that leaves gives all of it back
(``_settle``). The DataSystem's objects (``try_put``) are kept here too: they belong to no
channel, only to their key.

Its operations keep state.py's contract: each completes, raises, or returns ``WAIT``
while the store is too full, and whatever frees memory fires ``store_freed``.
"""

from __future__ import annotations

from typing import Any

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

    # -- memory --------------------------------------------------------------------------

    def try_allocate(self, client: Client, sizes: list[int]) -> Any:
        """Offsets for blobs of ``sizes`` (all or none); WAIT while the store is too full."""
        offsets = self.table.allocate(sizes)
        if offsets is None:
            return WAIT
        for offset, size in zip(offsets, sizes):
            client.allocations[offset] = size
        return offsets

    def try_loan(self, client: Client, size: int) -> Any:
        """A new object of ``size`` bytes held by ``client`` (no key pins it: it goes when
        the client releases it or leaves, unless a block it left references it); WAIT while
        the store is too full."""
        offsets = self.table.allocate([size])
        if offsets is None:
            return WAIT
        obj = self.table.add(size, offset=offsets[0], refs=1)
        obj.loan_pid = client.pid
        client.holds[obj.key] += 1
        self._log({"r": "loan", "offset": obj.offset, "size": size, "pid": client.pid})
        return obj

    def _log(self, msg: dict[str, Any], payload: bytes = b"") -> None:
        raise NotImplementedError

    def _unref(self, key: str, n: int = 1) -> bool:
        """``table.unref``, journaling a loan's end (a next broker must not keep it)."""
        obj = self.table.get(key)
        freed = self.table.unref(key, n)
        if freed and obj is not None and obj.loan_pid:
            self._log({"r": "unloan", "offset": obj.offset})
        return freed

    def free_allocations(self, client: Client, offsets: list[int]) -> None:
        for offset in offsets:
            if client.allocations.pop(offset, None) is not None:
                self.table.free_allocation(offset)
        self.store_freed.fire()

    def _claim(self, client: Client, part: Part) -> None:
        """Check that an arena part is an allocation of this client, large enough."""
        if part.inline is None:
            allocated = client.allocations.get(part.offset)
            if allocated is None or part.size > allocated:
                raise InvalidArgument(f"offset {part.offset} is not an allocation of {part.size} bytes of this client")

    def _room_for(self, part: Part) -> bool:
        """Whether the store has room for an inline part's bytes (``table.charge``) now;
        an arena part has its block already. False: the caller waits for ``store_freed``
        (issue 13: inline bytes were not bounded at all).

        Raises:
            StoreFull: they could never fit, even in an empty store.
        """
        if part.inline is None or self.table.fits(charge(len(part.inline))):
            return True
        self.table.check_fits([len(part.inline)])
        return False

    def _store(self, client: Client, part: Part, refs: int) -> StoredObject:
        if part.inline is None:
            del client.allocations[part.offset]
            return self.table.add(part.size, offset=part.offset, refs=refs)
        return self.table.add(part.size, inline=part.inline, refs=refs)

    # -- holds ---------------------------------------------------------------------------

    def release(self, client: Client, keys: list[str]) -> None:
        freed = False
        for key in keys:
            if client.holds.get(key, 0) <= 0:
                continue
            client.holds[key] -= 1
            if not client.holds[key]:
                del client.holds[key]
            if client.lends.get(key, 0) > client.holds.get(key, 0):
                self._unlend(client, key)
            freed |= self._unref(key)
        if freed:
            self.store_freed.fire()

    def _settle(self, client: Client) -> bool:
        """Free what a leaving client still has of the store -- its unfinished allocations,
        its holds -- and say whether that freed anything (the caller,
        ``BrokerState.disconnect``, fires ``store_freed`` once it is done)."""
        freed = bool(client.allocations)
        for offset in client.allocations:
            self.table.free_allocation(offset)
        client.allocations.clear()
        for key in list(client.lends):
            client.lends[key] = 1
            self._unlend(client, key)
        for key, count in client.holds.items():
            freed |= self._unref(key, count)
        client.holds.clear()
        return freed

    # -- data system ---------------------------------------------------------------------

    def try_put(self, client: Client, part: Part) -> Any:
        """Store a DataSystem object; its key. WAIT while the store has no room for its
        inline bytes (its arena block was allocated before)."""
        self._claim(client, part)
        if not self._room_for(part):
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

    def lend(self, client: Client, key: str) -> StoredObject:
        """``get`` for a sender that sends the object by key: the hold is journaled (with
        the process), so that a broker taking over the arena keeps the memory while that
        process runs -- it may be writing a descriptor that references it."""
        obj = self.get(client, key)
        if obj.inline is None:
            client.lends[key] += 1
            if client.lends[key] == 1:
                self._log({"r": "hold", "offset": obj.offset, "size": obj.size, "pid": client.pid})
        return obj

    def _unlend(self, client: Client, key: str) -> None:
        client.lends[key] -= 1
        if client.lends[key] <= 0:
            del client.lends[key]
            obj = self.table.get(key)
            if obj is not None:
                self._log({"r": "unhold", "offset": obj.offset, "pid": client.pid})

    def delete(self, key: str) -> None:
        if key not in self.pinned:
            raise rules.no_such_key(key)
        self.pinned.discard(key)
        if self._unref(key):
            self.store_freed.fire()
