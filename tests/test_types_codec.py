"""More types in the codec, in one process (issue 6, item 2): torch tensors of every dtype
and layout, dicts of columns, RecordBatch and polars slices, polars dtypes and which polars
columns stay views. The channel tests are in test_types.py.

Without the torch extra only the tests and cases that build tensors are skipped (issue 12).
"""

from __future__ import annotations

import datetime as dt
import pickle
import warnings
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import polars.testing
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from shmchannel.serialization import deserialize, row_count, serialize, split
from shmchannel.store.blob import plan_blob, read_blob, write_blob

from .test_types import _bits, _difference, needs_torch, torch


def _round_trip(obj: Any, read_only: bool = False) -> tuple[Any, bytearray]:
    """``obj`` through serialize, a blob in a fresh buffer (read-only view if asked), deserialize."""
    s = serialize(obj)
    plan = plan_blob(len(s.header), [int(b.nbytes) for b in s.buffers])
    buf = bytearray(b"\xa5" * plan.size)  # reused shared memory is not zeroed
    write_blob(memoryview(buf), plan, s.header, s.buffers)
    view = memoryview(buf)
    return deserialize(*read_blob(view.toreadonly() if read_only else view)), buf


def _in(buf: bytearray, address: int, nbytes: int) -> bool:
    start = np.frombuffer(buf, np.uint8).__array_interface__["data"][0]
    return start <= address and address + nbytes <= start + len(buf)


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples, derandomize=True, database=None, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _torch_dtypes() -> list[Any]:
    """Every dtype a dense CPU tensor can have in this torch (quantized ones excluded)."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ComplexHalf is "experimental"
        for value in {v for v in vars(torch).values() if isinstance(v, torch.dtype)}:
            if not str(value).startswith(("torch.qint", "torch.quint")):
                try:
                    torch.zeros(1, dtype=value)
                except (RuntimeError, NotImplementedError, TypeError):
                    continue
                found.append(value)
    return sorted(found, key=str)


TORCH_DTYPES = _torch_dtypes() if torch is not None else []


@st.composite
def _tensors(draw: Any) -> Any:
    """A tensor of any dtype (random bits), 0-d to 3-d, contiguous, transposed, strided or offset."""
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    numel = int(np.prod(shape)) if shape else 1
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = bytearray(draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize)))
    tensor = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "offset"]))
    if layout == "transposed" and tensor.ndim >= 2:
        tensor = tensor.transpose(0, tensor.ndim - 1)
    elif layout == "strided" and tensor.ndim >= 1:
        tensor = tensor[::2]
    elif layout == "offset" and tensor.ndim >= 1:
        tensor = tensor[1:]
    return tensor


@needs_torch
@_settings(300)
@given(_tensors(), st.booleans())
def test_tensor_of_any_dtype_and_layout_round_trips_bit_for_bit(tensor: Any, read_only: bool) -> None:
    """A tensor of any dtype (bfloat16, float8... as integers of their size) and layout comes
    back with its dtype, shape and bits; a view of the buffer when it is writable, a writable
    copy (and no warning) when it is read-only."""
    note(f"{tensor.dtype} shape={tuple(tensor.shape)} stride={tensor.stride()} read_only={read_only}")
    got, buf = _round_trip(tensor, read_only)
    assert type(got) is torch.Tensor and got.dtype == tensor.dtype and got.shape == tensor.shape
    assert _bits(got) == _bits(tensor)
    nbytes = got.numel() * got.element_size()
    if nbytes:
        assert _in(buf, got.data_ptr(), nbytes) is not read_only


#: Kinds of column a dict may hold; without torch no tensor column is drawn (issue 12).
_COLUMN_KINDS = [
    kind
    for kind in ["int64", "float32-2d", "list-str", "tensor-bf16", "series-float", "series-str"]
    if torch is not None or not kind.startswith("tensor")
]


def _column(kind: str, rows: int, seed: int) -> Any:
    values = np.arange(seed, seed + rows)
    if kind == "int64":
        return values.astype(np.int64)
    if kind == "float32-2d":
        return np.stack([values, -values], axis=1).astype(np.float32)
    if kind == "list-str":
        return [f"v{v}" for v in values]
    if kind == "tensor-bf16":
        return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16).reshape(rows, 1)
    if kind == "series-float":
        return pd.Series(values * 0.5)
    return pd.Series([f"s{v}" for v in values])


def _slice(column: Any, start: int, stop: int) -> Any:
    return column.iloc[start:stop] if isinstance(column, pd.Series) else column[start:stop]


@_settings(150)
@given(
    st.lists(st.sampled_from(_COLUMN_KINDS), min_size=1, max_size=5),
    st.integers(1, 4),
    st.integers(1, 5),
    st.booleans(),
)
def test_dict_of_columns_splits_into_blocks_that_round_trip(kinds: list[str], n: int, per_block: int, read_only: bool) -> None:
    """A dict of equal-length columns of any kind splits into n dicts of the same keys holding
    each column's rows of that block, and every block round-trips through the blob."""
    rows = n * per_block
    obj = {f"c{j}": _column(kind, rows, 10 * j) for j, kind in enumerate(kinds)}
    assert row_count(obj) == rows
    blocks = split(obj, n)
    assert len(blocks) == n
    for b, block in enumerate(blocks):
        expected = {key: _slice(col, b * per_block, (b + 1) * per_block) for key, col in obj.items()}
        assert row_count(block) == per_block
        assert _difference(block, expected) == ""
        got, _ = _round_trip(block, read_only)
        assert _difference(got, expected) == ""


