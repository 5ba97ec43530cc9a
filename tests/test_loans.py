"""Loans and send by key (issue 15): ``DataSender.empty`` / ``empty_like`` lend memory of the
store that a send references instead of copying, and ``send_key`` sends a DataSystem object
over its own memory. Embedded backend (one Ray test at the end).

Zero copy is checked by address: a receiver's view lies at the arena offset of the loan (or
of the DataSystem object) the sender filled. Memory going back is checked by polling
``DataSystem.stats()`` with a deadline: a sender's ledger gives loans back at its next call
or on its daemon thread every 50 ms, not at once.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from typing import Any, Iterator

import numpy as np
import pytest

from shmchannel import (
    DataReceiver,
    DataSender,
    DataSystem,
    InvalidArgument,
    ObjectNotFound,
    UnsupportedType,
)
from shmchannel.broker import daemon
from shmchannel.testing import start_process, wait_until

from .conftest import ADDRESS

pytestmark = pytest.mark.timeout(60)  # each takes well under a few seconds; this bounds a hang

MIB = 1 << 20


# -- helpers ------------------------------------------------------------------------------


def _stats() -> Any:
    with DataSystem(ADDRESS) as ds:
        return ds.stats()


def _store_empty() -> bool:
    stats = _stats()
    return stats.used == 0 and stats.objects == 0 and stats.inline_bytes == 0


def _wait_store_empty(what: str, timeout: float = 5.0) -> None:
    """Wait for the store to be empty. Collects garbage cycles first: a pickled send leaves
    its sources in one until the next collection (test_loan_in_pickled_send_goes_back_without_gc
    shows it); the other tests check what they are about, not that."""
    gc.collect()
    wait_until(_store_empty, timeout, f"the store to be empty ({what}); last: {_stats()}")


def _wait_no_objects(what: str, timeout: float = 5.0) -> None:
    """No object left (senders still open keep their slabs in ``used``); cycles collected first."""
    gc.collect()
    wait_until(lambda: _stats().objects == 0, timeout, f"no object left in the store ({what}); last: {_stats()}")


def _address(obj: Any) -> int:
    """Data address of an ndarray, a torch tensor, or an Arrow buffer."""
    if isinstance(obj, np.ndarray):
        return int(obj.__array_interface__["data"][0])
    if hasattr(obj, "data_ptr"):
        return int(obj.data_ptr())
    return int(obj.address)


def _base(endpoint: Any) -> int:
    """Start address of the arena as mapped for this endpoint (a DataSender or DataReceiver)."""
    return int(endpoint._endpoint._client.arena.address_range[0])


def _offset(endpoint: Any, obj: Any) -> int:
    """Arena offset of ``obj``'s data, seen through ``endpoint``'s mapping."""
    return _address(obj) - _base(endpoint)


def _loan_range(sender: DataSender, loan: np.ndarray) -> tuple[int, int]:
    start = _offset(sender, loan)
    return start, start + loan.nbytes


def _inside(receiver: DataReceiver, obj: Any, nbytes: int, span: tuple[int, int]) -> bool:
    start = _offset(receiver, obj)
    return span[0] <= start and start + nbytes <= span[1]


def _fill_store_and_check(check: Any) -> None:
    """Fill every free MiB of the store with DataSystem objects of 0xEE bytes, run ``check``
    (memory wrongly given back would now hold 0xEE), then delete them."""
    keys = []
    with DataSystem(ADDRESS) as ds:
        try:
            junk = np.full(MIB, 0xEE, dtype=np.uint8)
            while ds.stats().free >= 2 * MIB:
                keys.append(ds.put(junk, timeout=5))
            check()
        finally:
            for key in keys:
                ds.delete(key)


@pytest.fixture
def names(request: Any) -> Iterator[Any]:
    """Channel names unique to the test: names("a") -> "loans-<test>-<pid>-a"."""
    stem = f"loans-{request.node.name[:40]}-{os.getpid()}"
    yield lambda suffix="": f"{stem}-{suffix}" if suffix else stem


# -- each type referenced, not copied -----------------------------------------------------


def test_whole_array_is_referenced(broker: int, names: Any) -> None:
    """A filled 2-D loan arrives at the loan's own arena offset, equal and read-only; once
    both sides drop it the store is empty."""
    name = names()
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        loan = sender.empty((512, 256))
        assert loan.shape == (512, 256) and loan.dtype == np.float64 and loan.flags.c_contiguous
        assert loan.flags.writeable
        expected = np.arange(512 * 256, dtype=np.float64).reshape(512, 256)
        loan[:] = expected
        sender.send(loan)
        got = receiver.recv(timeout=10)
        assert type(got) is np.ndarray and got.shape == (512, 256) and got.dtype == np.float64
        assert _offset(receiver, got) == _offset(sender, loan), "the receiver's array is not the loan's memory"
        assert _address(got) == _address(loan)  # one process: one mapping
        np.testing.assert_array_equal(got, expected)
        assert not got.flags.writeable
        del got, loan
        receiver.ack()
        _wait_no_objects("loan and receiver's view dropped")
    _wait_store_empty("both endpoints closed")


def test_row_block_is_referenced(broker: int, names: Any) -> None:
    """A row block of a loan arrives at its own rows' offset in the loan."""
    name = names()
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        loan = sender.empty((1000, 64), np.int32)
        loan[:] = np.arange(64_000, dtype=np.int32).reshape(1000, 64)
        block = loan[100:300]
        sender.send(block)
        got = receiver.recv(timeout=10)
        assert got.shape == (200, 64) and got.dtype == np.int32
        assert _offset(receiver, got) == _offset(sender, loan) + 100 * 64 * 4
        np.testing.assert_array_equal(got, np.arange(6400, 19_200, dtype=np.int32).reshape(200, 64))
        del got, block, loan
        receiver.ack()
    _wait_store_empty("closed")


