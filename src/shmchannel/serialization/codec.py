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
in-band Python objects (strings of object columns, list items). Every slot starts on a
64-byte boundary of the blob (store/blob.py), and so does every array, tensor, pandas block
and Arrow buffer rebuilt from one, when the blob does.

Types with a layout of their own have reducers here too, looked up by exact type in a table
built from the modules already loaded (nothing is imported to find out), then by base class
for subclasses of ``numpy.ndarray`` and ``torch.Tensor``. What arrives ("view": of the
received buffer)::

    numpy.ndarray                    ndarray, a view (of Python objects: pickled in-band)
    np.memmap (read-only too)        plain ndarray, a view: no file behind it any more
    np.recarray, np.matrix, other    the same class, a view, rebuilt with view(cls): its
      subclass keeping ndarray's       __array_finalize__ runs; as with pickle, its
      __reduce__/__reduce_ex__/        instance __dict__ is not carried
      __setstate__
    np.ma.MaskedArray                MaskedArray, data and mask views, fill_value and hard
                                       mask kept; nomask stays nomask, a mask array stays
                                       an array (numpy's pickle drops the hard mask and
                                       turns nomask into an array)
    other ndarray subclasses         through their own pickling: in-band, a copy
      (MaskedArray's too)
    pyarrow Table, RecordBatch       the same, every buffer a view, 64-byte aligned
    polars DataFrame                 the same; which columns are views: see arrow.py
    torch.Tensor, dense, CPU         Tensor, a view (a copy from read-only memory);
                                       requires_grad kept on a leaf, a non-leaf detached
    torch.nn.Parameter               Parameter over a view, requires_grad kept
    Tensor subclass keeping          that subclass over a view, its attributes kept, a
      Tensor's __reduce_ex__           leaf if it required grad
    sparse (COO/CSR/CSC/BSR/BSC),    the same, through torch's pickling; its dense parts
      nested tensors                   (indices, values, sizes) are views
    quantized tensors                the same, through torch's pickling: in-band, a copy
    meta tensors (no data)           the same, through torch's pickling
    a tensor on another device       refused (UnsupportedType): .cpu() it first

How each foreign type is laid out: arrow.py (Arrow and polars), tensors.py (torch);
numpy subclasses: arrays.py.

Rejected alternative: ``persistent_id`` -- it is called for every object, strings included,
and made object columns about four times slower to pickle.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import numpy as np

from ..errors import ChannelError, UnsupportedType
from .arrays import Slot, Source, fortran, rebuild_ndarray, reduce_masked, reduce_ndarray_subclass
from .arrow import (
    ArrowStream, polars_stream, rebuild_arrow_batch, rebuild_arrow_table, rebuild_polars, reduce_batch,
    reduce_polars, reduce_table,
)
from .tensors import reduce_tensor, reduce_tensor_subclass


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


# -- the pickler ----------------------------------------------------------------------------

_Reducers = dict[type, Callable[[Any, Slot], Any]]
#: (modules the tables were built from, reducers by exact type, reducers by base class)
_cache: tuple[tuple[Any, ...], _Reducers, _Reducers] = ((), {}, {})  # () matches no module tuple


def _reducers() -> tuple[_Reducers, _Reducers]:
    """Reducers of the foreign types whose modules are loaded, by exact type, and of the
    subclasses of ndarray and Tensor, by base class. Rebuilt only when one of those modules
    got loaded: building them each time cost 1 us per object."""
    global _cache
    ma, pa, pl, torch = modules = tuple(sys.modules.get(m) for m in ("numpy.ma", "pyarrow", "polars", "torch"))
    if modules == _cache[0]:
        return _cache[1], _cache[2]
    table: _Reducers = {}
    bases: _Reducers = {np.ndarray: reduce_ndarray_subclass}
    if ma is not None:
        table[ma.MaskedArray] = reduce_masked  # not its subclasses: they pickle themselves
    if pa is not None:
        table[pa.Table] = reduce_table
        table[pa.RecordBatch] = reduce_batch
    if pl is not None:
        table[pl.DataFrame] = reduce_polars
    if torch is not None:
        table[torch.Tensor] = reduce_tensor
        bases[torch.Tensor] = reduce_tensor_subclass
    _cache = (modules, table, bases)
    return table, bases


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, arrow_stream: Callable[[Any], bool] | None = None) -> None:
        super().__init__(file, protocol=5, buffer_callback=self._take_buffer)
        self.buffers: list[Source] = []
        # id(placeholder PickleBuffer) -> (placeholder, source); the placeholder is kept
        # alive so that its id stays unique until the pickler hands it to _take_buffer.
        self._sources: dict[int, tuple[pickle.PickleBuffer, Source]] = {}
        self._reducers, self._bases = _reducers()
        self._stream = arrow_stream
        self._base_types = tuple(self._bases)

    def _slot(self, source: Source) -> pickle.PickleBuffer:
        # A writable placeholder: a read-only one would make the loader mark the receiver's
        # view read-only (pickle's READONLY_BUFFER opcode).
        slot = pickle.PickleBuffer(bytearray())
        self._sources[id(slot)] = (slot, source)
        return slot

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is np.ndarray:
            if obj.dtype.hasobject:
                return NotImplemented
            return rebuild_ndarray, (self._slot(obj), obj.dtype, obj.shape, fortran(obj))
        reduce = self._reducers.get(cls)
        if reduce is not None:
            if self._stream is not None and reduce in _ARROW and not self._stream(obj):
                return NotImplemented  # pyarrow's own pickling: each buffer its own out-of-band slot
            return reduce(obj, self._slot)
        if isinstance(obj, self._base_types):
            base = next(b for b in self._base_types if isinstance(obj, b))
            return self._bases[base](obj, self._slot)
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


