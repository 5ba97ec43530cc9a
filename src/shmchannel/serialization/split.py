"""Row-wise splitting of the objects a channel can shard.

``split(obj, n)`` returns ``n`` contiguous row blocks of equal length: block ``i`` holds
rows ``[i*k, (i+1)*k)`` with ``k = row_count(obj) // n``. Blocks are views where the type
allows (ndarray, pandas, Arrow, polars, torch), so splitting copies nothing; the codec
copies each block once into shared memory. A dict of equal-length columns (a columnar
batch) is split column by column. pandas, pyarrow, polars and torch are looked up in
``sys.modules`` rather than imported: an object can only be a DataFrame if pandas is
already loaded, and importing torch to find out would cost a second.

Subclasses split like their base: a block of an ``np.memmap``, ``np.recarray`` or
``np.ma.MaskedArray`` (its mask rows with it) is a view of the same class. Only dense
(strided) tensors split; nested, sparse and quantized ones are refused with their kind
(they have no row views), and so is anything whose shape cannot be read: whatever a tensor
subclass's ``__torch_function__`` or a slice raises becomes UnsupportedType here.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ..errors import ChannelError, InvalidArgument, UnsupportedType
from .tensors import check_device

SUPPORTED = (
    "numpy.ndarray, list, pandas.DataFrame, pandas.Series, pyarrow.Table, pyarrow.RecordBatch, "
    "polars.DataFrame, torch.Tensor or dict of equal-length columns"
)
#: What a dict must hold in every value to be split.
COLUMNS = "numpy.ndarray, list, torch.Tensor or pandas.Series"
_OTHERS = "other objects need num_shards=1 or full_batch=True"


def _kind(obj: Any) -> str | None:
    if isinstance(obj, np.ndarray):
        return "ndarray"
    if isinstance(obj, list):
        return "list"
    if isinstance(obj, dict):
        return "dict"
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(obj, (pd.DataFrame, pd.Series)):
        return "pandas"
    pa = sys.modules.get("pyarrow")
    if pa is not None and isinstance(obj, (pa.Table, pa.RecordBatch)):
        return "arrow"
    pl = sys.modules.get("polars")
    if pl is not None and isinstance(obj, pl.DataFrame):
        return "polars"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return "tensor"
    return None


def _name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _rows(obj: Any, kind: str, param: str) -> int:
    """Rows of a non-dict ``obj`` of ``kind``; ``param`` names it in errors."""
    if kind == "tensor":
        return _tensor_rows(obj, param)
    if kind == "ndarray":
        if obj.ndim == 0:
            raise UnsupportedType(f"{param} must have at least one dimension to be split into shards, got a 0-d numpy.ndarray; {_OTHERS}")
        return int(obj.shape[0])
    if kind == "arrow":
        return int(obj.num_rows)
    if kind == "polars":
        return int(obj.height)
    return len(obj)


def _tensor_rows(tensor: Any, param: str) -> int:
    """Rows of a dense tensor; UnsupportedType naming the kind of any other (a nested tensor
    reports layout strided but has no sizes: torch raises asking for a bug report)."""
    torch = sys.modules["torch"]
    try:
        check_device(tensor)  # before slicing it, which torch may refuse for its device
        ndim, layout, nested, quantized = tensor.ndim, tensor.layout, tensor.is_nested, tensor.is_quantized
        rows = int(tensor.shape[0]) if ndim and layout is torch.strided and not nested and not quantized else 0
    except UnsupportedType:
        raise
    except Exception as exc:  # noqa: BLE001 -- a subclass's __torch_function__ may raise anything
        raise UnsupportedType(
            f"{param} must be a torch.Tensor whose shape can be read to be split into shards, "
            f"got a {_name(tensor)} raising {type(exc).__name__}: {exc}; {_OTHERS}"
        ) from exc
    if ndim == 0:
        raise UnsupportedType(f"{param} must have at least one dimension to be split into shards, got a 0-d torch.Tensor; {_OTHERS}")
    dense = f"{param} must be a strided (dense) torch.Tensor to be split into shards"
    if layout is not torch.strided:
        raise UnsupportedType(f"{dense}, got layout {layout}; {_OTHERS}")
    if nested:
        raise UnsupportedType(f"{dense}, got a nested {_name(tensor)} (its rows differ in shape); {_OTHERS}")
    if quantized:
        raise UnsupportedType(f"{dense}, got a quantized {_name(tensor)} ({tensor.dtype}); {_OTHERS}")
    return rows


def _dict_rows(obj: dict[Any, Any]) -> int:
    if not obj:
        raise UnsupportedType(f"obj must be a dict with at least one column to be split into shards, got an empty dict; {_OTHERS}")
    lengths = {}
    for key, value in obj.items():
        kind = _kind(value)
        is_series = kind == "pandas" and isinstance(value, sys.modules["pandas"].Series)
        if kind not in ("ndarray", "list", "tensor") and not is_series:
            raise UnsupportedType(
                f"obj[{key!r}] must be a column ({COLUMNS}) to split a dict into shards, got {_name(value)}; {_OTHERS}"
            )
        lengths[key] = _rows(value, str(kind), f"obj[{key!r}]")
    if len(set(lengths.values())) > 1:
        got = ", ".join(f"{key!r}: {n}" for key, n in lengths.items())
        raise InvalidArgument(f"the columns of obj must have equal lengths, got {got}")
    return next(iter(lengths.values()))


def row_count(obj: Any) -> int:
    """Number of rows of ``obj`` (of each column, for a dict).

    Raises:
        UnsupportedType: ``obj`` is of no type ``split`` takes, a 0-d array or tensor, or a
            dict that is empty or holds a value that is not a column.
        InvalidArgument: ``obj`` is a dict whose columns differ in length.
    """
    kind = _kind(obj)
    if kind is None:
        raise UnsupportedType(f"obj must be a {SUPPORTED} to be split into shards, got {_name(obj)}; {_OTHERS}")
    if kind == "dict":
        return _dict_rows(obj)
    return _rows(obj, kind, "obj")


def splittable(obj: Any) -> bool:
    """Whether ``split`` can cut ``obj`` into row blocks (exactly when ``row_count`` does not raise)."""
    try:
        row_count(obj)
    except (UnsupportedType, InvalidArgument):
        return False
    return True


def _block(obj: Any, kind: str | None, start: int, length: int) -> Any:
    if kind in ("arrow", "polars"):
        return obj.slice(start, length)
    if kind == "pandas":
        return obj.iloc[start : start + length]
    if kind == "dict":
        return {key: _block(value, _kind(value), start, length) for key, value in obj.items()}
    return obj[start : start + length]  # ndarray, list, tensor: a view along the first axis


def split(obj: Any, n: int) -> list[Any]:
    """Split ``obj`` into ``n`` contiguous row blocks of ``row_count(obj) // n`` rows each."""
    if n == 1:
        return [obj]
    kind = _kind(obj)
    step = row_count(obj) // n
    try:
        return [_block(obj, kind, i * step, step) for i in range(n)]
    except ChannelError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a subclass's __getitem__ may raise anything
        raise UnsupportedType(f"obj cannot be split into row blocks: a {_name(obj)} raised {type(exc).__name__}: {exc}") from exc
