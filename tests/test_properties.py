"""Property-based tests (hypothesis) of the codec, the blob layout and the splitter.

Every object goes the way the library stores it: ``serialize`` -> ``plan_blob`` ->
``write_blob`` into a fresh buffer -> ``read_blob`` -> ``deserialize``. Each object is read
back twice: through a writable view of a zeroed buffer, and through a read-only view of a
buffer that was filled with junk before the write (shared memory is reused, so the writer
must not rely on zeroed bytes; a receiver may map the store read-only).

Determinism: every test runs with ``derandomize=True`` and ``database=None``. The examples
are then a fixed function of the test's source (and of the Hypothesis version), so a CI run
tests exactly what a local run tests and a failure reproduces on the first try, and no
example database is kept, so failures saved by an earlier run (in ``.hypothesis/``) do not
change what a run does. The price is that every run explores the same examples --
set ``SHMCHANNEL_HYPOTHESIS_EXPLORE=<factor>`` to search with random seeds and ``factor``
times as many examples (e.g. before a release, or after touching the codec).
"""

from __future__ import annotations

import datetime as dt
import math
import os
from decimal import Decimal
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shmchannel.errors import UnsupportedType
from shmchannel.serialization import deserialize, row_count, serialize, split
from shmchannel.store.blob import plan_blob, read_blob, write_blob

_EXPLORE = int(os.environ.get("SHMCHANNEL_HYPOTHESIS_EXPLORE") or 0)


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples * _EXPLORE if _EXPLORE else max_examples,
        derandomize=not _EXPLORE,
        database=None,
        deadline=None,  # building DataFrames/Tables takes a few ms, unevenly
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- the library's way: serialize, write a blob, read it back ----------------------------------

_JUNK = 0xA5


class Refused(Exception):
    """serialize() refused the object (a TypeError or ValueError, with a message)."""


def _round_trips(obj: Any) -> list[tuple[Any, bytearray, bool]]:
    """``obj`` stored once and read back twice: [(out, buffer, read_only), ...].

    Raises:
        Refused: ``serialize`` raised a TypeError/ValueError with a message. Anything raised
            later (writing, reading, rebuilding) is a failure, not a refusal.
    """
    try:
        s = serialize(obj)
    except (TypeError, ValueError) as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        raise Refused(f"{type(exc).__name__}: {exc}") from exc
    plan = plan_blob(len(s.header), [int(b.nbytes) for b in s.buffers])
    results = []
    for read_only in (False, True):
        buf = bytearray(plan.size)
        if read_only:
            buf[:] = bytes([_JUNK]) * plan.size
        write_blob(memoryview(buf), plan, s.header, s.buffers)
        view = memoryview(buf)
        if read_only:
            view = view.toreadonly()
        results.append((deserialize(*read_blob(view)), buf, read_only))
    return results


# -- arrays ---------------------------------------------------------------------------------------


def _assert_same_values(out: np.ndarray, arr: np.ndarray) -> None:
    """Equal values, NaN/NaT-aware and bit for bit (sign of zero, NaN payloads); structured
    dtypes field by field, so padding bytes between fields do not count."""
    assert out.shape == arr.shape
    if arr.dtype.names is not None:
        for name in arr.dtype.names:
            _assert_same_values(out[name], arr[name])
        return
    if arr.dtype.hasobject:  # object arrays, numpy's StringDType: elementwise ==
        assert out.dtype.hasobject
        assert [x for x in out.flat] == [x for x in arr.flat]
        return
    np.testing.assert_array_equal(out, arr)  # NaN == NaN, NaT == NaT here
    assert out.tobytes() == arr.tobytes()


def _assert_array_round_trip(out: Any, arr: np.ndarray, buf: bytearray, read_only: bool) -> None:
    assert type(out) is np.ndarray
    assert out.dtype == arr.dtype, (out.dtype, arr.dtype)
    assert out.dtype.str == arr.dtype.str and out.dtype.isalignedstruct == arr.dtype.isalignedstruct
    assert out.shape == arr.shape
    _assert_same_values(out, arr)
    # Layout: a contiguous array keeps its order; any other arrives C-contiguous.
    if arr.flags.c_contiguous or not arr.flags.f_contiguous:
        assert out.flags.c_contiguous
    if arr.flags.f_contiguous:
        assert out.flags.f_contiguous
    if arr.dtype.hasobject or arr.nbytes == 0:
        return  # pickled in-band (a private copy) / no data to share
    # Zero-copy: the array is a view of the blob, read-only exactly when the blob view is.
    start = np.frombuffer(buf, np.uint8).__array_interface__["data"][0]
    addr = out.__array_interface__["data"][0]
    assert start <= addr and addr + out.nbytes <= start + len(buf)
    assert out.flags.writeable is not read_only


