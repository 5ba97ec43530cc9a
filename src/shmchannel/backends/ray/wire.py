"""How a part travels through Ray: our layout, not Ray's pickling of the object.

Ray carries each part in our layout, not as Ray pickles the object: our pickle stream and
the object's buffers under 2048 bytes in one blob (the layout of ``store/blob.py``, every
buffer at a 64-byte offset), and each larger buffer as a uint8 array of its own. Letting Ray
pickle the objects misaligned what the user got (issue 11): Ray's pickle-5 writer places a
buffer under 2048 bytes on an 8-byte boundary only (a small DataFrame, dict or list had
blocks at 8, 16, 32... mod 64), and arrays numpy pickles in-band (datetime64 blocks) came
back as copies where malloc put them (16 mod 64). Ray puts the first out-of-band buffer of
an object (our blob) and every one of 2048 bytes or more on a 64-byte boundary, in the
object store and in the in-process store alike (measured with Ray 2.60, 1 byte to 3 MiB),
so nothing is copied to be aligned; an array Ray put off the boundary all the same (it does
not promise it) is copied to one, read-only like the rest. Large buffers are not copied
into the blob: Ray copies them straight from the object, once, as it did before; receiving
stays zero-copy. (Rejected: the whole part as one blob -- an extra copy of all the data on
the sender: 147 ms for 64 MiB into fresh pages, measured here.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...serialization import deserialize, serialize
from ...serialization.arrays import ALIGNMENT, Source, aligned_copy
from ...store.blob import plan_blob, read_blob, write_blob

#: Ray's pickle-5 writer puts an out-of-band buffer of at least this many bytes on a 64-byte
#: boundary, a shorter one on an 8-byte boundary (``kMajorBufferSize``, ``kMinorBufferAlign``).
RAY_ALIGNED = 2048

#: What travels for one part: which of the object's buffers travel apart; a blob (the layout
#: of ``store/blob.py``) of the pickle stream and the other buffers; the buffers apart.
Wire = tuple[tuple[bool, ...], np.ndarray, list[np.ndarray]]


def _bytes_of(source: Source) -> np.ndarray:
    """The bytes of a codec buffer as a uint8 array: a view of a contiguous one, else a copy."""
    if isinstance(source, memoryview):
        return np.frombuffer(source, np.uint8)
    if isinstance(source, np.ndarray):
        if not (source.flags.c_contiguous or source.flags.f_contiguous):
            source = np.ascontiguousarray(source)  # C order, as the codec rebuilds a non-contiguous one
        return source.ravel(order="K").view(np.uint8)  # memory order: what the codec rebuilds
    out = np.empty(source.nbytes, np.uint8)
    source.write_into(memoryview(out))  # type: ignore[arg-type]  # numpy exports a buffer
    return out


def encode(obj: Any) -> Wire:
    """``obj`` in the form Ray carries for us (see the module docstring).

    Raises:
        UnsupportedType (a TypeError): ``obj`` cannot be serialized (the embedded backend
            refuses the same objects; Ray's cloudpickle would have taken lambdas).
    """
    serialized = serialize(obj)
    apart = tuple(int(b.nbytes) >= RAY_ALIGNED for b in serialized.buffers)
    small = [b for b, away in zip(serialized.buffers, apart) if not away]
    plan = plan_blob(len(serialized.header), [int(b.nbytes) for b in small])
    blob = np.empty(plan.size, np.uint8)
    write_blob(memoryview(blob), plan, serialized.header, small)  # type: ignore[arg-type]  # numpy exports a buffer
    return apart, blob, [_bytes_of(b) for b, away in zip(serialized.buffers, apart) if away]


def wire_size(wire: Wire) -> int:
    """Bytes of data one part carries (for the inline threshold and status)."""
    return int(wire[1].nbytes) + sum(int(b.nbytes) for b in wire[2])


def _view(data: np.ndarray) -> memoryview:
    """A read-only view of ``data`` that starts on a 64-byte boundary: ``data`` itself if
    Ray put it on one, else a copy (read-only as Ray's memory: the same arrays either way)."""
    view = memoryview(data)  # type: ignore[arg-type]  # numpy exports a buffer
    return view if data.ctypes.data % ALIGNMENT == 0 else aligned_copy(view).toreadonly()


def decode(wire: Wire) -> Any:
    """The object of a part Ray handed us; its arrays are read-only views of Ray's memory."""
    apart, blob, buffers = wire
    header, small = read_blob(_view(blob))
    small_ones, apart_ones = iter(small), iter(buffers)
    views = [_view(next(apart_ones)) if away else next(small_ones) for away in apart]
    return deserialize(header, views)