def test_sharded_array_each_shard_references_its_rows(broker: int, names: Any) -> None:
    """num_shards=2: shard 0 gets the first 500 rows at the loan's offset, shard 1 the next
    500 at the offset of row 500 -- no copy on either."""
    name = names()
    with DataSender(ADDRESS, dataset_name=name, num_shards=2) as sender, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=0) as r0, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=1) as r1:
        loan = sender.empty((1000, 32))
        expected = np.arange(32_000, dtype=np.float64).reshape(1000, 32)
        loan[:] = expected
        sender.send(loan)
        first, second = r0.recv(timeout=10), r1.recv(timeout=10)
        row = 32 * 8
        assert _offset(r0, first) == _offset(sender, loan)
        assert _offset(r1, second) == _offset(sender, loan) + 500 * row
        np.testing.assert_array_equal(first, expected[:500])
        np.testing.assert_array_equal(second, expected[500:])
        assert not first.flags.writeable and not second.flags.writeable
        del loan, first
        r0.ack()
        gc.collect()
        # Shard 1 still holds its rows: they stay intact while the store fills up.
        _fill_store_and_check(lambda: np.testing.assert_array_equal(second, expected[500:]))
        del second
        r1.ack()
    _wait_store_empty("closed")


def test_fortran_order_loan_is_referenced(broker: int, names: Any) -> None:
    """An F-order loan arrives F-ordered at the loan's offset, equal."""
    name = names()
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        loan = sender.empty((300, 200), np.float32, order="F")
        assert loan.flags.f_contiguous and not loan.flags.c_contiguous
        expected = np.asfortranarray(np.arange(60_000, dtype=np.float32).reshape(300, 200))
        loan[:] = expected
        sender.send(loan)
        got = receiver.recv(timeout=10)
        assert got.shape == (300, 200) and got.flags.f_contiguous
        assert _offset(receiver, got) == _offset(sender, loan)
        np.testing.assert_array_equal(got, expected)
        del got, loan
        receiver.ack()
    _wait_store_empty("closed")


def test_torch_tensor_over_loan_is_referenced(broker: int, names: Any) -> None:
    """``torch.from_numpy(loan)`` of 16 MiB is sent without a copy -- the store does not grow
    (only a descriptor in the sender's slab) -- and arrives equal. The receiver's tensor is
    its own copy: torch has no read-only tensors (serialization/tensors.py copies read-only
    memory), so it is not checked to lie in the loan."""
    torch = pytest.importorskip("torch")
    name = names()
    rows = 16 * MIB // (4 * 256)
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(np.zeros(4))  # the sender's slab, granted at its first send
        receiver.recv(timeout=10)
        receiver.ack()
        loan = sender.empty((rows, 256), np.float32)
        loan[:] = np.arange(rows * 256, dtype=np.float32).reshape(rows, 256)
        tensor = torch.from_numpy(loan)
        before = _stats().used
        sender.send(tensor)
        grown = _stats().used - before
        assert grown < MIB, f"the store grew by {grown} bytes: the {loan.nbytes}-byte tensor was copied at send"
        assert not loan.flags.writeable  # the array empty() returned is read-only after the send
        got = receiver.recv(timeout=10)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and tuple(got.shape) == (rows, 256)
        assert torch.equal(got, torch.arange(rows * 256, dtype=torch.float32).reshape(rows, 256))
        del got, tensor, loan
        receiver.ack()
    _wait_store_empty("closed")


def test_dataframe_over_2d_loan_is_referenced(broker: int, names: Any) -> None:
    """A pandas DataFrame built on a 2-D loan (no copy) arrives with its columns inside the loan."""
    pd = pytest.importorskip("pandas")
    name = names()
    rows = 20_000
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        loan = sender.empty((rows, 3), order="F")  # each column one contiguous run
        loan[:] = np.arange(rows * 3, dtype=np.float64).reshape(rows, 3)
        df = pd.DataFrame(loan, columns=["a", "b", "c"], copy=False)
        assert np.shares_memory(df["b"].to_numpy(), loan), "pandas copied the loan (test set-up)"
        expected = pd.DataFrame(np.arange(rows * 3, dtype=np.float64).reshape(rows, 3), columns=["a", "b", "c"])
        span = _loan_range(sender, loan)
        sender.send(df)
        got = receiver.recv(timeout=10)
        assert isinstance(got, pd.DataFrame)
        pd.testing.assert_frame_equal(got, expected)
        for i, column in enumerate("abc"):
            values = got[column].to_numpy()
            assert _offset(receiver, values) == span[0] + i * rows * 8, f"column {column} was copied"
        del got, values, df, loan
        receiver.ack()
    _wait_store_empty("closed")


