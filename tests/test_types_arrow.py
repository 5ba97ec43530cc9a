"""Every buffer of a received Arrow table, record batch or polars frame starts on a 64-byte
boundary (issue 11, item 2, the codec's part): the codec moves each IPC body buffer to a
64-byte offset of its stream, and the stream starts on one, as the store's blobs do.
Needs no torch (the version matrix runs it without)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

from shmchannel.serialization import arrays, arrow
from shmchannel.store import allocator

from .test_types_codec import _in
from .test_types_subclasses import _round_trip

pa = pytest.importorskip("pyarrow", reason="the arrow extra is not installed")
pl = pytest.importorskip("polars", reason="the polars extra is not installed")


def test_codec_alignment_is_the_blob_alignment() -> None:
    """The codec aligns Arrow buffers and its copies to the boundary the store aligns blob buffers to."""
    assert arrays.ALIGNMENT == allocator.ALIGNMENT == 64


def _arrow_table(n: int) -> Any:
    """Columns of every buffer layout: fixed width, validity bitmaps, offsets, views, children, dictionaries."""
    return pa.table({
        "int8": pa.array(np.arange(n, dtype=np.int8)),
        "float64": np.arange(n) * 0.5,
        "bool": [i % 3 == 0 for i in range(n)],
        "nulls": pa.array([None if i % 3 else i for i in range(n)]),
        "string": [f"s{i}" for i in range(n)],
        "large_string": pa.array([f"l{i}" for i in range(n)], pa.large_string()),
        "list": pa.array([[f"x{i}"] * (i % 3) for i in range(n)]),
        "fixed_list": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int32(), 2)),
        "struct": [{"a": i, "b": str(i)} for i in range(n)],
        "dictionary": pa.array(["red", "green", None] * (n // 3) + ["red"] * (n % 3)).dictionary_encode(),
        "decimal": pa.array([i for i in range(n)], pa.decimal128(12, 2)),
        "all_null": pa.nulls(n),
        **({"string_view": pa.array([f"view-{i:020d}" for i in range(n)], pa.string_view())}
           if hasattr(pa, "string_view") else {}),  # pyarrow 16 on
    })


def _arrow_buffers(array: Any) -> list[Any]:
    """The non-empty buffers of ``array``, its children's and its dictionary's."""
    found = [b for b in array.buffers() if b is not None and b.size]
    if pa.types.is_dictionary(array.type):
        found += _arrow_buffers(array.dictionary)
    return found


def _arrow_object(case: str) -> Any:
    table = _arrow_table(999)
    return {
        "table": table,
        "table-chunked": pa.concat_tables([table.slice(0, 300), _arrow_table(50)]),  # two dictionaries: a replacement
        "table-slice": table.slice(101, 500),
        "record-batch": table.combine_chunks().to_batches()[0],
        "record-batch-slice": table.combine_chunks().to_batches()[0].slice(3, 77),
        "polars-slice": pl.from_arrow(table.select(["int8", "float64", "bool", "nulls", "fixed_list", "decimal"])).slice(7, 500),
    }[case]


@pytest.mark.parametrize("case", ["table", "table-chunked", "table-slice", "record-batch", "record-batch-slice", "polars-slice"])
def test_arrow_buffers_arrive_on_64_byte_boundaries(case: str) -> None:
    """Every buffer of a received Arrow table, record batch or polars frame (sliced or chunked or
    not; ints, floats, strings, string views, lists, structs, dictionaries, decimals, validity
    bitmaps) starts on a 64-byte boundary and views the buffer, which starts on one; values are equal."""
    obj = _arrow_object(case)
    got, buf = _round_trip(obj)
    assert got.equals(obj)
    table = got.to_arrow() if isinstance(got, pl.DataFrame) else got
    columns = {name: table.column(name) for name in table.schema.names}
    chunks = {name: column.chunks if isinstance(column, pa.ChunkedArray) else [column] for name, column in columns.items()}
    placed = {name: [(b.address % 64, _in(buf, b.address, b.size)) for c in cs for b in _arrow_buffers(c)] for name, cs in chunks.items()}
    assert {name: [p for p in places if p != (0, True)] for name, places in placed.items()} == {name: [] for name in placed}


def test_arrow_stream_laid_out_unexpectedly_is_kept_as_written() -> None:
    """A stream the realigning does not know (here a real one with an LZ4-compressed body) is
    written as the writer wrote it, and reads back equal."""
    table = _arrow_table(99).slice(5, 50)
    recorder = arrow.Recorder()
    options = pa.ipc.IpcWriteOptions(compression="lz4")
    with pa.ipc.new_stream(recorder, table.schema, options=options) as writer:
        writer.write(table)
    parts, size = arrow.layout(recorder.pieces)
    assert [start for start, _ in parts] == list(itertools.accumulate([len(p) for p in recorder.pieces][:-1], initial=0))
    buf = bytearray(size)
    for start, part in parts:
        buf[start : start + len(part)] = memoryview(part).cast("B")
    assert arrow.rebuild_arrow_table(buf).equals(table)