#: Raw headers made and read lately: a stream repeats a few dtypes and shapes, and building
#: or parsing one costs more than the rest of a small array's way (bounded: cleared when full).
_RAW_CACHE_SIZE = 256
_raw_headers: dict[tuple[Any, ...], bytes] = {}
_raw_shapes: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, Literal["C", "F"]]] = {}


def _raw_header(obj: np.ndarray) -> bytes:
    f = not obj.flags.c_contiguous and fortran(obj)
    key = (obj.dtype, obj.shape, f)
    header = _raw_headers.get(key)
    if header is None:
        dtype = obj.dtype.str.encode()
        header = _RAW_HEAD.pack(_RAW, f, obj.ndim, len(dtype)) + dtype + struct.pack(f"<{obj.ndim}q", *obj.shape)
        if len(_raw_headers) >= _RAW_CACHE_SIZE:
            _raw_headers.clear()
        _raw_headers[key] = header
    return header


def _raw_array(header: Any, buffer: Any) -> np.ndarray:
    key = bytes(header)
    found = _raw_shapes.get(key)
    if found is None:
        _, fortran_order, ndim, dtype_len = _RAW_HEAD.unpack_from(header)
        start = _RAW_HEAD.size
        dtype = np.dtype(bytes(header[start : start + dtype_len]).decode())
        shape = struct.unpack_from(f"<{ndim}q", header, start + dtype_len)
        order: Literal["C", "F"] = "F" if fortran_order else "C"
        found = (dtype, shape, bool(fortran_order), order)
        if len(_raw_shapes) >= _RAW_CACHE_SIZE:
            _raw_shapes.clear()
        _raw_shapes[key] = found
    dtype, shape, fortran_order, order = found
    if len(buffer) and dtype.itemsize:  # rebuild_ndarray's way, inline for the common case
        return np.frombuffer(buffer, dtype=dtype, count=len(buffer) // dtype.itemsize).reshape(shape, order=order)
    return rebuild_ndarray(buffer, dtype, shape, fortran_order)


#: Header of an Arrow Table, RecordBatch or polars DataFrame sent on its own (each shard of a
#: split one is): no pickle either, only which of the three; its one buffer is the stream.
_STREAM = b"SHMS"
_STREAMED: dict[Any, tuple[int, Callable[[Any], Any]]] = {
    reduce_table: (0, ArrowStream), reduce_batch: (1, ArrowStream), reduce_polars: (2, polars_stream)
}
_STREAM_REBUILD = (rebuild_arrow_table, rebuild_arrow_batch, rebuild_polars)


_ARROW = (reduce_table, reduce_batch)


def _streamed(obj: Any, arrow_stream: Callable[[Any], bool] | None) -> Serialized | None:
    """``obj`` as a header and its Arrow stream if it is a table, batch or frame (and
    ``arrow_stream`` says so), else None."""
    reduce = _reducers()[0].get(type(obj))
    entry = _STREAMED.get(reduce)
    if entry is None or arrow_stream is not None and reduce in _ARROW and not arrow_stream(obj):
        return None
    stream = entry[1](obj)
    return None if stream is None else Serialized(_STREAM + bytes((entry[0],)), [stream])


def serialize(obj: Any, arrow_stream: Callable[[Any], bool] | None = None) -> Serialized:
    """Serialize ``obj``; array data stays in the source objects (no copy is made here).

    ``arrow_stream(table)`` False: that Arrow table or batch is pickled by pyarrow, each of
    its buffers a source of its own, instead of written as one IPC stream -- for a sender
    whose loans hold some of them: it references those (backends/loans.py). (Pickled, a
    slice carries its buffers whole: a stream is kept wherever no loan is involved.)

    Raises:
        UnsupportedType (a TypeError): ``obj``, or something inside it, cannot be pickled, or
            holds a torch.Tensor that is not on the CPU.
    """
    if type(obj) is np.ndarray and obj.dtype.kind in _RAW_KINDS and obj.dtype.metadata is None and obj.ndim < 256:
        return Serialized(_raw_header(obj), [obj])
    try:
        streamed = _streamed(obj, arrow_stream)
        if streamed is not None:
            return streamed
        stream = io.BytesIO()
        pickler = _Pickler(stream, arrow_stream)
        try:
            pickler.dump(obj)
        finally:
            # The pickler is in a cycle (its buffer_callback is its own method): only the
            # garbage collector frees it, and its memo keeps what it pickled alive until
            # then -- a sender's loans among them, held in the store (found by a test).
            buffers, pickler.buffers = pickler.buffers, []
            pickler.clear_memo()
            pickler._sources.clear()
    except (ChannelError, MemoryError):
        raise  # ours already names the cause (a tensor off the CPU); memory is not a type problem
    except Exception as exc:  # a __reduce__ may raise anything: polars raises ComputeError
        raise UnsupportedType(f"obj cannot be serialized: {exc}") from exc
    return Serialized(stream.getvalue(), buffers)


def deserialize(header: Any, buffers: Iterable[Any]) -> Any:
    """Rebuild an object from its header and buffer views; arrays are views of ``buffers``."""
    if header[:4] == _RAW:
        (buffer,) = buffers
        return _raw_array(header, buffer)
    if header[:4] == _STREAM:
        (buffer,) = buffers
        return _STREAM_REBUILD[header[4]](buffer)
    return pickle.loads(header, buffers=buffers)
