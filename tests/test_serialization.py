"""The codec and the splitter, in one process (no broker)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from shmchannel.errors import UnsupportedType
from shmchannel.serialization import deserialize, row_count, serialize, split
from shmchannel.store.blob import plan_blob, read_blob, write_blob


def _round_trip(obj: object) -> object:
    s = serialize(obj)
    plan = plan_blob(len(s.header), [int(b.nbytes) for b in s.buffers])
    blob = bytearray(plan.size)
    write_blob(memoryview(blob), plan, s.header, s.buffers)
    header, buffers = read_blob(memoryview(blob))
    return deserialize(header, buffers)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.int16).reshape(3, 4),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.arange(24.0).reshape(4, 6)[:, ::2],
        np.array([True, False]),
        np.array(["2026-01-01", "NaT"], dtype="datetime64[ns]"),
        np.array([1 + 2j]),
        np.zeros(0, dtype=np.float32),
        np.zeros((3, 0)),
        np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", ">f8")]),
        np.array(["x", None], dtype=object),
    ],
    ids=["int16", "fortran", "strided", "bool", "datetime", "complex", "empty", "empty-2d", "structured", "object"],
)
def test_array_round_trips_exactly(array: np.ndarray) -> None:
    """Every kind of array comes back with equal values, dtype and shape."""
    got = _round_trip(array)
    assert isinstance(got, np.ndarray)
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def test_array_data_goes_out_of_band() -> None:
    """Array data is a buffer of its own, not part of the pickle header."""
    s = serialize(np.ones(100_000))
    assert len(s.header) < 512
    assert [b.nbytes for b in s.buffers] == [800_000]


def test_strided_slice_of_pandas_block_is_one_buffer_not_pickled() -> None:
    """A row slice of a DataFrame keeps its numeric data out of the header (one copy later)."""
    df = pd.DataFrame({"a": np.arange(100_000.0), "b": np.arange(100_000.0)})
    s = serialize(df.iloc[50_000:])
    assert len(s.header) < 4096
    assert sum(b.nbytes for b in s.buffers) >= 800_000


def test_received_array_views_the_buffer() -> None:
    """The rebuilt array is a view of the buffer it was given, not a copy."""
    s = serialize(np.arange(10.0))
    plan = plan_blob(len(s.header), [b.nbytes for b in s.buffers])
    blob = bytearray(plan.size)
    write_blob(memoryview(blob), plan, s.header, s.buffers)
    header, buffers = read_blob(memoryview(blob))
    got = deserialize(header, buffers)
    got[0] = 42.0
    header, buffers = read_blob(memoryview(blob))
    assert deserialize(header, buffers)[0] == 42.0


def test_dataframe_with_rich_dtypes_round_trips() -> None:
    """Strings, categoricals, tz-aware datetimes, nullable ints and a custom index survive."""
    df = pd.DataFrame(
        {
            "s": ["a", "bb", None, "dddd"],
            "c": pd.Categorical(["x", "y", "x", "z"]),
            "t": pd.date_range("2026-01-01", periods=4, freq="h", tz="Europe/Paris"),
            "n": pd.array([1, None, 3, 4], dtype="Int64"),
            "f": [0.5, 1.5, np.nan, 3.5],
        },
        index=pd.Index(["w", "x", "y", "z"], name="key"),
    )
    pd.testing.assert_frame_equal(_round_trip(df), df)


def test_arrow_table_round_trips() -> None:
    """An Arrow table with nested and string columns comes back equal."""
    table = pa.table({"x": [1, 2, 3], "s": ["a", "b", None], "l": [[1], [], [2, 3]]})
    assert _round_trip(table).equals(table)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_split_gives_equal_contiguous_blocks(n: int) -> None:
    """split(obj, n) returns n row blocks of len/n rows, in order, for every type."""
    arr = np.arange(16).reshape(8, 2)
    df = pd.DataFrame({"a": range(8)})
    table = pa.table({"a": list(range(8))})
    for obj, rows in ((arr, lambda p: p[:, 0].tolist()), (list(range(8)), list), (df, lambda p: p["a"].tolist()),
                      (df["a"], lambda p: p.tolist()), (table, lambda p: p.column("a").to_pylist())):
        blocks = split(obj, n)
        assert len(blocks) == n
        assert sum((rows(b) for b in blocks), []) == (rows(obj) if not isinstance(obj, np.ndarray) else arr[:, 0].tolist())
        assert all(row_count(b) == 8 // n for b in blocks)


def test_row_count_refuses_unsupported_types() -> None:
    """row_count names the splittable types when given another, and how other objects travel."""
    with pytest.raises(
        UnsupportedType,
        match=r"^obj must be a numpy\.ndarray, list, pandas\.DataFrame, pandas\.Series, pyarrow\.Table, "
        r"pyarrow\.RecordBatch, polars\.DataFrame, torch\.Tensor or dict of equal-length columns to be split into "
        r"shards, got builtins\.set; other objects need num_shards=1 or full_batch=True$",
    ):
        row_count({1, 2})


def test_row_count_refuses_dict_of_scalars() -> None:
    """row_count of a dict holding a scalar names the key and the column types."""
    with pytest.raises(
        UnsupportedType,
        match=r"^obj\['a'\] must be a column \(numpy\.ndarray, list, torch\.Tensor or pandas\.Series\) to split a "
        r"dict into shards, got builtins\.int; other objects need num_shards=1 or full_batch=True$",
    ):
        row_count({"a": 1})


def test_arrow_slice_carries_only_its_rows() -> None:
    """A shard of an Arrow table encodes its own rows, not the whole table's buffers."""
    table = pa.table({"a": np.arange(400_000), "s": [str(i) for i in range(400_000)]})
    whole = serialize(table).nbytes
    quarter = serialize(split(table, 4)[1])
    assert quarter.nbytes < whole / 3
    assert _round_trip(split(table, 4)[1]).equals(table.slice(100_000, 100_000))