def _check_array(arr: np.ndarray) -> None:
    note(f"input: dtype={arr.dtype!r} shape={arr.shape} strides={arr.strides} flags=C{arr.flags.c_contiguous}/F{arr.flags.f_contiguous}")
    layout = {(True, True): "C+F", (True, False): "C", (False, True): "F", (False, False): "strided"}[
        (arr.flags.c_contiguous, arr.flags.f_contiguous)]
    event(f"dtype kind {arr.dtype.kind}{'/structured' if arr.dtype.names else ''}, layout {layout}")
    event("0-d" if arr.ndim == 0 else "zero-size" if arr.size == 0 else f"{arr.ndim}-d")
    try:
        results = _round_trips(arr)
    except Refused as exc:
        event(f"refused {arr.dtype.kind}: {exc}")
        return
    for out, buf, read_only in results:
        _assert_array_round_trip(out, arr, buf, read_only)


def _float_sizes() -> tuple[int, ...]:
    long_bits = 8 * np.dtype(np.longdouble).itemsize
    return (16, 32, 64) + ((long_bits,) if long_bits in (96, 128) else ())


_FLOAT_SIZES = _float_sizes()
_COMPLEX_SIZES = (64, 128) + ((2 * _FLOAT_SIZES[-1],) if len(_FLOAT_SIZES) > 3 else ())

_SCALAR_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=_FLOAT_SIZES),
    hnp.complex_number_dtypes(endianness="?", sizes=_COMPLEX_SIZES),
    hnp.datetime64_dtypes(max_period="Y", min_period="as", endianness="?"),
    hnp.timedelta64_dtypes(max_period="Y", min_period="as", endianness="?"),
    hnp.byte_string_dtypes(endianness="?", max_len=6),
    hnp.unicode_string_dtypes(endianness="?", max_len=6),
)


def _aligned(dtype: np.dtype) -> np.dtype:
    return np.dtype([(name, dtype.fields[name][0]) for name in dtype.names], align=True)


# Structured dtypes: nested records, fields with sub-array shapes, packed or C-aligned.
_STRUCTURED_DTYPES = hnp.array_dtypes(
    st.recursive(_SCALAR_DTYPES, lambda inner: hnp.array_dtypes(inner, max_size=3, allow_subarrays=True), max_leaves=5),
    max_size=4,
    allow_subarrays=True,
).flatmap(lambda d: st.sampled_from([d, _aligned(d)]))

_OBJECT_ELEMENTS = st.one_of(st.none(), st.integers(), st.text(max_size=5))
_STRING_DTYPE = getattr(getattr(np, "dtypes", None), "StringDType", None)  # numpy >= 2: variable-width strings


@st.composite
def _base_arrays(draw: Any, shape: tuple[int, ...]) -> np.ndarray:
    kind = draw(st.sampled_from(["scalar", "scalar", "scalar", "structured", "object", "stringdtype"]))
    if kind == "object":
        return draw(hnp.arrays(object, shape, elements=_OBJECT_ELEMENTS))
    if kind == "stringdtype" and _STRING_DTYPE is not None:
        # Not hnp.arrays(StringDType()): its fill step (np.putmask) mishandles StringDType under
        # numpy 2.4, and some arrays it draws hold undecodable string data: corrupt inputs.
        values = draw(_values(math.prod(shape), st.text(alphabet=st.characters(codec="utf-8"), max_size=30)))
        return np.array(values, dtype=_STRING_DTYPE()).reshape(shape)
    dtype = draw(_STRUCTURED_DTYPES if kind == "structured" else _SCALAR_DTYPES)
    return draw(hnp.arrays(dtype, shape))


