"""Every buffer handed to the user starts on a 64-byte boundary (issue 11, item 2).

The blob layout promises 64-byte aligned buffers; received arrays used to start wherever
the inline payload put them (addresses 3, 19, 35... mod 64 after a prefetch of mixed-size
objects). These tests check, through the public API only, the address of every array,
DataFrame block, tensor and Arrow buffer a receiver, a peek or ``DataSystem.get`` hands
out, on each path: inline and arena sizes, prefetched or not, shared (full_batch), split,
recovered after a broker restart, and on the Ray backend.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from shmchannel import DataReceiver, DataSender, DataSystem
from shmchannel.broker import daemon
from shmchannel.testing import wait_until

from .conftest import ADDRESS

ALIGNMENT = 64
MIB = 1 << 20
#: Bytes of the arrays sent: from one byte to 1 MiB, so both sides of the inline threshold
#: (64 KiB by default) -- inline payloads and arena blocks.
SIZES = [1, 3, 8, 24, 1000, 4096, 60_000, 100_000, MIB]
DTYPES = [np.uint8, np.int16, np.float32, np.float64, np.complex128]
#: Elements of a float64 array too large to travel inline (160 KiB).
BIG = 20_000


def _odd() -> np.ndarray:
    """The odd-sized object of the issue's input: it shifts what follows it in a payload."""
    return np.ones(3, np.uint8)


