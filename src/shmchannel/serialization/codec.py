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

Types with a layout of their own have reducers here too, looked up by exact type in a table
built from the modules already loaded (nothing is imported to find out):

- pyarrow Table and RecordBatch: an Arrow IPC stream written straight into the slot; the
  receiver reads it back with buffers that are views of shared memory.
- polars DataFrame: through Arrow (``to_arrow``, zero-copy) and the same IPC stream. Measured
  with polars 2.1: numeric, boolean, temporal, list, array and struct columns come back as
  views; String/Binary columns are copied by polars (it converts large_string to its string
  views), Categorical/Enum are re-encoded, Decimal is a view only when its buffer happens to
  be 16-byte aligned (IPC guarantees 8). Exporting polars' own string views instead
  (``CompatLevel.newest``) would make strings views too, but a slice exports every data
  buffer of its column: each of 4 shards of a 400,000-row frame carried 12.7 MB instead of
  4.1 MB, so we export large_string. Object columns are refused: Arrow would carry the
  addresses of the objects. Dtypes Arrow lacks (Int128) fall back to polars' own pickling.
- torch.Tensor (CPU, detached): its data as a numpy array (dtypes numpy lacks, e.g. bfloat16
  and float8, as same-size integers), rebuilt with ``torch.from_numpy`` -- a view when the
  received memory is writable, a copy when it is read-only (see ``_rebuild_tensor``). A
  tensor on another device is refused; sparse and quantized ones use torch's own pickling.

Rejected alternative: ``persistent_id`` -- it is called for every object, strings included,
and made object columns about four times slower to pickle.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Union

import numpy as np

from ..errors import ChannelError, UnsupportedType


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


def _fortran(arr: np.ndarray) -> bool:
    """Whether ``arr`` is written (and rebuilt) in Fortran order: F- but not C-contiguous."""
    return bool(arr.flags.f_contiguous and not arr.flags.c_contiguous and arr.ndim > 1)


# -- pyarrow and polars -------------------------------------------------------------------


def _rebuild_arrow_table(buf: Any) -> Any:
    """Read an Arrow IPC stream; the table's buffers are views of ``buf``."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(buf)).read_all()


def _rebuild_arrow_batch(buf: Any) -> Any:
    """Read a one-batch Arrow IPC stream; the RecordBatch's buffers are views of ``buf``."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(buf)).read_next_batch()


def _rebuild_polars(buf: Any) -> Any:
    """A polars DataFrame over the Arrow table in ``buf`` (which columns stay views: see above)."""
    import polars as pl

    return pl.from_arrow(_rebuild_arrow_table(buf), rechunk=False)  # joining chunks would copy


class _ArrowStream:
    """An Arrow Table or RecordBatch as an IPC stream, written straight into the destination.

    Pickling a table slice would carry the whole of each buffer it slices (so every shard
    of a split table would hold the entire table); the IPC writer writes only the rows of
    the slice. Sizing runs the writer on a MockOutputStream, which copies nothing.
    """

    def __init__(self, data: Any) -> None:
        import pyarrow as pa

        self.data = data
        sink = pa.MockOutputStream()
        self._write(sink)
        self.nbytes = int(sink.size())

    def _write(self, sink: Any) -> None:
        import pyarrow as pa

        with pa.ipc.new_stream(sink, self.data.schema) as writer:
            writer.write(self.data)

    def write_into(self, dst: memoryview) -> None:
        import pyarrow as pa

        self._write(pa.FixedSizeBufferWriter(pa.py_buffer(dst)))


def compact_arrow(data: Any) -> Any:
    """A copy of an Arrow Table or RecordBatch holding its own rows only (a slice views the
    whole of its parent's buffers): written as an IPC stream and read back."""
    import pyarrow as pa

    stream = _ArrowStream(data)
    buf = bytearray(stream.nbytes)
    stream.write_into(memoryview(buf))
    return _rebuild_arrow_table(buf) if isinstance(data, pa.Table) else _rebuild_arrow_batch(buf)


#: A reducer of a foreign type: (object, slot maker) -> pickle's reduce tuple, or NotImplemented.
Slot = Callable[[Source], pickle.PickleBuffer]


def _reduce_table(table: Any, slot: Slot) -> Any:
    return _rebuild_arrow_table, (slot(_ArrowStream(table)),)


def _reduce_batch(batch: Any, slot: Slot) -> Any:
    return _rebuild_arrow_batch, (slot(_ArrowStream(batch)),)


def _reduce_polars(df: Any, slot: Slot) -> Any:
    pl = sys.modules["polars"]
    objects = [name for name, dtype in df.schema.items() if dtype == pl.Object]
    if objects:  # polars would export the PyObject pointers as 8-byte binary values
        raise UnsupportedType(
            f"a polars.DataFrame in obj must have no Object columns, got {', '.join(map(repr, objects))}; "
            "Python objects cannot leave their process this way: convert them (e.g. to String) or send a list"
        )
    level = getattr(pl, "CompatLevel", None)  # polars < 1.1 has only the oldest
    try:
        table = df.to_arrow() if level is None else df.to_arrow(compat_level=level.oldest())
    except Exception:  # noqa: BLE001 -- a dtype Arrow lacks (Int128, Object): polars pickles such frames itself
        return NotImplemented
    return _rebuild_polars, (slot(_ArrowStream(table)),)


# -- torch ----------------------------------------------------------------------------------