@st.composite
def _any_arrays(draw: Any) -> np.ndarray:
    """Arrays of every dtype family, 0-d and zero-size included, in any layout: C, Fortran,
    basic-index views (steps, negative steps, new axes, integer indexes) and transposes."""
    # Explicit choices rather than array_shapes(min_dims=0, min_side=0): those make most
    # examples 0-d or zero-size, which are C- and F-contiguous at once.
    ndim = draw(st.sampled_from([1, 2, 2, 3, 3, 4, 0]))
    min_side = draw(st.sampled_from([2, 2, 2, 1, 0]))
    shape = draw(hnp.array_shapes(min_dims=ndim, max_dims=ndim, min_side=min_side, max_side=4)) if ndim else ()
    arr = draw(_base_arrays(shape))
    layout = draw(st.sampled_from(["F+stepped", "stepped+transposed", "indexed", "transposed", "stepped", "F", "C"]))
    if "F" in layout:
        arr = np.asfortranarray(arr)
    if "stepped" in layout and arr.ndim:  # every axis: a step of 2, 3, -1 or -2 (or 1), from 0 or 1
        steps = draw(st.lists(st.sampled_from([2, -1, 3, -2, 1]), min_size=arr.ndim, max_size=arr.ndim))
        starts = draw(st.lists(st.integers(0, 1), min_size=arr.ndim, max_size=arr.ndim))
        arr = arr[tuple(slice(b, None, k) if k > 0 else slice(n - 1 - b, None, k) for b, k, n in zip(starts, steps, arr.shape))]
    if layout == "indexed" and arr.ndim:  # any basic index: slices, integers, new axes
        index = draw(hnp.basic_indices(arr.shape, allow_ellipsis=False, allow_newaxis=True))
        arr = arr[(index if isinstance(index, tuple) else (index,)) + (Ellipsis,)]
    if "transposed" in layout and arr.ndim > 1:
        axes = draw(st.permutations(range(arr.ndim)))
        arr = arr.transpose(axes if axes != list(range(arr.ndim)) else axes[::-1])
    return arr


_NAT = np.datetime64("NaT", "ns")


@_settings(400)
@given(_any_arrays())
@example(np.array(1.5))
@example(np.array(b"ab", dtype=">S3"))
@example(np.zeros((2, 0, 3), dtype=">i4"))
@example(np.zeros((0,), dtype=[("a", "<i2"), ("b", [("c", ">f8", (2,))])]))
@example(np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0], dtype=np.float16))
@example(np.array([_NAT, np.datetime64("2026-01-01", "ns")]).astype(">M8[ns]"))
@example(np.array([np.timedelta64("NaT", "D"), np.timedelta64(3, "D")]).astype("m8[2D]"))
@example(np.asfortranarray(np.arange(24, dtype=np.uint64).reshape(2, 3, 4)))
@example(np.arange(60, dtype=np.complex64).reshape(3, 4, 5)[::-1, 1::2].transpose(2, 0, 1))
@example(np.arange(8.0)[:, None, None][::3])
@example(np.array([["x", 1], [None, "y"]], dtype=object).T)
@example(np.zeros(3, dtype=np.dtype([("a", "u1"), ("b", ">i8", (2,))], align=True))[::2])
@example(np.zeros(4, dtype=[]))
@example(np.array(["a", "ü" * 5], dtype=">U5"))
def test_arrays_round_trip_exactly(arr: np.ndarray) -> None:
    """Any array comes back with its dtype, shape, values (bit for bit) and contiguity, as a
    view of the blob that is read-only when the blob is -- or is refused with a clear
    TypeError/ValueError by serialize(), never silently changed."""
    _check_array(arr)


_FAMILIES = {
    "bool": np.array([[True, False]]),
    "int8-be": np.array([-128, 127], dtype=">i1"),
    "int64-be": np.array([-(2**63), 2**63 - 1], dtype=">i8"),
    "uint16-be": np.array([0, 65535], dtype=">u2"),
    "uint64": np.array([0, 2**64 - 1], dtype="<u8"),
    "float16": np.array([np.nan, np.inf, -0.0], dtype=np.float16),
    "float64-be": np.array([np.nan, -np.inf, 1e-310], dtype=">f8"),
    "longdouble": np.array([1 / 3, np.nan], dtype=np.longdouble),
    "complex-be": np.array([complex(np.nan, -0.0), 1 + 2j], dtype=">c16"),
    "datetime64[as]": np.array([-(2**63) + 1, 2**63 - 1], dtype="M8[as]"),
    "datetime64[Y]-be": np.array(["NaT", "1970"], dtype=">M8[Y]"),
    "timedelta64[2D]": np.array([np.timedelta64("NaT", "D"), np.timedelta64(3, "D")]).astype("m8[2D]"),
    "bytes": np.array([b"", b"abc"], dtype="S4"),
    "unicode-be": np.array(["", "\U0001f600x"], dtype=">U3"),
    "object": np.array(["x", 1, None], dtype=object),
    "structured-nested": np.zeros((2, 2), dtype=[("a", ">i2"), ("b", [("c", "<f4", (2, 3)), ("d", "S3")]), ("e", "U2")]),
    "structured-aligned": np.zeros(3, dtype=np.dtype([("a", "u1"), ("b", "<i8")], align=True)),
    "0-d": np.array(7, dtype=">u4"),
    "zero-size": np.zeros((3, 0), dtype="M8[ms]"),
}
if _STRING_DTYPE is not None:
    _FAMILIES["StringDType"] = np.array(["short", "a string too long to be stored inline"], dtype=_STRING_DTYPE())


