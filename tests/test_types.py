"""More types (issue 6, item 2): pyarrow RecordBatch, polars DataFrame, torch.Tensor, dicts
of equal-length columns, and any picklable object sent whole.

The channel tests send from this process to receivers in a spawned child, which rebuilds
the expected block of every object on its own (from the row range, not through ``split``),
compares, and reports which parts of what it received lie in its mapping of the arena:
that is the zero-copy proof. The codec tests (one process, hypothesis) are in
test_types_codec.py.

Without the torch extra only the tests and cases that build tensors are skipped (issue 12):
the rest is most of the type coverage.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import queue
import re
import threading
from typing import Any, Callable

import numpy as np
import pandas as pd
import polars as pl
import polars.testing
import pyarrow as pa
import pytest

from shmchannel import DataReceiver, DataSender, DataSystem, InvalidArgument, UnsupportedType
from shmchannel.backends import arena_client
from shmchannel.testing import join_ok, start_process, wait_until

from .conftest import ADDRESS

try:
    import torch
except ModuleNotFoundError:  # not a module-level importorskip: that would skip every test here (issue 12)
    torch = None

#: For a test or a parameter that builds tensors: skipped, with the reason, without torch.
needs_torch = pytest.mark.skipif(torch is None, reason="the torch extra is not installed")

#: Rows of every object sent: divisible by 2 and 3, and each of 3 shards is larger than the
#: inline threshold (64 KiB), so every shard goes through the arena.
ROWS = 60_000
OBJECTS = 3
OTHERS = "other objects need num_shards=1 or full_batch=True"


def exact(message: str) -> str:
    """A ``match`` pattern for exactly ``message``."""
    return f"^{re.escape(message)}$"


@dataclasses.dataclass(frozen=True)
class Record:
    """A plain picklable object of no splittable type."""

    number: int
    tags: frozenset[str]


def _make(case: str, i: int, start: int = 0, stop: int = ROWS) -> Any:
    """Rows [start, stop) of object ``i`` of ``case``; values depend on both, so a shard or an
    object out of order shows."""
    n = np.arange(start, stop, dtype=np.int64) + i * 1_000_000
    if case == "record_batch":
        return pa.RecordBatch.from_pydict({"n": n, "x": n * 0.5, "s": pa.array([f"r{v}" for v in n])})
    if case == "polars":
        return pl.DataFrame({"n": n, "x": n * 0.5, "ok": n % 3 == 0, "s": [f"r{v}" for v in n]})
    if case == "tensor":
        return torch.from_numpy(np.stack([n, -n], axis=1).astype(np.float32))
    if case == "bfloat16":  # a dtype numpy lacks
        return torch.from_numpy(np.stack([n % 256, -(n % 256)], axis=1).astype(np.float32)).to(torch.bfloat16)
    if case == "dict":
        return {
            "ids": n,
            "vec": torch.from_numpy(np.stack([n, n + 1], axis=1)),
            "label": [f"r{v}" for v in n],
            "w": pd.Series(n * 0.25, index=pd.RangeIndex(start, stop), name="w"),
        }
    if case == "object":
        return Record(i, frozenset({f"t{i}", "x" * 100_000}))
    raise AssertionError(case)


def _bits(t: Any) -> bytes:
    """The bytes of ``t`` in row-major order (through numpy and an integer of the same size:
    sub-byte and float8 dtypes have no copy kernels)."""
    carrier = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}[t.element_size()]
    return bytes(t.view(carrier).numpy().tobytes())


def _difference(got: Any, expected: Any) -> str:
    """'' if ``got`` equals ``expected`` in type and values, else what differs."""
    if type(got) is not type(expected):
        return f"type {type(got).__qualname__}, expected {type(expected).__qualname__}"
    if isinstance(expected, dict):
        if list(got) != list(expected):
            return f"keys {list(got)}, expected {list(expected)}"
        return next((f"[{k!r}] {d}" for k in expected if (d := _difference(got[k], expected[k]))), "")
    if isinstance(expected, pa.RecordBatch):
        return "" if got.equals(expected, check_metadata=True) else "record batches differ"
    if isinstance(expected, pl.DataFrame):
        try:
            polars.testing.assert_frame_equal(got, expected)
        except AssertionError as exc:
            return str(exc)[:300]
        return ""
    if torch is not None and isinstance(expected, torch.Tensor):
        if (got.dtype, got.shape, got.requires_grad) != (expected.dtype, expected.shape, False):
            return f"{got.dtype} {tuple(got.shape)} grad={got.requires_grad}, expected {expected.dtype} {tuple(expected.shape)}"
        return "" if _bits(got) == _bits(expected) else "tensor values differ"
    if isinstance(expected, np.ndarray):
        ok = got.dtype == expected.dtype and np.array_equal(got, expected)
        return "" if ok else "arrays differ"
    if isinstance(expected, pd.Series):
        try:
            pd.testing.assert_series_equal(got, expected)
        except AssertionError as exc:
            return str(exc)[:300]
        return ""
    return "" if got == expected else f"{got!r:.100} != {expected!r:.100}"


def _inside_arena(address: int, nbytes: int) -> bool:
    assert arena_client._arena is not None, "no arena mapped in this process"
    start, end = arena_client._arena[2].address_range
    return start <= address and address + nbytes <= end


def _views(got: Any, prefix: str = "") -> dict[str, tuple[bool, bool]]:
    """Data part of ``got`` -> (lies in this process's arena mapping, writable)."""
    if isinstance(got, dict):
        return {k: v for key, value in got.items() for k, v in _views(value, f"{prefix}{key}.").items()}
    if isinstance(got, np.ndarray):
        return {prefix + "array": (_inside_arena(got.__array_interface__["data"][0], got.nbytes), got.flags.writeable)}
    if isinstance(got, pd.Series):  # to_numpy() is read-only under copy-on-write: writable says nothing
        array = got.to_numpy()
        return {prefix + "series": (_inside_arena(array.__array_interface__["data"][0], array.nbytes), False)}
    if torch is not None and isinstance(got, torch.Tensor):
        nbytes = got.numel() * got.element_size()
        return {prefix + "tensor": (_inside_arena(got.data_ptr(), nbytes), True)}
    if isinstance(got, pa.RecordBatch):
        columns = {name: got.column(name) for name in got.schema.names}
    elif isinstance(got, pl.DataFrame):
        columns = {name: got[name].to_arrow() for name in got.columns}  # exports polars' buffers as they are
    else:
        return {}
    return {
        prefix + name: (all(_inside_arena(b.address, b.size) for b in array.buffers() if b is not None), False)
        for name, array in columns.items()
    }


def _receive_all(name: str, case: str, num_shards: int, full_batch: bool, results: Any) -> None:
    """Child: receive every object of every shard, compare it with the block it must be, and
    report (shard, index, difference, views) for each."""
    receivers = [DataReceiver(ADDRESS, dataset_name=name, shard_id=s, wait=30) for s in range(num_shards)]
    try:
        for i in range(OBJECTS):
            for shard, receiver in enumerate(receivers):
                got = receiver.recv(timeout=30)
                step = ROWS if full_batch else ROWS // num_shards
                first = 0 if full_batch else shard * step
                results.put((shard, i, _difference(got, _make(case, i, first, first + step)), _views(got)))
                del got
    finally:
        for receiver in receivers:
            receiver.close()


def _run(case: str, num_shards: int, full_batch: bool) -> dict[tuple[int, int], tuple[str, dict[str, tuple[bool, bool]]]]:
    """Send OBJECTS objects of ``case``; a child receives them all. (shard, index) -> report."""
    import multiprocessing

    name = f"types-{case}-{num_shards}-{int(full_batch)}-{os.getpid()}"
    results = multiprocessing.get_context("spawn").Queue()
    with DataSender(ADDRESS, dataset_name=name, num_shards=num_shards, full_batch=full_batch) as sender:
        proc = start_process(_receive_all, name, case, num_shards, full_batch, results)
        for i in range(OBJECTS):
            sender.send(_make(case, i), timeout=30)
        reports = {}
        for _ in range(OBJECTS * num_shards):
            try:
                shard, i, difference, views = results.get(timeout=60)
            except queue.Empty:
                raise AssertionError(f"the receiving child reported {len(reports)} of {OBJECTS * num_shards} objects") from None
            reports[shard, i] = (difference, views)
        join_ok(proc, 60)
    return reports


# -- through a channel, to a receiver in another process ------------------------------------

LAYOUTS = {"2-shards": (2, False), "3-shards": (3, False), "full_batch": (2, True)}

#: Cases of ``_make`` that build tensors.
TORCH_CASES = {"tensor", "bfloat16", "dict"}


def _cases(names: list[str]) -> list[Any]:
    """``names`` as parameters, those of TORCH_CASES marked needs_torch (same ids)."""
    return [pytest.param(name, marks=needs_torch) if name in TORCH_CASES else name for name in names]


#: Parts that must be views of the arena when received (``True``) or private copies (``False``),
#: for split shards and for full_batch objects (read-only memory shared by every receiver).
EXPECTED_VIEWS: dict[str, dict[bool, dict[str, bool]]] = {
    "record_batch": {False: {"n": True, "x": True, "s": True}, True: {"n": True, "x": True, "s": True}},
    # polars strings are copied (large_string -> polars string views): not pinned here.
    "polars": {False: {"n": True, "x": True, "ok": True}, True: {"n": True, "x": True, "ok": True}},
    "tensor": {False: {"tensor": True}, True: {"tensor": False}},
    "bfloat16": {False: {"tensor": True}, True: {"tensor": False}},
    "dict": {
        False: {"ids.array": True, "vec.tensor": True, "w.series": True},
        True: {"ids.array": True, "vec.tensor": False, "w.series": True},
    },
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", _cases(sorted(EXPECTED_VIEWS)))
def test_type_round_trips_to_another_process(broker: int, case: str, layout: str) -> None:
    """Objects of each new type arrive at a receiver in another process equal, in order, split
    into the right row blocks (whole with full_batch), their data views of shared memory where
    the type allows."""
    num_shards, full_batch = LAYOUTS[layout]
    reports = _run(case, num_shards, full_batch)
    assert sorted(reports) == [(s, i) for s in range(num_shards) for i in range(OBJECTS)]
    for (shard, i), (difference, views) in sorted(reports.items()):
        assert difference == "", f"shard {shard} object {i}: {difference}"
        for part, view in EXPECTED_VIEWS[case][full_batch].items():
            inside, writable = views[part]
            assert inside is view, f"shard {shard} object {i}: {part} {'copied' if view else 'a view of shared memory'}"
            if part.endswith("array"):
                assert writable is not full_batch, f"{part} writable={writable} with full_batch={full_batch}"


@pytest.mark.parametrize("layout", ["1-shard", "full_batch"])
def test_other_picklable_object_arrives_whole(broker: int, layout: str) -> None:
    """An object of no splittable type reaches every shard whole with num_shards=1 or full_batch=True."""
    num_shards, full_batch = (1, False) if layout == "1-shard" else (3, True)
    reports = _run("object", num_shards, full_batch)
    assert sorted(reports) == [(s, i) for s in range(num_shards) for i in range(OBJECTS)]
    assert all(difference == "" for difference, _ in reports.values()), reports


@pytest.mark.parametrize("case", _cases(["record_batch", "polars", "tensor", "bfloat16", "dict"]))
def test_type_travels_through_each_backend(address: str, case: str) -> None:
    """Each new type, split over 2 shards, arrives equal through either backend (values only:
    Ray carries parts with its own serialization)."""
    name = f"backend-{case}-{os.getpid()}"
    with DataSender(address, dataset_name=name, num_shards=2) as sender, DataReceiver(
        address, dataset_name=name, shard_id=0
    ) as rx0, DataReceiver(address, dataset_name=name, shard_id=1) as rx1:
        sender.send(_make(case, 1), timeout=30)
        assert _difference(rx0.recv(timeout=30), _make(case, 1, 0, ROWS // 2)) == ""
        assert _difference(rx1.recv(timeout=30), _make(case, 1, ROWS // 2, ROWS)) == ""


# -- memory of received views ----------------------------------------------------------------


def _store_empty() -> bool:
    with DataSystem(ADDRESS) as ds:
        stats = ds.stats()
    return stats.used == 0 and stats.objects == 0


@pytest.mark.parametrize("case", _cases(["record_batch", "polars", "tensor", "bfloat16", "dict"]))
def test_received_views_keep_their_memory_until_dropped(broker: int, case: str) -> None:
    """A received object (num_shards=1) is a writable view of the arena that stays valid after
    the receiver closed and a collection ran; its memory returns once it is dropped."""
    name = f"keep-{case}-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(_make(case, 0))
        got = receiver.recv(timeout=10)
    gc.collect()
    with DataSystem(ADDRESS) as ds:
        assert ds.stats().objects == 1, "memory returned while the object is held"
    views = _views(got)
    assert views and all(inside for part, (inside, _) in views.items() if part not in ("s", "label.array")), views
    assert _difference(got, _make(case, 0)) == ""
    del got
    gc.collect()
    wait_until(_store_empty, 10, f"the store to be empty once the {case} was dropped")


@needs_torch
def test_received_tensor_writes_reach_the_shared_memory_it_views(broker: int) -> None:
    """A tensor received alone is a writable view of the arena: a write through it shows in a
    second view of the same arena bytes."""
    name = f"write-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(torch.zeros(ROWS))
        got = receiver.recv(timeout=10)
        assert arena_client._arena is not None
        arena = arena_client._arena[2]
        raw = arena.array(got.data_ptr() - arena.address_range[0], ROWS * 4).view(np.float32)
        got[10] = 7.0
        assert raw[10] == 7.0
        del got, raw


# -- errors ----------------------------------------------------------------------------------

OFF_CPU = "a torch.Tensor in obj must be on the CPU, got device 'cuda:0'; move it there with tensor.cpu()"


def _cuda_tensor() -> Any:
    """A tensor that says it is on CUDA (a fake tensor: this machine has no GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.zeros(4, 2, device="cuda")


@needs_torch
@pytest.mark.parametrize(("num_shards", "full_batch"), [(1, False), (2, False), (2, True)], ids=["1-shard", "2-shards", "full_batch"])
def test_send_tensor_off_the_cpu_raises_unsupported_type(broker: int, num_shards: int, full_batch: bool) -> None:
    """A tensor on another device, alone, in a dict or in a list, raises UnsupportedType
    saying to move it to the CPU (before torch fails to slice it), and queues nothing."""
    cuda = _cuda_tensor()
    objs: list[Any] = [cuda, {"x": cuda, "y": np.arange(4)}] + ([[cuda]] if num_shards == 1 or full_batch else [])
    with DataSender(ADDRESS, dataset_name=f"cuda-{os.getpid()}", num_shards=num_shards, full_batch=full_batch) as sender:
        for obj in objs:
            with pytest.raises(UnsupportedType, match=exact(OFF_CPU)):
                sender.send(obj)
        assert sender.get_queue() == {s: [] for s in range(num_shards)}
    assert _store_empty()


def test_send_dict_of_unequal_columns_to_shards_raises_invalid_argument(broker: int) -> None:
    """A dict whose columns differ in length raises InvalidArgument (a ValueError) naming each
    key and length (a tensor column too, where torch is installed)."""
    obj: dict[str, Any] = {"a": np.arange(4), "b": [1, 2, 3], "d": pd.Series([1.0] * 4)}
    if torch is not None:
        obj["c"] = torch.zeros(4, 2)
    got = ", ".join(f"{key!r}: {3 if key == 'b' else 4}" for key in obj)
    with DataSender(ADDRESS, dataset_name=f"unequal-{os.getpid()}", num_shards=2) as sender:
        with pytest.raises(InvalidArgument, match=exact(f"the columns of obj must have equal lengths, got {got}")) as info:
            sender.send(obj)
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("make", "message"),  # factories: no tensor is built at collection time without torch
    [
        (lambda: {}, f"obj must be a dict with at least one column to be split into shards, got an empty dict; {OTHERS}"),
        (lambda: {"a": [1, 2], "n": 3}, f"obj['n'] must be a column (numpy.ndarray, list, torch.Tensor or pandas.Series) to split a dict into shards, got builtins.int; {OTHERS}"),
        (lambda: {"a": np.array(1.0)}, f"obj['a'] must have at least one dimension to be split into shards, got a 0-d numpy.ndarray; {OTHERS}"),
        pytest.param(lambda: torch.tensor(1.0), f"obj must have at least one dimension to be split into shards, got a 0-d torch.Tensor; {OTHERS}", marks=needs_torch),
        pytest.param(lambda: torch.eye(2).to_sparse(), f"obj must be a strided (dense) torch.Tensor to be split into shards, got layout torch.sparse_coo; {OTHERS}", marks=needs_torch),
        (lambda: Record(1, frozenset()), f"obj must be a numpy.ndarray, list, pandas.DataFrame, pandas.Series, pyarrow.Table, pyarrow.RecordBatch, polars.DataFrame, torch.Tensor or dict of equal-length columns to be split into shards, got {__name__}.Record; {OTHERS}"),
    ],
    ids=["empty-dict", "scalar-in-dict", "0-d-column", "0-d-tensor", "sparse-tensor", "record"],
)
def test_send_unsplittable_object_to_shards_raises_unsupported_type(broker: int, make: Callable[[], Any], message: str) -> None:
    """An object send cannot split raises UnsupportedType (a TypeError) with 2 shards, saying why and how to send it whole."""
    obj = make()
    with DataSender(ADDRESS, dataset_name=f"unsplittable-{os.getpid()}", num_shards=2) as sender:
        with pytest.raises(UnsupportedType, match=exact(message)) as info:
            sender.send(obj)
        assert isinstance(info.value, TypeError) and not isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "make",  # factories: no tensor is built at collection time without torch
    [
        lambda: {},
        lambda: {"a": [1, 2], "n": 3},
        lambda: {"a": np.arange(3), "b": [1]},
        pytest.param(lambda: torch.tensor(2.5), marks=needs_torch),
        pytest.param(lambda: torch.eye(2).to_sparse(), marks=needs_torch),
    ],
    ids=["empty-dict", "scalar-in-dict", "unequal-dict", "0-d-tensor", "sparse-tensor"],
)
def test_unsplittable_object_travels_whole_to_one_shard(broker: int, make: Callable[[], Any]) -> None:
    """What cannot be split is sent whole when num_shards=1 (torch pickles a sparse tensor itself)."""
    obj = make()
    name = f"whole-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(obj)
        got = receiver.recv(timeout=10)
    if torch is not None and isinstance(obj, torch.Tensor):
        assert got.layout == obj.layout and torch.equal(got.to_dense(), obj.to_dense())
    else:
        assert _difference(got, obj) == ""


def test_send_unpicklable_object_raises_unsupported_type(broker: int) -> None:
    """An object pickle cannot carry (a lock) raises UnsupportedType when sent whole."""
    with DataSender(ADDRESS, dataset_name=f"lock-{os.getpid()}") as sender:
        with pytest.raises(UnsupportedType, match=exact("obj cannot be serialized: cannot pickle '_thread.lock' object")):
            sender.send(threading.Lock())
        assert sender.get_queue(0) == []


def test_send_polars_object_column_raises_unsupported_type(broker: int) -> None:
    """A polars DataFrame with an Object column raises UnsupportedType naming the column
    (Arrow would carry the objects' addresses, not the objects)."""
    df = pl.DataFrame({"n": [1, 2], "o": pl.Series([object(), object()], dtype=pl.Object)})
    with DataSender(ADDRESS, dataset_name=f"pl-object-{os.getpid()}") as sender:
        with pytest.raises(UnsupportedType, match=r"^a polars\.DataFrame in obj must have no Object columns, got 'o'; "):
            sender.send(df)


@needs_torch
def test_tensor_requiring_grad_arrives_detached(broker: int) -> None:
    """A tensor that requires grad is split and sent detached: its values arrive, without autograd."""
    name = f"grad-{os.getpid()}"
    weights = torch.arange(6.0).reshape(3, 2).requires_grad_()
    with DataSender(ADDRESS, dataset_name=name, num_shards=3) as sender, DataReceiver(ADDRESS, dataset_name=name, shard_id=1) as receiver:
        sender.send(weights)
        got = receiver.recv(timeout=10)
    assert not got.requires_grad and torch.equal(got, torch.tensor([[2.0, 3.0]]))
