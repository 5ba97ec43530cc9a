"""Layout of one stored object ("blob"): a small self-describing table, the header, buffers.

::

    0   magic b"SHMC"   u32 version   u64 header_len   u32 nbuf   u32 reserved
    24  nbuf x (u64 offset, u64 length)       offsets relative to the blob's start
        header bytes
        buffers, each at a 64-byte boundary

A blob describes itself, so the broker stores only (offset, size) per key and never reads
user data; the same bytes travel inline over the socket for small objects.

A buffer may instead be *referenced*: its entry's offset has the ``EXTERNAL`` bit set and
names bytes elsewhere in the arena -- a sender's loan, or a DataSystem object sent by key
(issue 15) -- which the blob does not hold. Whoever wrote such a blob holds that memory
for as long as the blob's block is in use (backends/loans.py); a reader resolves the entry
with the ``external`` function it is given, and a reader given none refuses it.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Callable, Literal, NamedTuple, Sequence

import numpy as np

from ..errors import ProtocolError
from ..serialization.arrays import Source
from .allocator import align

MAGIC = b"SHMC"
VERSION = 2  # 2: referenced (EXTERNAL) buffers
#: Set in a table entry's offset: the buffer is ``[offset & ~EXTERNAL, + length)`` of the
#: arena, not of the blob.
EXTERNAL = 1 << 63
_HEAD = struct.Struct("<4sIQII")
_ENTRY = struct.Struct("<QQ")


class BlobPlan(NamedTuple):
    """Where each part of a blob goes; ``size`` is the bytes to allocate."""

    size: int
    header_len: int
    offsets: tuple[int, ...]  # in the blob, or EXTERNAL | arena offset
    lengths: tuple[int, ...]
    table: bytes  # the blob's table (its first bytes), packed once per plan


def plan_blob(header_len: int, lengths: Sequence[int], external: Sequence[int] | None = None) -> BlobPlan:
    """Where the header and each buffer go; ``external[i] >= 0``: buffer i is not written
    but referenced, at that arena offset (``EXTERNAL``)."""
    if external is not None:
        return _plan(header_len, tuple(lengths), tuple(external))
    if len(lengths) <= 4:  # an array, a few columns: a stream repeats these, made once each
        return _cached_plan(header_len, tuple(lengths))
    return _plan(header_len, tuple(lengths))


def _plan(header_len: int, lengths: tuple[int, ...], external: tuple[int, ...] = ()) -> BlobPlan:
    pos = _HEAD.size + _ENTRY.size * len(lengths) + header_len
    offsets = []
    for i, n in enumerate(lengths):
        if external and external[i] >= 0:
            offsets.append(EXTERNAL | external[i])
            continue
        pos = align(pos)
        offsets.append(pos)
        pos += n
    table = _HEAD.pack(MAGIC, VERSION, header_len, len(lengths), 0) + b"".join(
        _ENTRY.pack(o, n) for o, n in zip(offsets, lengths)
    )
    return BlobPlan(pos, header_len, tuple(offsets), lengths, table)


_cached_plan = functools.lru_cache(maxsize=256)(_plan)


def write_blob(dst: memoryview, plan: BlobPlan, header: bytes, sources: Sequence[Source]) -> None:
    """Write header and sources into ``dst`` (at least ``plan.size`` bytes): one copy each."""
    start = len(plan.table)
    dst[:start] = plan.table
    dst[start : start + plan.header_len] = header
    for source, offset, length in zip(sources, plan.offsets, plan.lengths):
        if length == 0 or offset & EXTERNAL:
            continue
        if isinstance(source, np.ndarray):
            if source.flags.c_contiguous and source.dtype.kind in "biuf" and source.dtype.isnative:  # the cheapest way
                dst[offset : offset + length] = memoryview(source).cast("B")  # type: ignore[arg-type]
                continue
            if source.flags.c_contiguous or source.flags.f_contiguous:  # the bytes in order: one slice copy
                dst[offset : offset + length] = memoryview(source.ravel(order="K").view(np.uint8))  # type: ignore[arg-type]
                continue
            order: Literal["C", "F"] = "F" if source.flags.f_contiguous and not source.flags.c_contiguous else "C"
            target = np.ndarray(source.shape, source.dtype, buffer=dst, offset=offset, order=order)
            np.copyto(target, source, casting="no")
        elif isinstance(source, memoryview):
            dst[offset : offset + length] = source.cast("B") if source.format != "B" else source
        else:
            source.write_into(dst[offset : offset + length])


def read_blob(
    view: memoryview, external: Callable[[int, int], Any] | None = None
) -> tuple[memoryview, list[Any]]:
    """Split a blob into (header view, buffer views); all views of ``view``, no copy, but
    for referenced buffers: ``external(arena offset, length)`` gives those.

    Raises:
        ProtocolError: the bytes are not a blob (bad magic, version or bounds), or it
            references memory and ``external`` is None (or refuses the range).
    """
    if len(view) < _HEAD.size:
        raise ProtocolError(f"blob of {len(view)} bytes is shorter than its table")
    magic, version, header_len, nbuf, _ = _HEAD.unpack_from(view, 0)
    if magic != MAGIC or version not in (1, VERSION):  # 1: no references (an older broker's arena)
        raise ProtocolError(f"blob starts with {bytes(magic)!r} v{version}, expected {MAGIC!r} v{VERSION}")
    start = _HEAD.size + _ENTRY.size * nbuf
    if start + header_len > len(view):
        raise ProtocolError("blob header runs past its end")
    buffers = []
    for i in range(nbuf):
        offset, length = _ENTRY.unpack_from(view, _HEAD.size + _ENTRY.size * i)
        if offset & EXTERNAL and version == VERSION:
            if external is None:
                raise ProtocolError(f"blob buffer {i} references shared memory, and this reader has none")
            buffers.append(external(offset & ~EXTERNAL, length))
            continue
        if offset + length > len(view):
            raise ProtocolError(f"blob buffer {i} runs past its end")
        buffers.append(view[offset : offset + length])
    return view[start : start + header_len], buffers


def external_ranges(view: Any, limit: int, at: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(arena offset, length) of what the blob at ``view[at:end]`` references (``EXTERNAL``
    entries) inside the first ``limit`` bytes of the arena: for a peek's copy, and for the
    broker taking over a block (broker/slab_grants.py). Garbage -- a block half written by
    a sender that died, or by a hostile one -- references nothing."""
    end = len(view) if end is None else min(end, len(view))
    if at < 0 or at + _HEAD.size > end:
        return []
    magic, version, _, nbuf, _ = _HEAD.unpack_from(view, at)
    if magic != MAGIC or version != VERSION or at + _HEAD.size + _ENTRY.size * nbuf > end:
        return []
    found = []
    for i in range(nbuf):
        offset, length = _ENTRY.unpack_from(view, at + _HEAD.size + _ENTRY.size * i)
        if offset & EXTERNAL and (offset & ~EXTERNAL) + length <= limit:
            found.append((offset & ~EXTERNAL, length))
    return found