@pytest.mark.parametrize("arr", list(_FAMILIES.values()), ids=list(_FAMILIES))
def test_every_dtype_family_is_accepted(arr: np.ndarray) -> None:
    """The property above lets serialize() refuse an array; none of these families is refused."""
    for out, buf, read_only in _round_trips(arr):
        _assert_array_round_trip(out, arr, buf, read_only)


# -- pandas ---------------------------------------------------------------------------------------

_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=6)  # no lone surrogates: Arrow strings are UTF-8
_TIMEZONES = ["UTC", "Europe/Paris", "Asia/Kolkata", "America/St_Johns", "Pacific/Chatham",
              dt.timezone(dt.timedelta(hours=-3, minutes=-30))]
_NS_PER = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


def _values(rows: int, elements: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(elements, min_size=rows, max_size=rows)


@st.composite
def _datetimes_tz(draw: Any, rows: int) -> Any:
    unit = draw(st.sampled_from(sorted(_NS_PER)))
    per_second = 10**9 // _NS_PER[unit]
    ticks = draw(_values(rows, st.none() | st.integers(-(2**32), 2**32).map(lambda s: s * per_second)
                         | st.integers(-(2**32) * per_second, 2**32 * per_second)))
    raw = np.array([np.iinfo(np.int64).min if t is None else t for t in ticks], dtype=np.int64).view(f"M8[{unit}]")
    return pd.DatetimeIndex(raw).tz_localize("UTC").tz_convert(draw(st.sampled_from(_TIMEZONES))).array


@st.composite
def _columns(draw: Any, rows: int) -> Any:
    """One column's values (an ndarray or a pandas ExtensionArray) of ``rows`` rows."""
    kind = draw(st.sampled_from([
        "float64", "float32", "int", "Int64", "boolean", "bool", "category", "datetime-tz",
        "timedelta", "str", "string", "string[pyarrow]", "object", "arrow-list",
    ]))
    if kind == "float64":
        return np.array(draw(_values(rows, st.floats())), dtype=np.float64)
    if kind == "float32":
        return np.array(draw(_values(rows, st.floats(width=32))), dtype=np.float32)
    if kind == "int":
        dtype = draw(hnp.integer_dtypes(endianness="=") | hnp.unsigned_integer_dtypes(endianness="="))
        return draw(hnp.arrays(dtype, rows))
    if kind == "Int64":
        return pd.array(draw(_values(rows, st.none() | st.integers(-(2**63), 2**63 - 1))), dtype="Int64")
    if kind == "boolean":
        return pd.array(draw(_values(rows, st.none() | st.booleans())), dtype="boolean")
    if kind == "bool":
        return np.array(draw(_values(rows, st.booleans())), dtype=bool)
    if kind == "category":
        categories = draw(st.lists(_TEXT, min_size=1, max_size=4, unique=True))
        values = draw(_values(rows, st.none() | st.sampled_from(categories)))
        return pd.Categorical(values, categories=categories, ordered=draw(st.booleans()))
    if kind == "datetime-tz":
        return draw(_datetimes_tz(rows))
    if kind == "timedelta":
        ticks = draw(_values(rows, st.integers(-(2**63) + 1, 2**63 - 1) | st.just(np.iinfo(np.int64).min)))
        return np.array(ticks, dtype=np.int64).view("m8[ns]")
    if kind == "object":
        return pd.array(draw(_values(rows, st.none() | st.integers() | _TEXT)), dtype=object)
    if kind == "arrow-list":
        values = draw(_values(rows, st.none() | st.lists(st.none() | st.integers(-(2**63), 2**63 - 1), max_size=3)))
        return pd.array(values, dtype=pd.ArrowDtype(pa.list_(pa.int64())))
    return pd.array(draw(_values(rows, st.none() | _TEXT)), dtype=kind)  # "str": pandas' default string dtype


@st.composite
def _indexes(draw: Any, rows: int) -> pd.Index:
    kind = draw(st.sampled_from(["range", "range-step", "int", "str", "datetime-tz", "category", "multi"]))
    name = draw(st.none() | st.sampled_from(["key", "k2"]))
    if kind == "range":
        return pd.RangeIndex(rows, name=name)
    if kind == "range-step":
        start, step = draw(st.integers(-5, 5)), draw(st.sampled_from([-3, -1, 2, 7]))
        return pd.RangeIndex(start, start + step * rows, step, name=name)
    if kind == "int":
        return pd.Index(draw(hnp.arrays(np.int64, rows)), name=name)  # duplicates allowed
    if kind == "str":
        return pd.Index(draw(_values(rows, _TEXT)), dtype="str", name=name)
    if kind == "datetime-tz":
        return pd.DatetimeIndex(draw(_datetimes_tz(rows)), name=name)
    if kind == "category":
        return pd.CategoricalIndex(draw(_values(rows, st.sampled_from(["p", "q", "r"]))), name=name)
    levels = [draw(_values(rows, st.integers(-3, 3))), draw(_values(rows, st.none() | st.sampled_from(["a", "b"])))]
    return pd.MultiIndex.from_arrays(levels, names=[name, "inner"])


@st.composite
def _frames(draw: Any, rows: int | None = None) -> pd.DataFrame:
    """DataFrames of ``rows`` rows (at most 50 if not given): mixed column dtypes, maybe a
    2-D numeric block (C or Fortran order), flat or MultiIndex column labels (duplicates
    likely), a RangeIndex, custom index or MultiIndex, attrs; sometimes a strided or
    reversed row view of a larger frame (its blocks are then non-contiguous)."""
    if rows is None:
        rows = draw(st.integers(0, 50))
    step = draw(st.sampled_from([1, 1, 2, -1]))
    total = rows * abs(step)
    columns = draw(st.lists(_columns(total), max_size=5))
    df = pd.DataFrame(index=draw(_indexes(total)))
    if draw(st.booleans()):
        block = draw(hnp.arrays(st.sampled_from([np.float64, np.int64, np.float32]), (total, draw(st.integers(1, 3)))))
        df = pd.DataFrame(np.asfortranarray(block) if draw(st.booleans()) else block, index=df.index)
    for values in columns:
        df[len(df.columns)] = values
    width = len(df.columns)
    if draw(st.booleans()) and width:
        labels = draw(_values(width, st.tuples(st.sampled_from(["x", "y"]), st.sampled_from(["p", 0]))))
        df.columns = pd.MultiIndex.from_tuples(labels, names=draw(st.sampled_from([[None, None], ["top", "sub"]])))
    else:
        df.columns = draw(_values(width, st.sampled_from(["a", "b", "c"]) | st.integers(0, 1)))
    if draw(st.booleans()):
        df.attrs = {"source": "hypothesis", "rows": rows}
    return df.iloc[::step] if step != 1 else df


def _assert_frame_round_trip(out: Any, df: pd.DataFrame) -> None:
    assert type(out) is pd.DataFrame
    pd.testing.assert_frame_equal(out, df, check_exact=True, check_index_type=True, check_column_type=True)
    assert out.attrs == df.attrs


@_settings(150)
@given(_frames())
def test_dataframes_round_trip_exactly(df: pd.DataFrame) -> None:
    """A DataFrame comes back equal: values, dtypes, index and column labels, attrs; and so
    does each of its columns as a Series (a row of a 2-D block: often a strided view)."""
    note(repr(df.dtypes))
    for out, _, _ in _round_trips(df):
        _assert_frame_round_trip(out, df)
    for j in range(len(df.columns)):
        column = df.iloc[:, j]
        for out, _, _ in _round_trips(column):
            assert type(out) is pd.Series
            pd.testing.assert_series_equal(out, column, check_exact=True, check_index_type=True)


# -- pyarrow --------------------------------------------------------------------------------------

_ARROW_LEAVES = st.sampled_from([
    pa.null(), pa.bool_(), pa.int8(), pa.int64(), pa.uint16(), pa.float32(), pa.float64(), pa.string(),
    pa.large_string(), pa.binary(), pa.large_binary(), pa.date32(), pa.timestamp("ns", tz="Europe/Paris"),
    pa.timestamp("s"), pa.duration("ms"), pa.decimal128(9, 2), pa.dictionary(pa.int8(), pa.string()),
    pa.dictionary(pa.int32(), pa.int64()),
])
_FIELD_NAMES = st.sampled_from(["a", "b", "c", "long field name"])

_ARROW_TYPES = st.recursive(
    _ARROW_LEAVES,
    lambda inner: st.one_of(
        inner.map(pa.list_),
        inner.map(pa.large_list),
        inner.map(lambda t: pa.list_(t, 2)),
        st.lists(st.tuples(_FIELD_NAMES, inner), min_size=1, max_size=3, unique_by=lambda f: f[0]).map(pa.struct),
        st.tuples(st.sampled_from([pa.string(), pa.int32()]), inner).map(lambda kv: pa.map_(*kv)),
    ),
    max_leaves=4,
)


def _arrow_values(t: pa.DataType, nullable: bool = True) -> st.SearchStrategy[Any]:
    """Python values of Arrow type ``t`` (and None if ``nullable``)."""
    if pa.types.is_null(t):
        return st.none()
    if pa.types.is_dictionary(t):
        return _arrow_values(t.value_type, nullable)
    if pa.types.is_boolean(t):
        base: st.SearchStrategy[Any] = st.booleans()
    elif pa.types.is_integer(t):
        info = np.iinfo(t.to_pandas_dtype())
        base = st.integers(int(info.min), int(info.max))
    elif pa.types.is_floating(t):
        # No NaN: Table.equals holds NaN unequal to itself.
        base = st.floats(width=t.bit_width, allow_nan=False)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        base = _TEXT
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        base = st.binary(max_size=6)
    elif pa.types.is_date32(t):
        base = st.dates()
    elif pa.types.is_timestamp(t) or pa.types.is_duration(t):
        base = st.integers(-(2**62), 2**62)
    elif pa.types.is_decimal(t):
        base = st.decimals(min_value=Decimal("-9999999.99"), max_value=Decimal("9999999.99"), places=2)
    elif pa.types.is_fixed_size_list(t):
        base = st.lists(_arrow_values(t.value_type), min_size=t.list_size, max_size=t.list_size)
    elif pa.types.is_map(t):
        base = st.lists(st.tuples(_arrow_values(t.key_type, nullable=False), _arrow_values(t.item_type)), max_size=3)
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        base = st.lists(_arrow_values(t.value_type), max_size=3)
    elif pa.types.is_struct(t):
        base = st.fixed_dictionaries({t.field(i).name: _arrow_values(t.field(i).type) for i in range(t.num_fields)})
    else:  # pragma: no cover - a leaf type added above without values here
        raise AssertionError(f"no values for {t}")
    return st.none() | base if nullable else base


@st.composite
def _tables(draw: Any, rows: int | None = None) -> pa.Table:
    """Tables with nested columns, of 1-3 chunks (each with its own dictionaries), often a
    slice of a larger table; ``rows`` rows if given."""
    fields = draw(st.lists(st.builds(
        lambda name, t, nullable, meta: pa.field(name, t, nullable or pa.types.is_null(t), metadata=meta),
        _FIELD_NAMES, _ARROW_TYPES, st.booleans(), st.none() | st.just({"unit": "m"}),
    ), min_size=1, max_size=4))  # names may repeat
    schema = pa.schema(fields)
    if draw(st.booleans()):
        schema = schema.with_metadata({"origin": "hypothesis"})
    wanted = draw(st.integers(0, 30)) if rows is None else rows
    head, tail = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    total = head + wanted + tail
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=2)))
    chunks = []
    for lo, hi in zip([0, *cuts], [*cuts, total]):
        arrays = [pa.array(draw(_values(hi - lo, _arrow_values(f.type, f.nullable))), type=f.type) for f in fields]
        chunks.append(pa.Table.from_arrays(arrays, schema=schema))
    table = pa.concat_tables(chunks)
    return table.slice(head, wanted) if head or tail or rows is not None else table