def test_record_batch_slice_carries_only_its_rows() -> None:
    """A shard of a RecordBatch encodes its own rows, not the whole batch's buffers (as pickle would)."""
    batch = pa.RecordBatch.from_pydict({"a": np.arange(400_000), "s": [str(i) for i in range(400_000)]})
    whole = serialize(batch).nbytes
    part = serialize(batch.slice(0, 1000)).nbytes
    assert part < whole / 100, (part, whole)
    got, buf = _round_trip(batch.slice(200_000, 1000))
    assert type(got) is pa.RecordBatch and got.equals(batch.slice(200_000, 1000))
    assert all(_in(buf, b.address, b.size) for b in got.column("a").buffers() if b is not None)


def test_polars_slice_carries_only_its_rows() -> None:
    """A shard of a polars DataFrame encodes about its share of the frame, strings included."""
    df = pl.DataFrame({"a": np.arange(400_000), "s": ["x" * 20 + str(i) for i in range(400_000)]})
    whole = serialize(df).nbytes
    quarter = serialize(df.slice(100_000, 100_000)).nbytes
    assert quarter < whole * 0.3, (quarter, whole)


def _polars_frame() -> Any:
    n = 64
    return pl.DataFrame({
        "i8": pl.Series(np.arange(n, dtype=np.int8)), "u64": pl.Series(np.arange(n, dtype=np.uint64)),
        "f32": pl.Series(np.arange(n, dtype=np.float32)), "f64": np.arange(n) * 0.5,
        "bool": [True, False] * (n // 2), "date": [dt.date(2024, 1, 1)] * n,
        "datetime_tz": pl.Series([dt.datetime(2024, 1, 1)] * n).dt.replace_time_zone("Europe/Paris"),
        "duration": [dt.timedelta(seconds=i) for i in range(n)], "time": [dt.time(1, 2, 3)] * n,
        "list": [[1, 2]] * n, "array": pl.Series([[1, 2]] * n, dtype=pl.Array(pl.Int32, 2)),
        "struct_int": [{"a": i} for i in range(n)], "int_nulls": [1, None] * (n // 2),
        "string": [str(i) for i in range(n)], "binary": [b"x"] * n,
        "decimal": pl.Series([Decimal("1.5")] * n, dtype=pl.Decimal(10, 2)),
        "categorical": pl.Series(["a", "b"] * (n // 2), dtype=pl.Categorical),
        "enum": pl.Series(["a", "b"] * (n // 2), dtype=pl.Enum(["a", "b", "c"])), "null": [None] * n,
    })


#: polars columns that come back as views of the received buffer (measured with polars 2.1).
POLARS_VIEWS = ["i8", "u64", "f32", "f64", "bool", "date", "datetime_tz", "duration", "time", "list", "array", "struct_int", "int_nulls"]


def _polars_keeps_enum_through_arrow() -> bool:
    """Whether this polars exports an Enum to Arrow so that it comes back an Enum (1.18 on;
    before, a plain dictionary column: Categorical on arrival, whatever the channel does)."""
    df = pl.DataFrame({"e": pl.Series(["a"], dtype=pl.Enum(["a", "b"]))})
    level = getattr(pl, "CompatLevel", None)
    table = df.to_arrow() if level is None else df.to_arrow(compat_level=level.oldest())
    return bool(pl.from_arrow(table).schema["e"] == df.schema["e"])


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_polars_dtypes_round_trip_and_numeric_columns_are_views(read_only: bool) -> None:
    """A polars DataFrame of every common dtype comes back equal, schema included (an Enum as
    this polars's own Arrow export brings it back); its numeric, boolean, temporal, list,
    array and struct columns are views of the buffer."""
    df = _polars_frame()
    got, buf = _round_trip(df, read_only)
    expected = df if _polars_keeps_enum_through_arrow() else df.with_columns(pl.col("enum").cast(pl.Categorical))
    polars.testing.assert_frame_equal(got, expected)
    copied = [c for c in POLARS_VIEWS if not all(_in(buf, b.address, b.size) for b in got[c].to_arrow().buffers() if b is not None)]
    assert copied == []


def test_polars_dtype_arrow_lacks_round_trips_through_polars_pickle() -> None:
    """An Int128 column (no Arrow type) falls back to polars' own pickling and still arrives equal."""
    if not hasattr(pl, "Int128"):
        pytest.skip(f"polars {pl.__version__} has no Int128")
    df = pl.DataFrame({"big": pl.Series([2**100, -5], dtype=pl.Int128)})
    try:
        pickle.loads(pickle.dumps(df))
    except Exception as exc:  # noqa: BLE001 -- polars' own error, whatever its type
        pytest.skip(f"polars {pl.__version__} cannot pickle an Int128 frame itself: {exc}")
    got, _ = _round_trip(df)
    polars.testing.assert_frame_equal(got, df)


@pytest.mark.parametrize(
    "kind", [pytest.param("tensor", marks=needs_torch), "table", "record_batch", pytest.param("dict", marks=needs_torch), "ndarray"]
)
def test_blocks_of_a_split_object_serialize_only_their_rows(kind: str) -> None:
    """A block of a split tensor, Arrow table or array (which views all of its parent's
    memory) serializes to about 1/4 of the whole, with the same values: what both backends
    carry per shard."""
    n = 400_000
    whole: Any = {  # factories: build only the object of this case
        "tensor": lambda: torch.arange(n),
        "table": lambda: pa.table({"a": np.arange(n), "s": [str(i) for i in range(n)]}),
        "record_batch": lambda: pa.RecordBatch.from_pydict({"a": np.arange(n)}),
        "dict": lambda: {"t": torch.arange(n), "x": np.arange(n)},
        "ndarray": lambda: np.arange(2 * n).reshape(n, 2),
    }[kind]()
    full = serialize(whole).nbytes
    for i, block in enumerate(split(whole, 4)):
        assert serialize(block).nbytes < full * 0.3, f"block {i} still carries its parent"
        got, _ = _round_trip(block)
        assert _difference(got, block) == ""
