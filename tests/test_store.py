"""The allocator and blob layout (pure, no shared memory)."""

from __future__ import annotations

import mmap
import random

import pytest

from shmchannel._native import Region
from shmchannel.errors import ProtocolError, StoreFull
from shmchannel.store import block
from shmchannel.store.allocator import ALIGNMENT, Allocator
from shmchannel.store.blob import read_blob
from shmchannel.store.slabs import Slabs
from shmchannel.store.table import ObjectTable


def test_allocator_reuses_lowest_addresses() -> None:
    """A freed block is handed out again before fresh space."""
    a = Allocator(1 << 20)
    first = a.alloc(1000)
    a.alloc(1000)
    assert first is not None
    a.release(first)
    assert a.alloc(500) == first


def test_allocator_coalesces_and_returns_to_empty() -> None:
    """After random allocations and frees, everything coalesces back into one block."""
    a = Allocator(1 << 20)
    rng = random.Random(1)
    live = []
    for _ in range(2000):
        if live and rng.random() < 0.5:
            a.release(live.pop(rng.randrange(len(live))))
        else:
            off = a.alloc(rng.randint(1, 5000))
            if off is not None:
                assert off % ALIGNMENT == 0
                live.append(off)
    for off in live:
        a.release(off)
    assert a.used == 0 and a.largest_free == 1 << 20


def test_allocator_says_none_when_full() -> None:
    """alloc returns None when no free block is large enough."""
    a = Allocator(4096)
    assert a.alloc(4096) == 0
    assert a.alloc(1) is None


def test_table_refuses_object_larger_than_store() -> None:
    """An object larger than the whole store is StoreFull at once, naming both sizes."""
    table = ObjectTable(1 << 20, lambda end: None, "k")
    with pytest.raises(StoreFull, match=r"^object needs 2097152 bytes of shared memory, the store holds 1048576 in all"):
        table.allocate([2 << 20])


def test_table_frees_memory_at_last_reference() -> None:
    """Memory returns to the allocator exactly when the last reference goes."""
    table = ObjectTable(1 << 20, lambda end: None, "k")
    (offset,) = table.allocate([1000]) or []
    obj = table.add(1000, offset=offset, refs=2)
    assert not table.unref(obj.key)
    assert table.allocator.used > 0
    assert table.unref(obj.key)
    assert table.allocator.used == 0 and len(table) == 0


def test_read_blob_refuses_garbage() -> None:
    """Bytes that are not a blob raise ProtocolError instead of being misread."""
    with pytest.raises(ProtocolError):
        read_blob(memoryview(b"not a blob at all, clearly not one"))


def test_table_counts_inline_objects_against_the_capacity() -> None:
    """Inline objects (rounded up as arena blocks) take room an arena allocation then
    cannot have, though the arena has it; it can once they are gone (issue 13)."""
    table = ObjectTable(8192, lambda end: None, "k")
    obj = table.add(4000, inline=bytes(4000), refs=1)  # 4000 counts as 4032, a 64-byte multiple
    (block,) = table.allocate([4160]) or []
    assert (table.used, table.free, table.inline_bytes) == (8192, 0, 4000)
    assert table.allocator.largest_free >= 64
    assert table.allocate([64]) is None and not table.fits(1)
    assert table.unref(obj.key)
    table.free_allocation(block)
    assert table.allocate([8192]) == [0]


def test_a_sender_takes_its_oldest_block_again_once_its_receivers_are_done() -> None:
    """A steady stream cycles through a few blocks (their pages stay in cache): the oldest
    block out is taken again when all its references are cleared and it has the size
    asked; one still referenced goes to the back, so that it does not stop the reuse of
    those behind it; a block of another size is left to the first-fit allocator. Every
    block handed out is also appended to the caller's list (what to free if its send
    fails)."""
    memory = mmap.mmap(-1, 1 << 20)
    region, view = Region(memory), memoryview(memory)
    slabs = Slabs(region, view)
    slabs.add(0, 1 << 20)
    handed: list[int] = []

    def alloc(size: int, pos: int) -> int:
        got = slabs.alloc(size, 1, pos, handed)
        assert got is not None and handed[-1] == got[0]
        return got[0]

    a, b = alloc(1000, 0), alloc(1000, 1)
    assert a != b
    assert block.drop(region, view, a, 0, 0)  # its one receiver is done with it
    c = alloc(1000, 2)
    assert c == a  # the oldest, free: taken again, now the newest out
    d = alloc(1000, 3)  # the oldest (b) is still referenced: a new block, b to the back
    assert d not in (a, b)
    assert block.drop(region, view, c, 0, 2)
    assert alloc(1000, 4) == c  # the free one behind b was next
    assert block.drop(region, view, d, 0, 3)
    other = alloc(5000, 5)  # another size: d stays for reclaim, the allocator gives a new block
    assert other not in (a, b, d)
    assert sorted(slabs.outstanding()) == sorted([b, c, other])  # reclaim took d back
