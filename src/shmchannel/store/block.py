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
    return align(REFS_AT + 8 * ((refs + 63) // 64))


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


def drop(region: Region, view: memoryview, offset: int, ref: int, pos: int) -> bool:
    """Clear reference ``ref`` of the block at ``offset`` if it still holds object ``pos``;
    True if the block is free after it (two callers clearing the last bits of different
    words at once may both say so: the owner is woken twice, which is harmless). Clearing
    a clear bit, or a bit of a block now holding another object -- or of no block at all
    now, when its memory went to a block starting elsewhere -- changes nothing: while our
    bit is set the block cannot be reused, so the check and the clear cannot be torn.
    """
    try:
        refs, _ = check(view, offset)
    except ProtocolError:
        return False  # dropped before, and its memory reused since (or never a block)
    if not 0 <= ref < refs or region.load(offset + POS_AT) != pos:
        return False  # dropped before, and reused since (or not a reference of it)
    at, bit = offset + REFS_AT + 8 * (ref // 64), 1 << (ref % 64)
    word = region.load(at)
    while word & bit:
        found = region.cas(at, word, word & ~bit)
        if found == word:
            if word != bit:
                return False  # other bits of this word remain
            if _free(region, offset, refs):
                owner = struct.unpack_from("<Q", view, offset + 16)[0]
                if owner:  # its freed word; the waiter count follows it (store/slabs.py)
                    region.add32(owner - 1, 1)
                    if region.load32(owner - 1 + 4):
                        region.wake(owner - 1, -1)
                return True
            return False
        word = found
    return False


def is_free(region: Region, offset: int, refs: int) -> bool:
    return _free(region, offset, refs)


def _free(region: Region, offset: int, refs: int) -> bool:
    return all(region.load(offset + REFS_AT + 8 * i) == 0 for i in range((refs + 63) // 64))
