"""numpy arrays as out-of-band slots, and what the other layouts share: the source and
slot types, the 64-byte boundary, rebuilding an array as a view of a received buffer.

ndarray subclasses keep zero-copy (issue 11): numpy pickles any subclass in-band (its data
inside the pickle stream, a private copy on arrival); here a subclass that keeps ndarray's
pickling is rebuilt with ``view(cls)`` over its slot, a memmap as a plain ndarray, and a
MaskedArray with its data and mask both slots (see the table in codec.py).
"""

from __future__ import annotations

import math
import pickle
from typing import Any, Callable, Literal, Protocol, Union

import numpy as np


class Writer(Protocol):
    """A source that writes itself into shared memory (e.g. an Arrow IPC stream)."""

    nbytes: int

    def write_into(self, dst: memoryview) -> None: ...


#: A source for the blob writer: a contiguous byte view, an array copied with np.copyto, or
#: a Writer.
Source = Union[memoryview, np.ndarray, Writer]


#: A reducer: (object, slot maker) -> pickle's reduce tuple, or NotImplemented.
Slot = Callable[[Source], pickle.PickleBuffer]


#: The boundary every buffer handed out starts on: where the blob layout puts each buffer
#: (store/), the Arrow buffers' offset in their stream, and the start of the copies made
#: here (numpy's own allocations start on 16 bytes).
ALIGNMENT = 64


def aligned_empty(nbytes: int) -> np.ndarray:
    """``nbytes`` uint8 of new memory starting on ALIGNMENT (numpy's own start on 16)."""
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes]


def aligned_copy(src: bytes | bytearray | memoryview) -> memoryview:
    """A writable copy of the bytes ``src`` that starts on ALIGNMENT: a blob read from a
    socket, or a private copy of one, is put there, so that its buffers (at 64-byte
    offsets) are as aligned as in the arena. A bytearray starts where malloc puts it (16
    bytes), and a float64 array at an odd offset of it is misaligned (issue 11)."""
    out = memoryview(aligned_empty(len(src)))  # type: ignore[arg-type]  # numpy exports a buffer
    out[:] = src if not isinstance(src, memoryview) or src.format == "B" else src.cast("B")
    return out


def aligned_array(arr: np.ndarray) -> np.ndarray:
    """A copy of C- or F-contiguous ``arr`` (same order) whose data starts on ALIGNMENT."""
    order: Literal["C", "F"] = "F" if fortran(arr) else "C"
    copy = aligned_empty(arr.nbytes).view(arr.dtype).reshape(arr.shape, order=order)
    np.copyto(copy, arr, casting="no")
    return copy


def rebuild_ndarray(buf: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    """Rebuild an array as a view of ``buf`` (the receiver's shared-memory slot)."""
    count = math.prod(shape)
    if count == 0 or dtype.itemsize == 0:
        return np.empty(shape, dtype, order="F" if fortran else "C")
    flat = np.frombuffer(buf, dtype=dtype, count=count)
    return flat.reshape(shape, order="F" if fortran else "C")


def fortran(arr: np.ndarray) -> bool:
    """Whether ``arr`` is written (and rebuilt) in Fortran order: F- but not C-contiguous."""
    return bool(arr.flags.f_contiguous and not arr.flags.c_contiguous and arr.ndim > 1)


def _array_args(arr: np.ndarray, slot: Slot) -> tuple[Any, ...]:
    """``rebuild_ndarray``'s arguments for the data of ``arr`` (of any ndarray class)."""
    plain = np.ndarray.view(arr, np.ndarray)  # the class's own view() may be overridden
    return slot(plain), plain.dtype, plain.shape, fortran(plain)


def _rebuild_subclass(cls: type, buf: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> Any:
    """An ndarray subclass over ``buf``: ``view(cls)`` runs its ``__array_finalize__``."""
    return rebuild_ndarray(buf, dtype, shape, fortran).view(cls)


_NDARRAY_PICKLING = (np.ndarray.__reduce__, np.ndarray.__reduce_ex__, np.ndarray.__setstate__)


def reduce_ndarray_subclass(arr: np.ndarray, slot: Slot) -> Any:
    cls = type(arr)
    own = (cls.__reduce__, cls.__reduce_ex__, cls.__setstate__)
    if arr.dtype.hasobject or any(a is not b for a, b in zip(own, _NDARRAY_PICKLING)):
        return NotImplemented  # its own pickling (in-band): it may carry more than the data
    if issubclass(cls, np.memmap):  # pickle would make a memmap with no file behind it
        return rebuild_ndarray, _array_args(arr, slot)
    return _rebuild_subclass, (cls, *_array_args(arr, slot))


def reduce_masked(arr: Any, slot: Slot) -> Any:
    if arr.dtype.hasobject:
        return NotImplemented
    mask = arr._mask  # the attributes numpy's own MaskedArray.__getstate__ reads
    base = np.ndarray if issubclass(arr._baseclass, np.memmap) else arr._baseclass
    mask = None if mask is np.ma.nomask else np.ndarray.view(mask, np.ndarray)  # the ndarrays go out-of-band
    return _rebuild_masked, (np.ndarray.view(arr, np.ndarray), mask, arr._fill_value, bool(arr._hardmask), base)


def _rebuild_masked(data: np.ndarray, mask: np.ndarray | None, fill_value: Any, hard: bool, base: type) -> Any:
    """A MaskedArray over ``data`` and ``mask`` (None: nomask), both views; shrink=False keeps
    an all-False mask an array."""
    ma = np.ma
    data = data if base is np.ndarray else data.view(base)
    mask_or_nomask: Any = ma.nomask if mask is None else mask
    return ma.MaskedArray(data, mask=mask_or_nomask, fill_value=fill_value, hard_mask=hard, copy=False, shrink=False)
