"""Where every word of a channel's queues lies in shared memory, and how its states are coded.

A channel is one region (placed by the broker, in the arena; 64-byte aligned)::

    header     512 bytes   magic, shape, tail (the commit point), futex words
    shard 0    256 bytes   head, returned-list cursors, pending
               ring:     R slots of 32 bytes   descriptors in publication order
               returned: R slots of 32 bytes   a dead receiver's claims, for the next one
    shard 1 ...

A slot is four 64-bit words: ``state``, ``offset``, ``size``, ``pos`` (the object's number in
the channel). Only ``state`` is ever read while another process may write the slot; the
other three are written before a release store of ``state`` and read after an acquire of it
(the publication argument in DESIGN.md).

Every value read back from shared memory is checked before it is used as an offset
(``check_header``): another process may be dead half-way through a write, or hostile.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ProtocolError

MAGIC = 0x51434D53  # "SMCQ" little-endian
VERSION = 2  # 2: the futex words are event counts (events.py), no waiter counts
HEADER = 512
SHARD_HEADER = 256
SLOT = 32

# header words (byte offsets from the channel's base)
H_MAGIC = 0  # u32 magic, u32 version
H_SHAPE = 8  # u32 num_shards, u32 ring slots R
H_MAX_QUEUE = 16  # u64 max_queue_size
H_FLAGS = 24  # u64: FULL_BATCH
H_TAIL = 64  # u64: objects published (the commit point of every shard at once)
H_CLOSED = 72  # u64: 1 once the sender ended the stream
H_SENT_BYTES = 80  # u64: bytes of the parts published (for status)
H_DATA_SEQ = 128  # u32 futex, an event count (events.py): receivers wait on it for objects
H_SPACE_SEQ = 192  # u32 futex, an event count: senders wait on it for room

FULL_BATCH = 1

# shard header words (from the shard's base)
S_HEAD = 0  # u64: lowest position that may still be READY in the ring
S_RET_HEAD = 64  # u64: the same for the returned list
S_RET_TAIL = 72  # u64: entries ever written to the returned list (by the broker only)
S_PENDING = 80  # u64: claims of a dead receiver the broker has yet to return
S_RECV_BYTES = 128  # u64: bytes claimed (for status; returned ones are taken back)

# slot words (from the slot's base)
W_STATE, W_OFFSET, W_SIZE, W_POS = 0, 8, 16, 24
SLOT_WORDS = struct.Struct("<QQQ")  # offset, size, pos (from W_OFFSET)

# slot state: bits 0-3 code, 4-23 claimer, 24-63 position modulo 2**40
FREE, READY, CLAIMED = 0, 1, 2
CLAIMER_BITS = 20
MAX_CLAIMER = (1 << CLAIMER_BITS) - 1
POS_MASK = (1 << 40) - 1


def ready(pos: int) -> int:
    return (pos & POS_MASK) << 24 | READY


def claimed(pos: int, claimer: int) -> int:
    return (pos & POS_MASK) << 24 | claimer << 4 | CLAIMED


def code_of(state: int) -> int:
    return state & 0xF


def claimer_of(state: int) -> int:
    return state >> 4 & MAX_CLAIMER


def ring_size(max_queue_size: int) -> int:
    """Slots per ring: room for ``max_queue_size`` queued objects plus slots being claimed
    (a claimer frees its slot right after copying the descriptor; a dead one's slot stays
    taken until the broker returns its object)."""
    return max_queue_size + 64


@dataclass(frozen=True)
class Layout:
    """Offsets of one channel's words, from its base."""

    num_shards: int
    ring: int  # R
    max_queue_size: int
    full_batch: bool

    @property
    def shard_bytes(self) -> int:
        return SHARD_HEADER + 2 * self.ring * SLOT

    @property
    def size(self) -> int:
        return HEADER + self.num_shards * self.shard_bytes

    def shard(self, s: int) -> int:
        return HEADER + s * self.shard_bytes

    def slot(self, s: int, pos: int) -> int:
        return HEADER + s * self.shard_bytes + SHARD_HEADER + (pos % self.ring) * SLOT

    def returned_slot(self, s: int, pos: int) -> int:
        return HEADER + s * self.shard_bytes + SHARD_HEADER + (self.ring + pos % self.ring) * SLOT


def plan(num_shards: int, max_queue_size: int, full_batch: bool) -> Layout:
    return Layout(num_shards, ring_size(max_queue_size), max_queue_size, full_batch)


def write_header(view: memoryview, base: int, layout: Layout) -> None:
    """Lay out a new channel at ``base`` of ``view`` (zeroed memory: all slots FREE)."""
    struct.pack_into("<IIIIQQ", view, base, MAGIC, VERSION, layout.num_shards, layout.ring,
                     layout.max_queue_size, FULL_BATCH if layout.full_batch else 0)


def read_header(view: memoryview, base: int) -> Layout:
    """The layout of the channel at ``base``, checked against the bytes that exist.

    Raises:
        ProtocolError: no channel there, or one whose shape runs past the region.
    """
    if base < 0 or base % 64 or base + HEADER > len(view):
        raise ProtocolError(f"channel queues at offset {base}: outside the shared memory of {len(view)} bytes")
    magic, version, num_shards, ring, max_queue_size, flags = struct.unpack_from("<IIIIQQ", view, base)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"no channel queues at offset {base} (magic {magic:#x} v{version})")
    if not 1 <= num_shards or ring != ring_size(max_queue_size) or max_queue_size < 1:
        raise ProtocolError(f"channel queues at offset {base} have a corrupt shape ({num_shards} shards, {ring} slots)")
    layout = Layout(num_shards, ring, max_queue_size, bool(flags & FULL_BATCH))
    if base + layout.size > len(view):
        raise ProtocolError(f"channel queues at offset {base} run past the shared memory ({layout.size} bytes)")
    return layout


def read_slot(view: memoryview, at: int) -> tuple[int, int, int]:
    """(offset, size, pos) of the slot at ``at`` -- called only by the slot's owner."""
    return SLOT_WORDS.unpack_from(view, at + W_OFFSET)


def write_slot(view: memoryview, at: int, offset: int, size: int, pos: int) -> None:
    SLOT_WORDS.pack_into(view, at + W_OFFSET, offset, size, pos)