def test_sharded_dataframe_each_shard_references_its_rows(broker: int, names: Any) -> None:
    """A DataFrame over a C-order 2-D loan, 2 shards: each shard's block is its rows of the
    loan (a C-order row block, transposed: one contiguous run), no copy."""
    pd = pytest.importorskip("pandas")
    name = names()
    rows, cols = 10_000, 3
    with DataSender(ADDRESS, dataset_name=name, num_shards=2) as sender, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=0) as r0, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=1) as r1:
        loan = sender.empty((rows, cols), np.int64)
        expected = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
        loan[:] = expected
        df = pd.DataFrame(loan, columns=["x", "y", "z"], copy=False)
        assert np.shares_memory(df["y"].to_numpy(), loan), "pandas copied the loan (test set-up)"
        span = _loan_range(sender, loan)
        sender.send(df)
        parts = [r0.recv(timeout=10), r1.recv(timeout=10)]
        for shard, (part, receiver) in enumerate(zip(parts, (r0, r1))):
            lo = shard * rows // 2
            np.testing.assert_array_equal(part.to_numpy(), expected[lo: lo + rows // 2])
            for i, column in enumerate("xyz"):
                values = part[column].to_numpy()
                assert _offset(receiver, values) == span[0] + (lo * cols + i) * 8, f"shard {shard}: {column} copied"
            del values
        del parts, part, df, loan
        r0.ack()
        r1.ack()
    _wait_store_empty("closed")


def test_dict_of_loan_columns_is_referenced(broker: int, names: Any) -> None:
    """A dict of columns from two loans (and a small list) arrives with each array column at
    its loan's offset."""
    name = names()
    n = 50_000
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        a = sender.empty(n, np.float64)
        b = sender.empty_like(a, dtype=np.int16)
        a[:] = np.linspace(0.0, 1.0, n)
        b[:] = np.arange(n) % 1000
        sender.send({"a": a, "b": b})
        got = receiver.recv(timeout=10)
        assert set(got) == {"a", "b"}
        assert _offset(receiver, got["a"]) == _offset(sender, a)
        assert _offset(receiver, got["b"]) == _offset(sender, b)
        np.testing.assert_array_equal(got["a"], np.linspace(0.0, 1.0, n))
        np.testing.assert_array_equal(got["b"], (np.arange(n) % 1000).astype(np.int16))
        assert not a.flags.writeable and not b.flags.writeable
        del got, a, b
        receiver.ack()
    _wait_store_empty("closed")


def test_sharded_dict_of_loan_columns(broker: int, names: Any) -> None:
    """A dict of loan columns split over 2 shards: each shard's column is its rows of the loan."""
    name = names()
    n = 40_000
    with DataSender(ADDRESS, dataset_name=name, num_shards=2) as sender, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=0) as r0, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=1) as r1:
        col = sender.empty(n, np.uint32)
        col[:] = np.arange(n, dtype=np.uint32)
        sender.send({"c": col})
        g0, g1 = r0.recv(timeout=10), r1.recv(timeout=10)
        assert _offset(r0, g0["c"]) == _offset(sender, col)
        assert _offset(r1, g1["c"]) == _offset(sender, col) + (n // 2) * 4
        np.testing.assert_array_equal(g0["c"], np.arange(n // 2, dtype=np.uint32))
        np.testing.assert_array_equal(g1["c"], np.arange(n // 2, n, dtype=np.uint32))
        del g0, g1, col
        r0.ack()
        r1.ack()
    _wait_store_empty("closed")


def test_arrow_table_over_loan_columns_is_referenced(broker: int, names: Any) -> None:
    """A pyarrow Table whose columns are zero-copy arrays over two loans arrives with its
    value buffers inside those loans."""
    pa = pytest.importorskip("pyarrow")
    name = names()
    n = 30_000
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        x = sender.empty(n, np.float64)
        k = sender.empty(n, np.int64)
        x[:] = np.arange(n) * 0.5
        k[:] = np.arange(n) * 3
        table = pa.table({"x": pa.array(x), "k": pa.array(k)})
        assert table.column("x").chunk(0).buffers()[1].address == _address(x), "pyarrow copied (test set-up)"
        sender.send(table)
        got = receiver.recv(timeout=10)
        assert isinstance(got, pa.Table)
        assert got.equals(pa.table({"x": pa.array(np.arange(n) * 0.5), "k": pa.array(np.arange(n) * 3)}))
        for column, loan in (("x", x), ("k", k)):
            (chunk,) = got.column(column).chunks
            assert _offset(receiver, chunk.buffers()[1]) == _offset(sender, loan), f"column {column} was copied"
        del got, chunk, table, x, k, loan
        receiver.ack()
    _wait_store_empty("closed")


def test_sharded_arrow_table_over_loan_references_its_rows(broker: int, names: Any) -> None:
    """A pyarrow Table over a loan, 2 shards: each shard's rows are read where they lie in
    the loan (pyarrow keeps a slice's buffer whole, with the slice's offset)."""
    pa = pytest.importorskip("pyarrow")
    name = names()
    n = 40_000
    with DataSender(ADDRESS, dataset_name=name, num_shards=2) as sender, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=0) as r0, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=1) as r1:
        x = sender.empty(n, np.int64)
        x[:] = np.arange(n)
        sender.send(pa.table({"x": pa.array(x)}))
        for shard, receiver in enumerate((r0, r1)):
            got = receiver.recv(timeout=10)
            (chunk,) = got.column("x").chunks
            assert chunk.to_pylist()[:3] == [shard * n // 2, shard * n // 2 + 1, shard * n // 2 + 2]
            assert got.equals(pa.table({"x": pa.array(np.arange(shard * n // 2, (shard + 1) * n // 2))}))
            rows_at = _offset(receiver, chunk.buffers()[1]) + chunk.offset * 8
            assert rows_at == _offset(sender, x) + shard * (n // 2) * 8, f"shard {shard} was copied"
            del got, chunk
        del x
    _wait_store_empty("closed")


# -- read-only after send -----------------------------------------------------------------


def test_loan_is_read_only_after_send(broker: int, names: Any) -> None:
    """After a send of a row block, the block and the array empty() returned are read-only
    (writing raises ValueError); the receiver's view is read-only too."""
    name = names()
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        loan = sender.empty((100, 10), np.int64)
        loan[:] = 7
        block = loan[10:20]
        sender.send(block)
        assert not block.flags.writeable and not loan.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            loan[0, 0] = 1
        with pytest.raises(ValueError, match="read-only"):
            block[0] = 1
        got = receiver.recv(timeout=10)
        assert not got.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            got[0, 0] = 1
        assert (got == 7).all() and (loan == 7).all()
        del got, block, loan
        receiver.ack()
    _wait_store_empty("closed")


# -- memory going back ----------------------------------------------------------------------


def test_unsent_loan_dropped_goes_back(broker: int, names: Any) -> None:
    """A loan never sent counts in the store while held, and goes back once dropped, with
    no further call on the sender (its daemon thread looks)."""
    with DataSender(ADDRESS, dataset_name=names()) as sender:
        loan = sender.empty(4 * MIB, np.uint8)
        loan[:] = 1
        view = loan[MIB:]
        stats = _stats()
        assert stats.objects == 1 and stats.used >= 4 * MIB
        del loan
        gc.collect()
        assert _stats().objects == 1, "a view of the loan is still alive: the loan must stay"
        del view
        _wait_store_empty("unsent loan dropped, sender still open")


@pytest.mark.parametrize("kind", ["ndarray", "dict", "dataframe", "list"])
def test_loan_in_pickled_send_goes_back_without_gc(broker: int, names: Any, kind: str) -> None:
    """A loan sent inside a dict, a DataFrame or a list (pickled, unlike a bare array) goes
    back once the sender's arrays are dropped and the receiver released it -- by reference
    counting, without waiting for Python's cycle collector (disabled here so that the
    outcome does not depend on when it would run)."""
    pd = pytest.importorskip("pandas")
    name = names(kind)
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        gc.collect()
        gc.disable()
        try:
            loan = sender.empty(MIB)
            loan[:] = 3.0
            obj = {"ndarray": lambda: loan, "dict": lambda: {"c": loan},
                   "dataframe": lambda: pd.DataFrame({"c": loan}, copy=False), "list": lambda: [loan]}[kind]()
            sender.send(obj)
            del obj, loan
            got = receiver.recv(timeout=10)
            del got
            receiver.ack()
            wait_until(lambda: _stats().objects == 0, 3,
                       f"the loan of a sent {kind} to go back with no reference left to it; last: {_stats()}")
        finally:
            gc.enable()
    _wait_store_empty("closed")


def test_unsent_loan_outlives_close(broker: int, names: Any) -> None:
    """A loan still held at close() keeps its contents (its memory is not handed to anyone
    else, however full the store gets) and goes back once dropped."""
    sender = DataSender(ADDRESS, dataset_name=names())
    loan = sender.empty((2 * MIB,), np.int32)
    expected = np.arange(2 * MIB, dtype=np.int32)
    loan[:] = expected
    sender.close()
    assert loan.flags.writeable  # never sent
    loan[0] = 42
    expected[0] = 42
    _fill_store_and_check(lambda: np.testing.assert_array_equal(loan, expected))
    assert _stats().objects == 1
    del loan
    _wait_store_empty("loan dropped after close")


@pytest.mark.parametrize("drop_loan", ["before_recv", "after_recv"])
def test_sent_loan_survives_sender_close(broker: int, names: Any, drop_loan: str) -> None:
    """A sender sends a loan and closes before the receiver reads it: the receiver gets it
    intact, and the store is empty once the loan (before or after the receipt) and the
    received view are dropped."""
    name = names()
    sender = DataSender(ADDRESS, dataset_name=name)
    receiver = DataReceiver(ADDRESS, dataset_name=name)
    try:
        loan = sender.empty(3 * MIB // 8)
        expected = np.arange(3 * MIB // 8, dtype=np.float64)
        loan[:] = expected
        address = _address(loan)
        sender.send(loan)
        sender.close()
        if drop_loan == "before_recv":
            del loan
            gc.collect()
            _fill_store_and_check(lambda: None)  # memory given back too early would be overwritten
        got = receiver.recv(timeout=10)
        assert _address(got) == address
        np.testing.assert_array_equal(got, expected)
        if drop_loan == "after_recv":
            del got
            receiver.ack()
            gc.collect()
            _fill_store_and_check(lambda: np.testing.assert_array_equal(loan, expected))
            del loan
        else:
            del got
            receiver.ack()
    finally:
        sender.close()  # (already closed unless something failed first)
        receiver.close()
    _wait_store_empty("sender closed, everything dropped")


def test_loan_sent_twice_to_same_channel(broker: int, names: Any) -> None:
    """The same loan sent twice arrives twice over the same memory; the first receipt
    released, the second is intact; all released, the store is empty."""
    name = names()
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        loan = sender.empty(MIB // 4, np.float64)
        loan[:] = np.arange(MIB // 4)
        sender.send(loan)
        sender.send(loan)  # read-only now: sending it again is fine
        sender.send(loan[:10])
        first = receiver.recv(timeout=10)
        second = receiver.recv(timeout=10)
        assert _address(first) == _address(second) == _address(loan)
        del first, loan
        third = receiver.recv(timeout=10)  # acknowledges the first two
        np.testing.assert_array_equal(third, np.arange(10, dtype=np.float64))
        gc.collect()
        _fill_store_and_check(lambda: np.testing.assert_array_equal(second, np.arange(MIB // 4, dtype=np.float64)))
        del second, third
        receiver.ack()
    _wait_store_empty("closed")


def test_many_loans_cycle_without_growth(broker: int, names: Any) -> None:
    """A stream of 40 loans of 1 MiB, each received and dropped: nothing accumulates."""
    name = names()
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        for i in range(40):
            loan = sender.empty(MIB // 8)
            loan[:] = i
            sender.send(loan)
            del loan
            got = receiver.recv(timeout=10)
            assert got[0] == i and got[-1] == i
            del got
        receiver.ack()
        _wait_no_objects("every loan released")
        assert _stats().used < 64 * MIB
    _wait_store_empty("closed")


def test_loan_in_use_is_not_lent_again(broker: int, names: Any) -> None:
    """empty() may hand out a loan again once nothing uses it (kept a while for reuse), but
    never one a receiver still views, nor one a view of the sender's own keeps alive: the
    new array's memory overlaps neither, and writing it changes neither."""
    name = names()
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sent = sender.empty(MIB, np.uint8)
        sent[:] = 1
        sender.send(sent)
        kept = sender.empty(MIB, np.uint8)
        kept[:] = 2
        own_view = kept[10:20]
        del sent, kept
        got = receiver.recv(timeout=10)  # viewed, not acknowledged
        gc.collect()
        for i in range(3):
            fresh = sender.empty(MIB, np.uint8)
            assert not np.shares_memory(fresh, got), "a loan a receiver views was lent again"
            assert not np.shares_memory(fresh, own_view), "a loan the sender's own view keeps was lent again"
            fresh[:] = 0xAA
            assert (got == 1).all() and (own_view == 2).all()
            del fresh
            time.sleep(0.12)  # a few of the ledger's looks: a wrong one would have marked them idle
        del got, own_view
        receiver.ack()
        gc.collect()
        # Now both may be reused: a new loan of the size works and sends whatever memory it has.
        again = sender.empty(MIB, np.uint8)
        again[:] = 3
        sender.send(again)
        assert (receiver.recv(timeout=10) == 3).all()
        del again
    _wait_store_empty("closed")


# -- a sender killed while it holds loans ----------------------------------------------------

KILLED_ROWS = 64 * 1024  # rows of 8 float64: 4 MiB per loan


def _lend_and_hang(name: str, num_shards: int, out: Any) -> None:
    """Send three filled loans (value i), fill a fourth and keep it unsent, report each
    loan's arena offset, then wait to be killed."""
    import time

    sender = DataSender(ADDRESS, dataset_name=name, num_shards=num_shards)
    base = _base(sender)
    offsets = []
    kept = []
    for i in range(3):
        loan = sender.empty((KILLED_ROWS, 8))
        loan[:] = i
        sender.send(loan)
        offsets.append(_address(loan) - base)
        kept.append(loan)  # sent and still viewed by the sender when it dies
    unsent = sender.empty((KILLED_ROWS, 8))
    unsent[:] = 99
    out.put(offsets)
    while True:
        time.sleep(1)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_sender_killed_holding_loans_leaks_nothing(broker: int, names: Any, num_shards: int) -> None:
    """SIGKILL a sender holding three sent loans (not yet received) and an unsent one: the
    receivers get the three intact, at the loans' offsets, even with the store filled
    meanwhile; once they are consumed the store is empty."""
    import multiprocessing

    name = names(str(num_shards))
    out = multiprocessing.get_context("spawn").Queue()
    proc = start_process(_lend_and_hang, name, num_shards, out)
    receivers: list[DataReceiver] = []
    try:
        offsets = out.get(timeout=30)
        receivers = [DataReceiver(ADDRESS, dataset_name=name, shard_id=s) for s in range(num_shards)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        wait_until(lambda: not any(c["sender"] for c in (daemon.status() or {}).get("channels", [])
                                   if c["dataset_name"] == name), 10, "the broker to notice the dead sender")
        got = [[r.recv(timeout=10) for r in receivers] for _ in range(3)]

        def check() -> None:
            rows = KILLED_ROWS // num_shards
            for i, parts in enumerate(got):
                for shard, (part, receiver) in enumerate(zip(parts, receivers)):
                    assert part.shape == (rows, 8)
                    assert (part == i).all(), f"object {i} shard {shard} changed"
                    assert _offset(receiver, part) == offsets[i] + shard * rows * 8 * 8, "copied, not referenced"

        check()
        _fill_store_and_check(check)  # memory of the dead sender's loans is not handed out again
        del got
        for r in receivers:
            r.ack()
        _wait_no_objects("every object consumed after the sender was killed")
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        for r in receivers:
            r.close()
    _wait_store_empty("receivers closed after the sender was killed")


def _lend_one_and_hang(name: str, out: Any) -> None:
    import time

    sender = DataSender(ADDRESS, dataset_name=name)
    loan = sender.empty(MIB, np.uint8)
    loan[:] = 5
    sender.send(loan)
    out.put(True)
    while True:
        time.sleep(1)


def test_sender_killed_while_receiver_holds_loan(broker: int, names: Any) -> None:
    """A receiver holding the view of a loan when its sender is SIGKILLed keeps it intact
    (however full the store gets); dropping it then empties the store."""
    import multiprocessing

    name = names()
    out = multiprocessing.get_context("spawn").Queue()
    proc = start_process(_lend_one_and_hang, name, out)
    try:
        assert out.get(timeout=30)
        with DataReceiver(ADDRESS, dataset_name=name) as receiver:
            got = receiver.recv(timeout=10)
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            wait_until(lambda: not any(c["sender"] for c in (daemon.status() or {}).get("channels", [])
                                       if c["dataset_name"] == name), 10, "the broker to notice the dead sender")
            _fill_store_and_check(lambda: np.testing.assert_array_equal(got, np.full(MIB, 5, np.uint8)))
            del got
            receiver.ack()
            _wait_no_objects("the held view dropped")
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    _wait_store_empty("receiver closed")


# -- send_key -------------------------------------------------------------------------------


def test_send_key_to_two_channels_holds_memory_once(broker: int, names: Any) -> None:
    """One 16 MiB DataSystem object sent by key to a 2-shard channel and a 1-shard one: the
    store grows by far less than its size, every receiver views the object's own memory,
    the key deleted right after the sends; the memory stays until the last receiver
    releases it, then the store is empty."""
    rows = 16 * MIB // (8 * 16)
    data = np.arange(rows * 16, dtype=np.float64).reshape(rows, 16)
    with DataSystem(ADDRESS) as ds, \
            DataSender(ADDRESS, dataset_name=names("train"), num_shards=2) as train, \
            DataSender(ADDRESS, dataset_name=names("eval")) as evaluate, \
            DataReceiver(ADDRESS, dataset_name=names("train"), shard_id=0) as t0, \
            DataReceiver(ADDRESS, dataset_name=names("train"), shard_id=1) as t1, \
            DataReceiver(ADDRESS, dataset_name=names("eval")) as ev:
        for sender, receivers in ((train, (t0, t1)), (evaluate, (ev,))):  # each sender gets its slab
            sender.send(np.zeros((2, 4)))
            for r in receivers:
                r.recv(timeout=10)
                r.ack()
        key = ds.put(data)
        stored = ds.get(key)
        key_offset = _address(stored) - _base(train)  # get views the store (one mapping per process)
        del stored
        gc.collect()
        before = ds.stats().used
        train.send_key(key)
        evaluate.send_key(key)
        ds.delete(key)
        grown = ds.stats().used - before
        assert grown < MIB, f"the store grew by {grown} bytes for a {data.nbytes}-byte object sent twice"
        first, second, whole = t0.recv(timeout=10), t1.recv(timeout=10), ev.recv(timeout=10)
        np.testing.assert_array_equal(first, data[: rows // 2])
        np.testing.assert_array_equal(second, data[rows // 2:])
        np.testing.assert_array_equal(whole, data)
        assert _offset(ev, whole) == key_offset, "the eval channel's object is a copy"
        assert _offset(t0, first) == key_offset
        assert _offset(t1, second) == key_offset + (rows // 2) * 16 * 8
        assert not whole.flags.writeable
        del first, whole
        t0.ack()
        ev.ack()
        gc.collect()
        # The key is deleted and two of three receipts are released: shard 1's rows stay.
        _fill_store_and_check(lambda: np.testing.assert_array_equal(second, data[rows // 2:]))
        del second
        t1.ack()
        _wait_no_objects("every receiver released the object and its key was deleted")
    _wait_store_empty("closed")


def test_send_key_then_delete_before_consume_with_sender_closed(broker: int, names: Any) -> None:
    """send_key, delete the key, close the sender -- all before the receiver reads: it gets
    the object intact; consumed, the store is empty."""
    name = names()
    data = np.arange(MIB, dtype=np.int64)
    with DataSystem(ADDRESS) as ds:
        key = ds.put(data)
        sender = DataSender(ADDRESS, dataset_name=name)
        with DataReceiver(ADDRESS, dataset_name=name) as receiver:
            sender.send_key(key)
            ds.delete(key)
            sender.close()
            assert key not in ds
            _fill_store_and_check(lambda: None)  # memory freed too early would be overwritten now
            got = receiver.recv(timeout=10)
            np.testing.assert_array_equal(got, data)
            del got
            receiver.ack()
    _wait_store_empty("the object consumed, its key deleted")


def test_send_key_dataframe_two_shards_references_its_rows(broker: int, names: Any) -> None:
    """A DataFrame under a key, sent to 2 shards: each shard's numeric column is its rows of
    the stored object, its string column arrives equal (pickled: a copy)."""
    pd = pytest.importorskip("pandas")
    name = names()
    n = 100_000
    df = pd.DataFrame({"a": np.arange(n, dtype=np.float64), "s": ["p", "q"] * (n // 2)})
    with DataSystem(ADDRESS) as ds, DataSender(ADDRESS, dataset_name=name, num_shards=2) as sender, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=0) as r0, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=1) as r1:
        key = ds.put(df)
        stored = ds.get(key)
        column_at = _address(stored["a"].to_numpy()) - _base(sender)
        del stored
        sender.send_key(key)
        ds.delete(key)
        for shard, receiver in enumerate((r0, r1)):
            part = receiver.recv(timeout=10)
            rows = slice(shard * n // 2, (shard + 1) * n // 2)
            pd.testing.assert_frame_equal(part, df.iloc[rows], check_index_type=False)
            assert _offset(receiver, part["a"].to_numpy()) == column_at + rows.start * 8, f"shard {shard} copied"
            del part
        r0.ack()
        r1.ack()
        _wait_no_objects("consumed, key deleted")
    _wait_store_empty("closed")


def test_send_key_of_small_inline_object_is_copied(broker: int, names: Any) -> None:
    """An object small enough to be inline at the broker is sent by key as a copy; the key
    stays until deleted."""
    name = names()
    with DataSystem(ADDRESS) as ds, DataSender(ADDRESS, dataset_name=name) as sender, \
            DataReceiver(ADDRESS, dataset_name=name) as receiver:
        key = ds.put({"lr": 0.1, "rows": np.arange(10)})
        sender.send_key(key)
        got = receiver.recv(timeout=10)
        assert got["lr"] == 0.1
        np.testing.assert_array_equal(got["rows"], np.arange(10))
        assert key in ds
        ds.delete(key)
        del got
        receiver.ack()
        _wait_no_objects("consumed and deleted")
    _wait_store_empty("closed")


def test_send_key_same_key_twice_same_channel(broker: int, names: Any) -> None:
    """The same key sent twice on one channel arrives twice over the same memory."""
    name = names()
    data = np.arange(MIB // 2, dtype=np.float32)
    with DataSystem(ADDRESS) as ds, DataSender(ADDRESS, dataset_name=name) as sender, \
            DataReceiver(ADDRESS, dataset_name=name) as receiver:
        key = ds.put(data)
        sender.send_key(key)
        sender.send_key(key)
        ds.delete(key)
        a = receiver.recv(timeout=10)
        b = receiver.recv(timeout=10)
        assert _address(a) == _address(b)
        np.testing.assert_array_equal(a, data)
        np.testing.assert_array_equal(b, data)
        del a, b
        receiver.ack()
        _wait_no_objects("both consumed")
    _wait_store_empty("closed")


def test_send_key_unknown_key_raises_key_error(broker: int, names: Any) -> None:
    with DataSender(ADDRESS, dataset_name=names()) as sender:
        with pytest.raises(KeyError, match="no-such-key") as info:
            sender.send_key("no-such-key")
        assert isinstance(info.value, ObjectNotFound)
        assert sender.get_queue(0) == []
    _wait_store_empty("closed")


@pytest.mark.parametrize("size", [10, 100_000], ids=["inline", "arena"])
def test_send_key_list_with_two_shards_raises_type_error(broker: int, names: Any, size: int) -> None:
    """A list under a key cannot be split by send_key into 2 shards: TypeError naming the
    key, nothing queued, nothing held; with full_batch it is sent."""
    name = names()
    with DataSystem(ADDRESS) as ds, DataSender(ADDRESS, dataset_name=name, num_shards=2) as sender:
        key = ds.put(list(range(size)))
        with pytest.raises(TypeError, match=key) as info:
            sender.send_key(key)
        assert isinstance(info.value, UnsupportedType)
        assert sender.get_queue(None) == {0: [], 1: []}
        ds.delete(key)
        _wait_no_objects("the failed send_key held nothing")
    with DataSystem(ADDRESS) as ds, \
            DataSender(ADDRESS, dataset_name=names("full"), num_shards=2, full_batch=True) as sender, \
            DataReceiver(ADDRESS, dataset_name=names("full"), shard_id=0) as r0, \
            DataReceiver(ADDRESS, dataset_name=names("full"), shard_id=1) as r1:
        key = ds.put(list(range(size)))
        sender.send_key(key)
        ds.delete(key)
        assert r0.recv(timeout=10) == list(range(size)) == r1.recv(timeout=10)
        r0.ack()
        r1.ack()
    _wait_store_empty("closed")


@pytest.mark.parametrize("key", [123, None, b"bytes", ""], ids=["int", "none", "bytes", "empty"])
def test_send_key_bad_key_type_raises_value_error(broker: int, names: Any, key: Any) -> None:
    with DataSender(ADDRESS, dataset_name=names()) as sender:
        with pytest.raises(ValueError, match="^key ") as info:
            sender.send_key(key)
        assert isinstance(info.value, InvalidArgument)
    _wait_store_empty("closed")


# -- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"shape": -1}, "shape"),
        ({"shape": "x"}, "shape"),
        ({"shape": (2, -1)}, "shape"),
        ({"shape": (2.0, 3)}, "shape"),
        ({"shape": True}, "shape"),
        ({"shape": 4, "dtype": object}, "dtype"),
        ({"shape": 4, "dtype": "nonsense"}, "dtype"),
        ({"shape": 4, "dtype": [("a", "f8"), ("b", "O")]}, "dtype"),
        ({"shape": 4, "order": "Z"}, "order"),
        ({"shape": 4, "timeout": -1}, "timeout"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, str) else v,
)
def test_empty_rejects_bad_arguments(broker: int, names: Any, kwargs: dict[str, Any], param: str) -> None:
    """Bad shape, dtype, order or timeout: ValueError (InvalidArgument) naming the parameter;
    nothing is lent."""
    with DataSender(ADDRESS, dataset_name=names()) as sender:
        with pytest.raises(ValueError, match=f"^{param} ") as info:
            sender.empty(**kwargs)
        assert isinstance(info.value, InvalidArgument)
        assert _stats().objects == 0
    _wait_store_empty("closed")


def test_empty_like_rejects_non_array(broker: int, names: Any) -> None:
    with DataSender(ADDRESS, dataset_name=names()) as sender:
        with pytest.raises(ValueError, match="^array ") as info:
            sender.empty_like([1, 2, 3])
        assert isinstance(info.value, InvalidArgument)
    _wait_store_empty("closed")


def test_empty_on_a_full_store(small_store: int, names: Any) -> None:
    """On a 4 MiB store: a loan larger than the store is StoreFull at once; one that does
    not fit beside a held loan is StoreFullTimeout after its timeout; once the held loan is
    dropped (kept by the sender for reuse) an empty() of another size gets the room."""
    from shmchannel import StoreFull, StoreFullTimeout

    with DataSender(ADDRESS, dataset_name=names()) as sender:
        with pytest.raises(StoreFull) as info:
            sender.empty(5 * MIB, np.uint8)
        assert not isinstance(info.value, StoreFullTimeout)
        held = sender.empty(3 * MIB, np.uint8)
        held[:] = 1
        with pytest.raises(StoreFullTimeout):
            sender.empty(2 * MIB, np.uint8, timeout=0.2)
        assert (held == 1).all()
        del held
        gc.collect()
        time.sleep(0.12)  # the ledger has seen it unused: kept for an empty() of its size
        other = sender.empty(2 * MIB, np.uint8, timeout=5)
        other[:] = 2
        del other
    _wait_store_empty("closed")


def test_empty_on_closed_sender_raises(broker: int, names: Any) -> None:
    from shmchannel import EndpointClosed

    sender = DataSender(ADDRESS, dataset_name=names())
    sender.close()
    with pytest.raises(EndpointClosed):
        sender.empty(10)
    with pytest.raises(EndpointClosed):
        sender.send_key("k")
    _wait_store_empty("closed")


# -- empty / empty_like shapes, dtypes and orders --------------------------------------------


def test_empty_shapes_and_dtypes(broker: int, names: Any) -> None:
    """empty takes an int, a tuple, a list, numpy ints and dtype spellings, 0-d and 0-size
    shapes; a structured loan sends and arrives equal."""
    name = names()
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        assert sender.empty(5).shape == (5,)
        assert sender.empty(np.int64(3), "i2").dtype == np.int16
        assert sender.empty((2, 3, 4), np.dtype("<u4")).shape == (2, 3, 4)
        assert sender.empty([4, 5], "complex64").dtype == np.complex64
        assert sender.empty((), np.float32).shape == ()
        structured = sender.empty(4, [("a", "<f8"), ("b", "<i4")])
        structured["a"] = 1.5
        structured["b"] = 7
        sender.send(structured)
        got = receiver.recv(timeout=10)
        assert got.dtype == structured.dtype and (got["a"] == 1.5).all() and (got["b"] == 7).all()
        nothing = sender.empty((0, 3))
        assert nothing.shape == (0, 3) and nothing.size == 0
        del got, structured, nothing
        receiver.ack()
    _wait_store_empty("closed")


@pytest.mark.parametrize(
    ("template", "kwargs", "shape", "dtype", "f_order"),
    [
        (np.zeros((6, 4), dtype=np.int32), {}, (6, 4), np.int32, False),
        (np.asfortranarray(np.zeros((6, 4))), {}, (6, 4), np.float64, True),
        (np.asfortranarray(np.zeros((6, 4))), {"order": "C"}, (6, 4), np.float64, False),
        (np.zeros((6, 4)), {"order": "F"}, (6, 4), np.float64, True),
        (np.asfortranarray(np.zeros((6, 4))), {"order": "A"}, (6, 4), np.float64, True),
        (np.zeros((6, 4))[:, ::2], {}, (6, 2), np.float64, False),  # neither contiguous: C
        (np.zeros((6, 4)), {"dtype": np.uint8}, (6, 4), np.uint8, False),
        (np.zeros((6, 4)), {"shape": (3, 5)}, (3, 5), np.float64, False),
        (np.asfortranarray(np.zeros((6, 4))), {"dtype": "f4", "shape": (2, 7)}, (2, 7), np.float32, True),
    ],
)
def test_empty_like_order_dtype_shape(broker: int, names: Any, template: np.ndarray, kwargs: dict[str, Any],
                                      shape: tuple[int, ...], dtype: Any, f_order: bool) -> None:
    """empty_like follows numpy.empty_like: order K keeps F for an F-contiguous template,
    dtype and shape override; the loan sends like any other and arrives in its order."""
    name = names()
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        out = sender.empty_like(template, **kwargs)
        reference = np.empty_like(template, **kwargs)
        assert out.shape == shape == reference.shape
        assert out.dtype == np.dtype(dtype) == reference.dtype
        assert out.flags.f_contiguous == f_order == (reference.flags.f_contiguous and not reference.flags.c_contiguous)
        assert out.flags.writeable
        out[...] = np.arange(out.size).reshape(out.shape)
        sender.send(out)
        got = receiver.recv(timeout=10)
        assert got.dtype == out.dtype and got.flags.f_contiguous == f_order
        assert _address(got) == _address(out)
        np.testing.assert_array_equal(got, np.arange(out.size).reshape(out.shape))
        del got, out
        receiver.ack()
    _wait_store_empty("closed")


# -- the Ray backend ---------------------------------------------------------------------------


def test_ray_backend_accepts_empty_and_send_key(ray_two_nodes: str, names: Any) -> None:
    """On Ray, empty is a plain writable array, empty_like keeps F order, and send_key
    fetches and copies; a send of either arrives equal."""
    name = names()
    with DataSystem(ray_two_nodes) as ds, DataSender(ray_two_nodes, dataset_name=name) as sender, \
            DataReceiver(ray_two_nodes, dataset_name=name) as receiver:
        loan = sender.empty((64, 8), np.int32)
        assert loan.flags.writeable and loan.flags.c_contiguous
        assert sender.empty_like(np.asfortranarray(np.zeros((3, 2)))).flags.f_contiguous
        loan[:] = np.arange(512, dtype=np.int32).reshape(64, 8)
        sender.send(loan)
        np.testing.assert_array_equal(receiver.recv(timeout=30), np.arange(512, dtype=np.int32).reshape(64, 8))
        key = ds.put(np.arange(1000.0))
        sender.send_key(key)
        ds.delete(key)
        np.testing.assert_array_equal(receiver.recv(timeout=30), np.arange(1000.0))
        with pytest.raises(KeyError):
            sender.send_key("no-such-key")
        with pytest.raises(ValueError):
            sender.empty((2, -1))