def _assert_table_round_trip(out: Any, table: pa.Table) -> None:
    assert type(out) is pa.Table
    assert out.num_rows == table.num_rows
    assert out.equals(table, check_metadata=True), f"{out}\n!=\n{table}"


@_settings(150)
@given(_tables())
def test_arrow_tables_round_trip_exactly(table: pa.Table) -> None:
    """An Arrow table (nested types, several chunks, sliced) comes back equal, metadata too."""
    note(repr(table.schema))
    for out, _, _ in _round_trips(table):
        _assert_table_round_trip(out, table)


# -- splitting ------------------------------------------------------------------------------------


@st.composite
def _row_arrays(draw: Any, rows: int) -> np.ndarray:
    """Arrays of ``rows`` rows (axis 0), C, Fortran, row-strided, reversed or transposed."""
    rest = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))
    layout = draw(st.sampled_from(["C", "F", "step", "reversed", "transposed"]))
    if layout == "step":
        return draw(_base_arrays((2 * rows, *rest)))[1::2]
    if layout == "transposed":
        return draw(_base_arrays((*rest[::-1], rows))).T
    arr = draw(_base_arrays((rows, *rest)))
    return np.asfortranarray(arr) if layout == "F" else arr[::-1] if layout == "reversed" else arr


_LIST_ITEMS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _TEXT, st.binary(max_size=4),
    st.tuples(st.integers(), _TEXT),
    # Arrays inside a list go out-of-band too. (No NaN in lists: == on lists compares floats
    # by identity first, and a round trip makes new float objects.)
    hnp.arrays(st.sampled_from([np.float64, np.int32, np.dtype("U3")]), hnp.array_shapes(max_dims=2, min_side=0, max_side=3),
               elements={"allow_nan": False}),
)