def _array(nbytes: int, dtype: Any) -> np.ndarray:
    """An array of about ``nbytes`` bytes (at least one element) of ``dtype``."""
    count = max(1, nbytes // np.dtype(dtype).itemsize)
    return np.arange(count).astype(dtype)


def _buffers(obj: Any, where: str = "obj") -> Iterator[tuple[str, int]]:
    """(description, address) of every data buffer in ``obj`` that the user can reach."""
    if isinstance(obj, np.ndarray):
        if obj.size:
            yield f"{where} ({obj.dtype}, {obj.shape})", int(obj.__array_interface__["data"][0])
    elif "torch" in sys.modules and isinstance(obj, sys.modules["torch"].Tensor):
        if obj.numel():
            yield f"{where} (tensor {obj.dtype}, {tuple(obj.shape)})", int(obj.data_ptr())
    elif isinstance(obj, pd.DataFrame):
        for i, block in enumerate(obj._mgr.blocks):
            yield from _buffers(np.asarray(block.values), f"{where} block {i} {list(obj.columns[block.mgr_locs.indexer])}")
        for column in obj.columns:
            yield from _buffers(obj[column].to_numpy(), f"{where}[{column!r}]")
    elif isinstance(obj, (pa.Table, pa.RecordBatch)):
        for name, column in zip(obj.column_names, obj.columns):
            chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
            for i, chunk in enumerate(chunks):
                for j, buf in enumerate(chunk.buffers()):
                    if buf is not None and buf.size:
                        yield f"{where} column {name!r} chunk {i} buffer {j}", int(buf.address)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _buffers(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _buffers(value, f"{where}[{i}]")


def _misaligned(obj: Any, what: str = "obj") -> list[str]:
    """Every buffer of ``obj`` that does not start on a 64-byte boundary, with its address mod 64."""
    return [f"{where}: address % 64 = {address % ALIGNMENT}"
            for where, address in _buffers(obj, what) if address % ALIGNMENT]


def _assert_aligned(objs: list[Any], label: str) -> None:
    """Assert every buffer of every object in ``objs`` is aligned; else list all that are not."""
    bad = [entry for i, obj in enumerate(objs) for entry in _misaligned(obj, f"{label} {i}")]
    assert not bad, f"{len(bad)} misaligned buffers:\n" + "\n".join(bad)


def _torch() -> Any:
    return pytest.importorskip("torch", reason="the torch extra is not installed")


def _name(stem: str) -> str:
    return f"{stem}-{os.getpid()}"


def _round_trip(address: str, objs: list[Any], prefetch: int | None = None) -> list[Any]:
    """Queue all of ``objs`` on one channel, then receive them (a prefetch takes several at once)."""
    name = _name("align")
    options = {} if prefetch is None else {"prefetch": prefetch}
    with DataSender(address, dataset_name=name, max_queue_size=len(objs)) as sender, DataReceiver(
        address, dataset_name=name, **options
    ) as receiver:
        for obj in objs:
            sender.send(obj)
        got = [receiver.recv(timeout=30) for _ in objs]
    for sent, received in zip(objs, got):
        if isinstance(sent, np.ndarray):
            np.testing.assert_array_equal(received, sent)
    return got


# -- plain arrays ----------------------------------------------------------------------------

PREFETCH = [None, 1]
PREFETCH_IDS = ["default-prefetch", "prefetch-1"]


@pytest.mark.parametrize("prefetch", PREFETCH, ids=PREFETCH_IDS)
def test_float_arrays_alternating_with_odd_sized_ones_arrive_aligned(address: str, prefetch: int | None) -> None:
    """The issue's input: 40 small arrays, 3-byte uint8 and 32-byte float64 in turn, all arrive aligned."""
    objs = [_odd() if i % 2 == 0 else np.arange(4, dtype=np.float64) for i in range(40)]
    got = _round_trip(address, objs, prefetch)
    _assert_aligned(got, "array")
    assert all(a.flags.aligned for a in got)


@pytest.mark.parametrize("prefetch", PREFETCH, ids=PREFETCH_IDS)
def test_arrays_of_every_size_and_dtype_arrive_aligned(address: str, prefetch: int | None) -> None:
    """Arrays of 1 byte to 1 MiB (inline and arena) of five dtypes, each after an odd-sized one, arrive aligned."""
    objs = [obj for dtype in DTYPES for nbytes in SIZES for obj in (_odd(), _array(nbytes, dtype))]
    _assert_aligned(_round_trip(address, objs, prefetch), "array")


@pytest.mark.parametrize("elements", [4, BIG], ids=["inline", "arena"])
def test_peeked_arrays_are_aligned(address: str, elements: int) -> None:
    """What peek returns (of a prefetched object too) and the recv after it are aligned."""
    name = _name("align-peek")
    objs = [_odd(), np.arange(elements, dtype=np.float64), _odd(), np.arange(elements, dtype=np.float32)]
    with DataSender(address, dataset_name=name) as sender, DataReceiver(address, dataset_name=name) as receiver:
        for obj in objs:
            sender.send(obj)
        got = []
        for obj in objs:
            peeked = receiver.peek(timeout=30)
            received = receiver.recv(timeout=30)
            np.testing.assert_array_equal(peeked, obj)
            np.testing.assert_array_equal(received, obj)
            got += [peeked, received]
    _assert_aligned(got, "peeked/received")


def _through_two_shards(address: str, name: str, objs: list[Any], full_batch: bool) -> list[Any]:
    """``objs`` sent to a 2-shard channel; what shard 0 received, then what shard 1 did."""
    with DataSender(address, dataset_name=name, num_shards=2, full_batch=full_batch) as sender, DataReceiver(
        address, dataset_name=name, shard_id=0
    ) as rx0, DataReceiver(address, dataset_name=name, shard_id=1) as rx1:
        for obj in objs:
            sender.send(obj)
        return [receiver.recv(timeout=30) for receiver in (rx0, rx1) for _ in objs]


@pytest.mark.parametrize("elements", [4, BIG], ids=["inline", "arena"])
def test_full_batch_arrays_are_aligned_on_every_shard(address: str, elements: int) -> None:
    """With full_batch and 2 shards, the read-only arrays both receivers share are aligned."""
    name = _name("align-fb")
    objs = [_odd(), np.arange(elements, dtype=np.float64), _odd(), np.arange(3 * elements, dtype=np.int16)]
    got = _through_two_shards(address, name, objs, full_batch=True)
    assert not any(a.flags.writeable for a in got)
    _assert_aligned(got, "shared array")


@pytest.mark.parametrize("elements", [3, 100_000], ids=["inline", "arena"])
def test_full_batch_tensors_are_aligned_on_every_shard(address: str, elements: int) -> None:
    """With full_batch, the tensors both receivers get (copies: torch has no read-only tensors) are aligned."""
    torch = _torch()
    name = _name("align-fb-tensor")
    objs = [torch.ones(3, dtype=torch.uint8), torch.arange(elements, dtype=torch.float64),
            torch.ones(3, dtype=torch.uint8), torch.ones(elements, dtype=torch.bfloat16)]
    got = _through_two_shards(address, name, objs, full_batch=True)
    for sent, received in zip(objs * 2, got):
        assert torch.equal(received, sent)
    _assert_aligned(got, "shared tensor")


@pytest.mark.parametrize("elements", [6, 2 * BIG], ids=["inline", "arena"])
def test_row_blocks_of_split_arrays_are_aligned(address: str, elements: int) -> None:
    """With num_shards=2, each shard's row block of an odd- or float-typed array is aligned."""
    name = _name("align-split")
    objs = [np.ones(6, np.uint8), np.arange(elements, dtype=np.float64), np.ones((6, 3), np.uint8)]
    got = _through_two_shards(address, name, objs, full_batch=False)
    _assert_aligned(got, "row block")


# -- DataSystem ------------------------------------------------------------------------------


def _stored_and_got(address: str, objs: list[Any]) -> list[Any]:
    """``objs`` put in the DataSystem one after the other, then each got back (and deleted)."""
    with DataSystem(address) as ds:
        keys = [ds.put(obj) for obj in objs]
        got = [ds.get(key) for key in keys]
        for key in keys:
            ds.delete(key)
    return got


def test_datasystem_get_returns_aligned_arrays(address: str) -> None:
    """DataSystem.get of arrays of 1 byte to 1 MiB, each stored after an odd-sized one, returns them aligned."""
    objs = [obj for nbytes in SIZES for obj in (_odd(), _array(nbytes, np.float64))]
    got = _stored_and_got(address, objs)
    for sent, received in zip(objs, got):
        np.testing.assert_array_equal(received, sent)
    _assert_aligned(got, "got")


def test_datasystem_get_returns_aligned_tensors(address: str) -> None:
    """DataSystem.get of tensors (copies: the stored memory is read-only), small and large, returns them aligned."""
    torch = _torch()
    objs = [obj for n in (3, 1000, 100_000) for obj in (torch.ones(3, dtype=torch.uint8), torch.arange(n, dtype=torch.float32))]
    got = _stored_and_got(address, objs)
    for sent, received in zip(objs, got):
        assert torch.equal(received, sent)
    _assert_aligned(got, "got")


# -- other types -----------------------------------------------------------------------------


def _frame(rows: int) -> pd.DataFrame:
    """One block per column (each dtype differs): blocks and column views are the same buffers."""
    return pd.DataFrame({
        "u8": np.arange(rows, dtype=np.uint8),
        "i16": np.arange(rows, dtype=np.int16),
        "f32": np.arange(rows, dtype=np.float32),
        "f64": np.arange(rows, dtype=np.float64),
        "flag": np.arange(rows) % 3 == 0,
        "when": pd.date_range("2024-01-01", periods=rows, freq="s").to_numpy(),
    })


@pytest.mark.parametrize("rows", [3, BIG], ids=["inline", "arena"])
def test_dataframe_blocks_arrive_aligned(address: str, rows: int) -> None:
    """Each numeric block of a DataFrame sent after an odd-sized array starts aligned."""
    df = _frame(rows)
    got = _round_trip(address, [_odd(), df, _odd(), df])
    for frame in got[1::2]:
        pd.testing.assert_frame_equal(frame, df)
    _assert_aligned(got, "object")


@pytest.mark.parametrize("rows", [3, BIG], ids=["inline", "arena"])
def test_dict_of_arrays_arrives_aligned(address: str, rows: int) -> None:
    """Every column of a dict of arrays of several dtypes arrives aligned."""
    columns = {"u8": np.ones(rows, np.uint8), "f64": np.arange(rows, dtype=np.float64),
               "i16": np.arange(rows, dtype=np.int16), "c128": np.ones(rows, np.complex128)}
    got = _round_trip(address, [_odd(), columns, _odd(), columns])
    for received in got[1::2]:
        assert received.keys() == columns.keys()
        for key, column in columns.items():
            np.testing.assert_array_equal(received[key], column)
    _assert_aligned(got, "object")


@pytest.mark.parametrize("elements", [3, BIG], ids=["inline", "arena"])
def test_list_of_arrays_arrives_aligned(address: str, elements: int) -> None:
    """Every array of a list of odd-sized and float arrays arrives aligned."""
    items = [np.ones(elements, np.uint8), np.arange(elements, dtype=np.float64), np.ones(1, np.uint8),
             np.arange(elements, dtype=np.float32)]
    got = _round_trip(address, [_odd(), items, _odd(), items])
    for received in got[1::2]:
        for item, sent in zip(received, items):
            np.testing.assert_array_equal(item, sent)
    _assert_aligned(got, "object")


@pytest.mark.parametrize("elements", [3, 100_000], ids=["inline", "arena"])
def test_torch_tensors_arrive_aligned(address: str, elements: int) -> None:
    """Torch tensors of several dtypes (bfloat16 too), sent after odd-sized ones, arrive aligned."""
    torch = _torch()
    tensors = [torch.ones(elements, dtype=torch.uint8), torch.arange(elements, dtype=torch.float64),
               torch.ones(elements, dtype=torch.bfloat16), torch.arange(2 * elements, dtype=torch.int32).reshape(elements, 2)]
    objs = [obj for tensor in tensors for obj in (torch.ones(3, dtype=torch.uint8), tensor)]
    got = _round_trip(address, objs)
    for sent, received in zip(objs, got):
        assert isinstance(received, torch.Tensor) and torch.equal(received, sent)
    _assert_aligned(got, "tensor")


@pytest.mark.parametrize("rows", [3, BIG], ids=["inline", "arena"])
def test_arrow_table_buffers_arrive_aligned(address: str, rows: int) -> None:
    """Every buffer of every column of an Arrow table (validity, offsets, data) arrives aligned."""
    table = pa.table({
        "u8": pa.array(np.arange(rows, dtype=np.uint8)),
        "f64": pa.array(np.arange(rows, dtype=np.float64)),
        "nullable": pa.array([None if i % 3 == 0 else i for i in range(rows)], pa.int32()),
        "text": pa.array([f"s{i}" for i in range(rows)]),
    })
    got = _round_trip(address, [_odd(), table, _odd(), table])
    for received in got[1::2]:
        assert isinstance(received, pa.Table) and received.equals(table)
    _assert_aligned(got, "object")


# -- recovery (embedded only: Ray has no broker to restart) ---------------------------------


def test_objects_recovered_after_a_broker_restart_are_aligned(broker: int) -> None:
    """Objects queued when the broker was SIGKILLed, inline and arena sizes after odd-sized
    ones, are aligned when the next broker recovers them and a receiver gets them."""
    name = _name("align-recovered")
    objs = [obj for nbytes in (8, 1000, 60_000, 100_000, MIB) for obj in (_odd(), _array(nbytes, np.float64))]
    sender = DataSender(ADDRESS, dataset_name=name, max_queue_size=len(objs))
    for obj in objs:
        sender.send(obj)
    assert len(sender.get_queue(0)) == len(objs)  # a round trip: the broker has them all
    os.kill(broker, signal.SIGKILL)
    wait_until(lambda: not daemon.pid_alive(broker), 10, "the broker to die")
    sender.close()  # its broker is gone: closing must not fail
    with DataReceiver(ADDRESS, dataset_name=name) as receiver:  # starts a new broker, which recovers
        assert (daemon.status() or {})["pid"] != broker
        got = [receiver.recv(timeout=30) for _ in objs]
    for sent, received in zip(objs, got):
        np.testing.assert_array_equal(received, sent)
    _assert_aligned(got, "recovered array")
