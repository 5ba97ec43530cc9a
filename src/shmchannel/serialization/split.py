"""Row-wise splitting of the objects a channel can shard.

``split(obj, n)`` returns ``n`` contiguous row blocks of equal length: block ``i`` holds
rows ``[i*k, (i+1)*k)`` with ``k = len(obj) // n``. Blocks are views where the type allows
(ndarray, pandas, Arrow), so splitting copies nothing; the codec copies each block once into
shared memory. pandas and pyarrow are looked up in ``sys.modules`` rather than imported: an
object can only be a DataFrame if pandas is already loaded.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ..errors import UnsupportedType

SUPPORTED = "numpy.ndarray, list, pandas.DataFrame, pandas.Series or pyarrow.Table"


def _kind(obj: Any) -> str | None:
    if isinstance(obj, np.ndarray):
        return "ndarray"
    if isinstance(obj, list):
        return "list"
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(obj, (pd.DataFrame, pd.Series)):
        return "pandas"
    pa = sys.modules.get("pyarrow")
    if pa is not None and isinstance(obj, pa.Table):
        return "arrow"
    return None


def row_count(obj: Any) -> int:
    """Number of rows of ``obj``.

    Raises:
        UnsupportedType: ``obj`` is not one of the supported types, or a 0-d array.
    """
    kind = _kind(obj)
    if kind is None:
        raise UnsupportedType(f"obj must be a {SUPPORTED}, got {type(obj).__module__}.{type(obj).__qualname__}")
    if kind == "ndarray" and obj.ndim == 0:
        raise UnsupportedType("obj must be an array with at least one dimension, got a 0-d numpy.ndarray")
    if kind == "arrow":
        return int(obj.num_rows)
    return len(obj)


def split(obj: Any, n: int) -> list[Any]:
    """Split ``obj`` into ``n`` contiguous row blocks of ``len(obj) // n`` rows each."""
    if n == 1:
        return [obj]
    kind = _kind(obj)
    step = row_count(obj) // n
    if kind == "arrow":
        return [obj.slice(i * step, step) for i in range(n)]
    if kind == "pandas":
        return [obj.iloc[i * step : (i + 1) * step] for i in range(n)]
    return [obj[i * step : (i + 1) * step] for i in range(n)]