def _assert_same_item(out: Any, item: Any, buf: bytearray, read_only: bool) -> None:
    if isinstance(item, np.ndarray):
        _assert_array_round_trip(out, item, buf, read_only)
    else:
        assert type(out) is type(item) and out == item


@st.composite
def _splittable(draw: Any, rows: int) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["ndarray", "list", "DataFrame", "Series", "Table"]))
    if kind == "ndarray":
        return kind, draw(_row_arrays(rows))
    if kind == "list":
        return kind, draw(_values(rows, _LIST_ITEMS))
    if kind == "DataFrame":
        return kind, draw(_frames(rows))
    if kind == "Series":
        return kind, pd.Series(draw(_columns(rows)), index=draw(_indexes(rows)), name=draw(st.none() | _TEXT))
    return kind, draw(_tables(rows))


def _rows_of(obj: Any, start: int, stop: int) -> Any:
    if isinstance(obj, pa.Table):
        return obj.slice(start, stop - start)
    if isinstance(obj, (pd.DataFrame, pd.Series)):
        return obj.iloc[start:stop]
    return obj[start:stop]


def _assert_same_rows(part: Any, expected: Any) -> None:
    """``part`` (a block from split) holds the same rows as ``expected``, before any copy."""
    if isinstance(expected, np.ndarray):
        assert type(part) is np.ndarray and part.dtype == expected.dtype
        _assert_same_values(part, expected)
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(part, expected, check_exact=True, check_index_type=True, check_column_type=True)
    elif isinstance(expected, pd.Series):
        pd.testing.assert_series_equal(part, expected, check_exact=True, check_index_type=True)
    elif isinstance(expected, pa.Table):
        assert part.equals(expected, check_metadata=True)
    else:
        assert len(part) == len(expected) and all(x is y for x, y in zip(part, expected))


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts).astype(first.dtype, copy=False)  # concatenate makes byte order native
    if isinstance(first, (pd.DataFrame, pd.Series)):
        return pd.concat(parts)
    if isinstance(first, pa.Table):
        return pa.concat_tables(parts)
    return [x for p in parts for x in p]


