"""Object <-> (header, buffers) with pickle protocol 5 and out-of-band buffers.

Design: array data never goes through the pickle stream. A pickler ``reducer_override``
takes over every plain ``numpy.ndarray`` without Python objects inside (including the blocks
of a pandas DataFrame and the arrays inside pandas extension arrays) and replaces its data
by an out-of-band slot; other producers of ``PickleBuffer`` (pyarrow) go out-of-band too.
The writer later copies each source straight into shared memory -- one copy, even for a
non-contiguous source such as the row slice of a 2-D pandas block, which numpy's own
reducer would have copied into the pickle stream first (and then once more into shared
memory, and the receiver would get a private copy instead of a view).

On the receiving side each slot is given a memoryview of shared memory and the array is
rebuilt as a view of it: zero-copy. The stream itself (the "header") holds only metadata and
in-band Python objects (strings of object columns, list items).

Rejected alternative: ``persistent_id`` -- it is called for every object, strings included,
and made object columns about four times slower to pickle.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
from dataclasses import dataclass
import sys
from typing import Any, Iterable, Protocol, Union

import numpy as np

from ..errors import UnsupportedType

class Writer(Protocol):
    """A source that writes itself into shared memory (e.g. an Arrow IPC stream)."""

    nbytes: int

    def write_into(self, dst: memoryview) -> None: ...


#: A source for the blob writer: a contiguous byte view, an array copied with np.copyto, or
#: a Writer.
Source = Union[memoryview, np.ndarray, Writer]


@dataclass(frozen=True)
class Serialized:
    """A serialized object: the pickle stream and the buffers it refers to, in order."""

    header: bytes
    buffers: list[Source]

    @property
    def nbytes(self) -> int:
        """Bytes of header and buffers together (without layout padding)."""
        return len(self.header) + sum(_nbytes(b) for b in self.buffers)


def _nbytes(source: Source) -> int:
    return int(source.nbytes)


def _rebuild_ndarray(buf: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    """Rebuild an array as a view of ``buf`` (the receiver's shared-memory slot)."""
    count = math.prod(shape)
    if count == 0 or dtype.itemsize == 0:
        return np.empty(shape, dtype, order="F" if fortran else "C")
    flat = np.frombuffer(buf, dtype=dtype, count=count)
    return flat.reshape(shape, order="F" if fortran else "C")


def _rebuild_arrow_table(buf: Any) -> Any:
    """Read an Arrow IPC stream; the table's buffers are views of ``buf``."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(buf)).read_all()


class _ArrowStream:
    """An Arrow table as an IPC stream, written straight into the destination.

    Pickling a table slice would carry the whole of each buffer it slices (so every shard
    of a split table would hold the entire table); the IPC writer writes only the rows of
    the slice. Sizing runs the writer on a MockOutputStream, which copies nothing.
    """

    def __init__(self, table: Any) -> None:
        import pyarrow as pa

        self.table = table
        sink = pa.MockOutputStream()
        self._write(sink)
        self.nbytes = int(sink.size())

    def _write(self, sink: Any) -> None:
        import pyarrow as pa

        with pa.ipc.new_stream(sink, self.table.schema) as writer:
            writer.write_table(self.table)

    def write_into(self, dst: memoryview) -> None:
        import pyarrow as pa

        self._write(pa.FixedSizeBufferWriter(pa.py_buffer(dst)))


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=5, buffer_callback=self._take_buffer)
        self.buffers: list[Source] = []
        # id(placeholder PickleBuffer) -> (placeholder, source); the placeholder is kept
        # alive so that its id stays unique until the pickler hands it to _take_buffer.
        self._sources: dict[int, tuple[pickle.PickleBuffer, Source]] = {}
        pa = sys.modules.get("pyarrow")
        self._arrow_table = pa.Table if pa is not None else None

    def _slot(self, source: Source) -> pickle.PickleBuffer:
        # A writable placeholder: a read-only one would make the loader mark the receiver's
        # view read-only (pickle's READONLY_BUFFER opcode).
        slot = pickle.PickleBuffer(bytearray())
        self._sources[id(slot)] = (slot, source)
        return slot

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and not obj.dtype.hasobject:
            fortran = bool(obj.flags.f_contiguous and not obj.flags.c_contiguous and obj.ndim > 1)
            return _rebuild_ndarray, (self._slot(obj), obj.dtype, obj.shape, fortran)
        if self._arrow_table is not None and type(obj) is self._arrow_table:
            return _rebuild_arrow_table, (self._slot(_ArrowStream(obj)),)
        return NotImplemented

    def _take_buffer(self, buffer: pickle.PickleBuffer) -> bool:
        entry = self._sources.pop(id(buffer), None)
        if entry is not None:
            self.buffers.append(entry[1])
        else:
            self.buffers.append(buffer.raw())
        return False  # out-of-band


#: Header of a plain array, the most common object and the one where per-message cost shows
#: most: no pickle at all, just dtype and shape. Pickle headers start with b"\x80".
_RAW = b"SHMA"
_RAW_HEAD = struct.Struct("<4sBBH")  # magic, fortran, ndim, len(dtype.str)
_RAW_KINDS = frozenset("biufcmMSU")  # dtypes that np.dtype(dtype.str) rebuilds exactly


def _raw_header(obj: np.ndarray) -> bytes:
    fortran = bool(obj.flags.f_contiguous and not obj.flags.c_contiguous and obj.ndim > 1)
    dtype = obj.dtype.str.encode()
    return _RAW_HEAD.pack(_RAW, fortran, obj.ndim, len(dtype)) + dtype + struct.pack(f"<{obj.ndim}q", *obj.shape)


def _raw_array(header: Any, buffer: Any) -> np.ndarray:
    _, fortran, ndim, dtype_len = _RAW_HEAD.unpack_from(header)
    start = _RAW_HEAD.size
    dtype = np.dtype(bytes(header[start : start + dtype_len]).decode())
    shape = struct.unpack_from(f"<{ndim}q", header, start + dtype_len)
    return _rebuild_ndarray(buffer, dtype, shape, bool(fortran))


def serialize(obj: Any) -> Serialized:
    """Serialize ``obj``; array data stays in the source objects (no copy is made here).

    Raises:
        UnsupportedType (a TypeError): ``obj``, or something inside it, cannot be pickled.
    """
    if type(obj) is np.ndarray and obj.dtype.kind in _RAW_KINDS and obj.dtype.metadata is None and obj.ndim < 256:
        return Serialized(_raw_header(obj), [obj])
    stream = io.BytesIO()
    pickler = _Pickler(stream)
    try:
        pickler.dump(obj)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise UnsupportedType(f"obj cannot be serialized: {exc}") from exc
    return Serialized(stream.getvalue(), pickler.buffers)


def deserialize(header: Any, buffers: Iterable[Any]) -> Any:
    """Rebuild an object from its header and buffer views; arrays are views of ``buffers``."""
    if header[:4] == _RAW:
        (buffer,) = buffers
        return _raw_array(header, buffer)
    return pickle.loads(header, buffers=buffers)