#: torch dtypes numpy has (same name), so torch.from_numpy takes them (not float128 or
#: complex256, which are kind "f"/"c" too); the others travel as the integer of their size.
NUMPY_TORCH = frozenset(
    "bool uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 float32 float64 complex64 complex128".split()
)
_CARRIERS = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _reduce_tensor(tensor: Any, slot: Slot) -> Any:
    torch = sys.modules["torch"]
    if tensor.device.type != "cpu":
        raise UnsupportedType(
            f"a torch.Tensor in obj must be on the CPU, got device {str(tensor.device)!r}; move it there with tensor.cpu()"
        )
    if tensor.layout is not torch.strided or tensor.is_quantized:
        return NotImplemented  # sparse or quantized: torch pickles it itself (in-band, a copy)
    name = str(tensor.dtype).removeprefix("torch.")
    data = tensor.detach().resolve_conj().resolve_neg()  # the resolves copy only if a lazy bit is set
    carrier = None
    if name not in NUMPY_TORCH:
        carrier = _CARRIERS.get(data.element_size())
        if carrier is None:
            return NotImplemented
        data = data.view(getattr(torch, carrier))  # same item size: a view, whatever the strides
    arr = data.numpy()
    return _rebuild_tensor, (slot(arr), arr.dtype, arr.shape, _fortran(arr), name if carrier else None)


def _rebuild_tensor(buf: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool, torch_dtype: str | None) -> Any:
    """A torch.Tensor over ``buf``: a view of it if ``buf`` is writable, else a copy.

    Read-only memory is shared with other receivers (``full_batch``) or is a DataSystem
    value; torch has no read-only tensors (``from_numpy`` warns), and a write through the
    tensor would change what the others read, so such a tensor gets memory of its own.
    """
    import torch

    arr = _rebuild_ndarray(buf, dtype, shape, fortran)
    if not arr.flags.writeable:
        arr = arr.copy(order="K")
    tensor = torch.from_numpy(arr)
    return tensor if torch_dtype is None else tensor.view(getattr(torch, torch_dtype))


_Reducers = dict[type, Callable[[Any, Slot], Any]]
_cache: tuple[tuple[Any, ...], _Reducers] = ((None, None, None), {})


def _reducers() -> _Reducers:
    """Reducers of the foreign types whose modules are loaded, by exact type (subclasses such
    as ``torch.nn.Parameter`` keep their class through their own pickling). Rebuilt only
    when one of those modules got loaded: building it each time cost 1 us per object."""
    global _cache
    pa, pl, torch = modules = (sys.modules.get("pyarrow"), sys.modules.get("polars"), sys.modules.get("torch"))
    if modules == _cache[0]:
        return _cache[1]
    table: _Reducers = {}
    if pa is not None:
        table[pa.Table] = _reduce_table
        table[pa.RecordBatch] = _reduce_batch
    if pl is not None:
        table[pl.DataFrame] = _reduce_polars
    if torch is not None:
        table[torch.Tensor] = _reduce_tensor
    _cache = (modules, table)
    return table


# -- the pickler ----------------------------------------------------------------------------


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=5, buffer_callback=self._take_buffer)
        self.buffers: list[Source] = []
        # id(placeholder PickleBuffer) -> (placeholder, source); the placeholder is kept
        # alive so that its id stays unique until the pickler hands it to _take_buffer.
        self._sources: dict[int, tuple[pickle.PickleBuffer, Source]] = {}
        self._reducers = _reducers()

    def _slot(self, source: Source) -> pickle.PickleBuffer:
        # A writable placeholder: a read-only one would make the loader mark the receiver's
        # view read-only (pickle's READONLY_BUFFER opcode).
        slot = pickle.PickleBuffer(bytearray())
        self._sources[id(slot)] = (slot, source)
        return slot

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and not obj.dtype.hasobject:
            return _rebuild_ndarray, (self._slot(obj), obj.dtype, obj.shape, _fortran(obj))
        reduce = self._reducers.get(type(obj))
        return NotImplemented if reduce is None else reduce(obj, self._slot)

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
    dtype = obj.dtype.str.encode()
    return _RAW_HEAD.pack(_RAW, _fortran(obj), obj.ndim, len(dtype)) + dtype + struct.pack(f"<{obj.ndim}q", *obj.shape)


def _raw_array(header: Any, buffer: Any) -> np.ndarray:
    _, fortran, ndim, dtype_len = _RAW_HEAD.unpack_from(header)
    start = _RAW_HEAD.size
    dtype = np.dtype(bytes(header[start : start + dtype_len]).decode())
    shape = struct.unpack_from(f"<{ndim}q", header, start + dtype_len)
    return _rebuild_ndarray(buffer, dtype, shape, bool(fortran))


def serialize(obj: Any) -> Serialized:
    """Serialize ``obj``; array data stays in the source objects (no copy is made here).

    Raises:
        UnsupportedType (a TypeError): ``obj``, or something inside it, cannot be pickled, or
            holds a torch.Tensor that is not on the CPU.
    """
    if type(obj) is np.ndarray and obj.dtype.kind in _RAW_KINDS and obj.dtype.metadata is None and obj.ndim < 256:
        return Serialized(_raw_header(obj), [obj])
    stream = io.BytesIO()
    pickler = _Pickler(stream)
    try:
        pickler.dump(obj)
    except (ChannelError, MemoryError):
        raise  # ours already names the cause (a tensor off the CPU); memory is not a type problem
    except Exception as exc:  # a __reduce__ may raise anything: polars raises ComputeError
        raise UnsupportedType(f"obj cannot be serialized: {exc}") from exc
    return Serialized(stream.getvalue(), pickler.buffers)


def deserialize(header: Any, buffers: Iterable[Any]) -> Any:
    """Rebuild an object from its header and buffer views; arrays are views of ``buffers``."""
    if header[:4] == _RAW:
        (buffer,) = buffers
        return _raw_array(header, buffer)
    return pickle.loads(header, buffers=buffers)
