"""A block: one object's blob in the arena, behind a header that says who still needs it.

::

    0   u32 magic "SBLK"   u32 refs (reference bits in use)
    8   u64 size           bytes of the block, header included
    16  u64 owner          offset + 1 of the owner's *freed* futex word (0: none)
    24  u64 pos            the object's number in its channel (queue/ring.py)
    32  u64 ref words      one bit per reference: a shard that has yet to finish with it
    ... (padded to 64 bytes; the blob starts there, 64-byte aligned)

A block starts with one bit set per reference it is published with: one (a shard's own
part) or ``num_shards`` (``full_batch``: one block, every shard). A receiver that is done
with it -- acknowledged, and no view of it left in its process -- clears its shard's bit.
Clearing is idempotent, which is what lets a process interrupted or killed half-way
through a release have it done again (queue/log.py: RELEASING): a bit cleared twice stays
clear, and a block reused meanwhile for another object is left alone, for a drop names
the object (``pos``) it is for. (Without that, the second drop would clear the new
object's bit: found by the random-interrupt tests.) The block is free once every bit is clear; its
owner (the sender that allocated it, or the broker after that sender is gone) reuses it.
The one who clears the last bit bumps the owner's freed word, so that an owner waiting
for memory wakes.
"""

from __future__ import annotations

import struct

from ..errors import ProtocolError
from .._native import Region
from .allocator import align

MAGIC = 0x4B4C4253  # "SBLK"
POS_AT = 24
REFS_AT = 32
_HEAD = struct.Struct("<IIQQQ")


def header_size(refs: int) -> int:
    """Bytes before the blob for a block with ``refs`` references (64 up to 256)."""
    return 64 if refs <= 64 else align(REFS_AT + 8 * ((refs + 63) // 64))


def block_size(blob: int, refs: int) -> int:
    return header_size(refs) + blob


def write_header(
    region: Region, view: memoryview, offset: int, size: int, refs: int, pos: int, owner: int = -1
) -> int:
    """Make ``[offset, offset + size)`` a block of ``refs`` references for object ``pos``;
    the blob's offset.

    Plain stores: the block is the writer's alone until it is published, and publication
    (a release store in the queue) orders them before any reader's loads."""
    _HEAD.pack_into(view, offset, MAGIC, refs, size, owner + 1, pos)
    if refs <= 64:  # one word (the usual case)
        region.store(offset + REFS_AT, (1 << refs) - 1)
        return offset + 64
    words = (refs + 63) // 64
    for i in range(words):
        bits = 64 if i < words - 1 or refs % 64 == 0 else refs % 64
        region.store(offset + REFS_AT + 8 * i, (1 << bits) - 1)
    return offset + header_size(refs)


def check(view: memoryview, offset: int, limit: int | None = None) -> tuple[int, int]:
    """(refs, size) of the block at ``offset``, checked: a hostile or half-dead process may
    have written anything there.

    Raises:
        ProtocolError: no block there, or one that runs past the memory.
    """
    end = len(view) if limit is None else limit
    if offset < 0 or offset % 64 or offset + 64 > end:
        raise ProtocolError(f"block at offset {offset}: outside the shared memory of {end} bytes")
    magic, refs, size, _, _ = _HEAD.unpack_from(view, offset)
    if magic != MAGIC or refs < 1 or size < header_size(refs) or offset + size > end:
        raise ProtocolError(f"no valid block at offset {offset} (magic {magic:#x}, {refs} refs, {size} bytes)")
    return refs, size


def blob_of(view: memoryview, offset: int, size: int) -> int:
    """The offset of the blob of ``size`` bytes in the block at ``offset``, checked as
    ``check`` does (the descriptor came from shared memory).

    Raises:
        ProtocolError: no block there, or one the blob does not fit.
    """
    # check()'s tests inline: this runs once per object received.
    if 0 <= offset and not offset % 64 and offset + 64 <= len(view):
        magic, refs, block_size, _, _ = _HEAD.unpack_from(view, offset)
        head = 64 if refs <= 64 else header_size(refs)
        if magic == MAGIC and refs >= 1 and head + size <= block_size and offset + block_size <= len(view):
            return offset + head
    refs, block_size = check(view, offset)  # raises, naming what is wrong ...
    raise ProtocolError(f"object of {size} bytes does not fit its block of {block_size} at {offset}")  # ... or this


def drop(region: Region, view: memoryview, offset: int, ref: int, pos: int) -> bool:
    """Clear reference ``ref`` of the block at ``offset`` if it still holds object ``pos``;
    True if the block is free after it (two callers clearing the last bits of different
    words at once may both say so: the owner is woken twice, which is harmless). Clearing
    a clear bit, or a bit of a block now holding another object -- or of no block at all
    now, when its memory went to a block starting elsewhere -- changes nothing: while our
    bit is set the block cannot be reused, so the check and the clear cannot be torn.
    """
    # The word first, then the header: the sender writes a reused block's header before
    # it sets the new object's bits, so a bit seen set here comes with that object's pos
    # below -- read the other way round, an old pos could pair with the new object's bit.
    # (One read of the header, not check(): this runs once per object received.)
    at, bit = offset + REFS_AT + 8 * (ref // 64), 1 << (ref % 64)
    if offset < 0 or offset % 64 or ref < 0 or at + 8 > len(view):
        return False
    while True:
        word = region.load(at)
        if not word & bit:
            return False
        magic, refs, size, owner, held = _HEAD.unpack_from(view, offset)
        if magic != MAGIC or ref >= refs or held != pos or offset + size > len(view):
            return False  # dropped before, and its memory reused since (or never a block)
        found = region.cas(at, word, word & ~bit)
        if found != word:
            # The word changed: another shard's drop, or a drop of ours said twice at once
            # (two threads) that freed the block, which may hold the next object already.
            # So the header is read again, not only the word.
            continue
        if word != bit or (refs > 64 and not _free(region, offset, refs)):
            return False  # other references remain
        if owner:  # its freed word; the waiter count follows it (store/slabs.py)
            region.add32(owner - 1, 1)
            if region.load32(owner + 3):
                region.wake(owner - 1, -1)
        return True


def is_free(region: Region, offset: int, refs: int) -> bool:
    return _free(region, offset, refs)


def _free(region: Region, offset: int, refs: int) -> bool:
    return all(region.load(offset + REFS_AT + 8 * i) == 0 for i in range((refs + 63) // 64))