def _assert_stored_part(out: Any, part: Any, buf: bytearray, read_only: bool) -> None:
    if isinstance(part, np.ndarray):
        _assert_array_round_trip(out, part, buf, read_only)
    elif isinstance(part, pd.DataFrame):
        _assert_frame_round_trip(out, part)
    elif isinstance(part, pd.Series):
        assert type(out) is pd.Series
        pd.testing.assert_series_equal(out, part, check_exact=True, check_index_type=True)
    elif isinstance(part, pa.Table):
        _assert_table_round_trip(out, part)
    else:
        assert type(out) is list and len(out) == len(part)
        for x, y in zip(out, part):
            _assert_same_item(x, y, buf, read_only)


@st.composite
def _split_cases(draw: Any) -> tuple[int, str, Any]:
    n = draw(st.integers(1, 5))
    per_part = draw(st.integers(0, 10 // n))
    kind, obj = draw(_splittable(n * per_part))
    return n, kind, obj


@_settings(200)
@given(_split_cases())
@example((3, "ndarray", np.asfortranarray(np.arange(36.0).reshape(6, 6))[:, ::2]))
@example((2, "DataFrame", pd.DataFrame({"a": [1.0, 2.0], "b": pd.array([None, 3], dtype="Int64")})))
def test_split_into_n_blocks_that_store_exactly(case: tuple[int, str, Any]) -> None:
    """For rows = n*k: split(obj, n) gives n blocks of k rows, in order, that concatenate to
    the original; each block is stored and read back exactly (DataFrame/Series blocks equal
    to ``obj.iloc`` of the same rows)."""
    n, kind, obj = case
    event(f"{kind}, n={n}")
    rows = row_count(obj)
    k = rows // n
    assert rows == n * k
    parts = split(obj, n)
    assert len(parts) == n
    if n == 1:
        assert parts[0] is obj
    for i, part in enumerate(parts):
        assert type(part) is type(obj)
        assert row_count(part) == k
        expected = _rows_of(obj, i * k, (i + 1) * k)
        _assert_same_rows(part, expected)
        if isinstance(obj, np.ndarray) and part.nbytes:
            assert np.may_share_memory(part, obj), "an ndarray block is a view, not a copy"
        for out, buf, read_only in _round_trips(part):
            _assert_stored_part(out, expected, buf, read_only)
    if k:
        _assert_same_rows(_concat(parts), obj)


@st.composite
def _remainder_cases(draw: Any) -> tuple[int, int, Any]:
    n = draw(st.integers(1, 5))
    rows = draw(st.integers(0, 12))
    maker: Callable[[int], Any] = draw(st.sampled_from([
        np.arange,
        lambda r: np.arange(2 * r).reshape(2, r).T,
        lambda r: list(range(r)),
        lambda r: pd.DataFrame({"row": range(r), "s": [str(i) for i in range(r)]}),
        lambda r: pd.Series(range(r), index=[f"i{i}" for i in range(r)], dtype="int64"),  # pandas 1.5 warns without a dtype when empty
        lambda r: pa.table({"row": pa.array(range(r), pa.int64())}),
    ]))
    return n, rows, maker(rows)


def _row_ids(obj: Any) -> list[int]:
    if isinstance(obj, np.ndarray):
        return [int(x) for x in (obj if obj.ndim == 1 else obj[:, 0])]
    if isinstance(obj, pd.DataFrame):
        return obj["row"].tolist()
    if isinstance(obj, pd.Series):
        return obj.tolist()
    if isinstance(obj, pa.Table):
        return obj.column("row").to_pylist()
    return list(obj)


@_settings(150)
@given(_remainder_cases())
@example((3, 7, list(range(7))))
@example((5, 3, np.arange(3)))
def test_split_drops_the_remainder_rows(case: tuple[int, int, Any]) -> None:
    """When rows is not a multiple of n, split(obj, n) still gives n blocks of rows // n
    rows each -- the first n * (rows // n) rows, in order -- and the last rows % n rows are in
    no block (n > rows: n empty blocks). n == 1 gives [obj] itself. Channel.send refuses such
    objects before splitting ("len(obj) must be a positive multiple of num_shards")."""
    n, rows, obj = case
    parts = split(obj, n)
    if n == 1:
        assert len(parts) == 1 and parts[0] is obj
        return
    k = rows // n
    assert len(parts) == n
    assert [row_count(p) for p in parts] == [k] * n
    assert [_row_ids(p) for p in parts] == [list(range(i * k, (i + 1) * k)) for i in range(n)]
    assert sum((_row_ids(p) for p in parts), []) == list(range(n * k))  # rows n*k .. rows-1 dropped


def test_split_and_row_count_refuse_0d_arrays() -> None:
    """A 0-d array has no rows: row_count (and so split into several blocks) refuses it."""
    with pytest.raises(UnsupportedType, match="at least one dimension"):
        row_count(np.array(1.0))
    with pytest.raises(UnsupportedType, match="at least one dimension"):
        split(np.array(1.0), 2)


# -- objects inside containers --------------------------------------------------------------


@st.composite
def _containers(draw: Any) -> dict[str, Any]:
    """A dict holding an array twice (one object), a view of it, a DataFrame, a Table and a
    list of scalars: every kind of out-of-band buffer in one stream."""
    arr = draw(_any_arrays())
    return {
        "same": [arr, arr],
        "view": arr.T[..., ::-1] if arr.ndim else arr,
        "frame": draw(_frames(draw(st.integers(0, 6)))),
        "table": draw(_tables(draw(st.integers(0, 6)))),
        "items": draw(st.lists(_LIST_ITEMS, max_size=4)),
    }


@_settings(60)
@given(_containers())
def test_containers_of_mixed_objects_round_trip(obj: dict[str, Any]) -> None:
    """Arrays, frames and tables nested in a dict and lists come back equal; an array that
    appears twice comes back as one object."""
    for out, buf, read_only in _round_trips(obj):
        assert type(out) is dict and list(out) == list(obj)
        first, second = out["same"]
        assert first is second
        _assert_array_round_trip(first, obj["same"][0], buf, read_only)
        _assert_array_round_trip(out["view"], obj["view"], buf, read_only)
        _assert_frame_round_trip(out["frame"], obj["frame"])
        _assert_table_round_trip(out["table"], obj["table"])
        assert type(out["items"]) is list and len(out["items"]) == len(obj["items"])
        for x, y in zip(out["items"], obj["items"]):
            _assert_same_item(x, y, buf, read_only)


# -- dtype metadata -----------------------------------------------------------------------------

_ENUM = np.dtype("<i4", metadata={"enum": {"RED": 0, "GREEN": 1}})  # h5py's enum_dtype looks like this


def test_dtype_metadata_survives_inside_containers() -> None:
    """Through the pickle path (an array inside a list, or a structured field) dtype metadata
    comes back."""
    for out, _, _ in _round_trips([np.array([0, 1], dtype=_ENUM)]):
        assert out[0].dtype.metadata == _ENUM.metadata
    record = np.zeros(2, dtype=[("colour", _ENUM)])
    for out, _, _ in _round_trips(record):
        assert out.dtype["colour"].metadata == _ENUM.metadata


def test_dtype_metadata_survives_alone() -> None:
    """A plain array with dtype metadata keeps it, as it does inside a list."""
    arr = np.array([0, 1, 1], dtype=_ENUM)
    for out, _, _ in _round_trips(arr):
        assert out.dtype.metadata == _ENUM.metadata
