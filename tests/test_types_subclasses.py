"""numpy.ndarray subclasses keep zero-copy (issue 11, item 5): numpy pickles every subclass
in-band, so a memmap, recarray or masked array used to arrive as a private copy. Now their
data (and a masked array's mask) goes out-of-band and arrives as a view of the received
buffer, with the class each one must have.

The codec tests deserialize from a numpy buffer this module owns and check that what comes
back shares its memory; the channel tests send through a real broker and check that the
data lies in the broker's shared-memory file (as test_torch.py does, by the memory map).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shmchannel import DataReceiver, DataSender, config
from shmchannel.serialization import deserialize, serialize
from shmchannel.store.blob import plan_blob, read_blob, write_blob
from shmchannel.testing import mapped_file

from .conftest import ADDRESS


def _round_trip(obj: Any, read_only: bool = False) -> tuple[Any, np.ndarray]:
    """``obj`` through serialize, a blob in a fresh buffer starting on a 64-byte boundary (as
    the store's blobs do; test_types_codec's bytearray has no such start), and deserialize
    (from a read-only view if asked): the object and the buffer."""
    s = serialize(obj)
    plan = plan_blob(len(s.header), [int(b.nbytes) for b in s.buffers])
    backing = np.full(plan.size + 64, 0xA5, np.uint8)  # reused shared memory is not zeroed
    buf = backing[-backing.ctypes.data % 64 :][: plan.size]
    write_blob(memoryview(buf), plan, s.header, s.buffers)
    view = memoryview(buf)
    return deserialize(*read_blob(view.toreadonly() if read_only else view)), buf


def _in_arena(array: np.ndarray, broker: int) -> bool:
    """Whether the data of ``array`` lies in the shared-memory file of broker ``broker``."""
    return mapped_file(array.__array_interface__["data"][0]) in {str(p) for p in config.our_shm_entries(broker)}


#: np.matrix() warns that matrices are not recommended (receiving one does not: view() does not warn).
MATRIX_WARNING = "ignore:the matrix subclass is not the recommended way:PendingDeprecationWarning"


class Tagged(np.ndarray):
    """A subclass keeping ndarray's pickling; ``tag`` comes from ``__array_finalize__``."""

    def __array_finalize__(self, obj: Any) -> None:
        self.tag = getattr(obj, "tag", "finalized")


class Pickled(np.ndarray):
    """A subclass with pickling of its own: it carries ``tag`` in its state."""

    def __reduce__(self) -> Any:
        rebuild, args, state = super().__reduce__()  # type: ignore[misc]
        return rebuild, args, (state, self.tag)

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state[0])
        self.tag = state[1]


# -- the codec, from a buffer this test owns -----------------------------------------------


def test_read_only_memmap_arrives_as_plain_ndarray_view(tmp_path: Path) -> None:
    """A memmap opened read-only (np.load mmap_mode="r") arrives as a plain ndarray viewing the
    buffer, its data out-of-band (not in the pickle stream)."""
    np.save(tmp_path / "features.npy", np.arange(200_000 * 10, dtype=np.float64).reshape(200_000, 10))
    features = np.load(tmp_path / "features.npy", mmap_mode="r")
    assert len(serialize(features).header) < 1024
    got, buf = _round_trip(features)
    assert type(got) is np.ndarray and got.dtype == features.dtype
    assert np.array_equal(got, features) and np.shares_memory(got, buf)
    del features


def test_recarray_arrives_as_recarray_view() -> None:
    """A recarray arrives as a recarray over the buffer: dtype np.record kept, fields readable as attributes."""
    rec = np.rec.fromarrays([np.arange(500_000), np.arange(500_000) * 0.5], names="id,score")
    got, buf = _round_trip(rec)
    assert type(got) is np.recarray and got.dtype == rec.dtype and got.dtype.type is np.record
    assert np.array_equal(got.score, rec.score) and np.array_equal(got.id, rec.id)
    assert np.shares_memory(got, buf)


def test_masked_array_keeps_mask_fill_value_and_hard_mask_as_views() -> None:
    """A MaskedArray arrives with its mask, fill_value and hard mask; data and mask both view the buffer."""
    values = np.arange(1_000_000, dtype=np.float64)
    masked = np.ma.MaskedArray(values, mask=values % 3 == 0, fill_value=-1.0, hard_mask=True)
    got, buf = _round_trip(masked)
    assert type(got) is np.ma.MaskedArray
    assert np.array_equal(got.data, masked.data) and np.array_equal(got.mask, masked.mask)
    assert got.fill_value == -1.0 and got.hardmask
    assert np.shares_memory(got.data, buf) and np.shares_memory(got.mask, buf)


@pytest.mark.parametrize("mask", ["nomask", "all-false"])
def test_masked_array_mask_keeps_its_form(mask: str) -> None:
    """nomask stays nomask, and an all-False mask array stays an array (numpy's pickle turns
    nomask into an array; shrinking would turn the array into nomask)."""
    masked = np.ma.MaskedArray(np.arange(4.0), mask=np.ma.nomask if mask == "nomask" else [False] * 4)
    got, _ = _round_trip(masked)
    assert (got.mask is np.ma.nomask) is (mask == "nomask")
    assert np.array_equal(np.ma.getmaskarray(got), np.zeros(4, bool))


@pytest.mark.filterwarnings(MATRIX_WARNING)
def test_matrix_keeps_its_class_as_view() -> None:
    """An np.matrix arrives as an np.matrix viewing the buffer."""
    matrix = np.matrix(np.arange(12.0).reshape(3, 4))
    got, buf = _round_trip(matrix)
    assert type(got) is np.matrix and np.array_equal(got, matrix) and np.shares_memory(got, buf)


def test_subclass_keeping_ndarray_pickling_arrives_as_its_class_view() -> None:
    """A subclass that keeps ndarray's pickling arrives as that class viewing the buffer, rebuilt
    with view(cls): its __array_finalize__ ran, and its instance attributes are what pickle
    would carry (none)."""
    tagged = np.arange(10.0).view(Tagged)
    tagged.tag = "set on the sender"
    got, buf = _round_trip(tagged)
    assert type(got) is Tagged and np.array_equal(got, tagged) and np.shares_memory(got, buf)
    assert got.tag == pickle.loads(pickle.dumps(tagged, protocol=5)).tag == "finalized"


def test_subclass_with_own_pickling_travels_through_it() -> None:
    """A subclass that overrides __reduce__ travels through its own pickling: its state arrives
    (in-band, so the data is a copy, not a view)."""
    own = np.arange(10.0).view(Pickled)
    own.tag = "carried"
    got, buf = _round_trip(own)
    assert type(got) is Pickled and np.array_equal(got, own) and got.tag == "carried"
    assert not np.shares_memory(got, buf)


@pytest.mark.parametrize("kind", ["subclass", "masked"])
def test_object_dtype_subclass_round_trips_in_band(kind: str) -> None:
    """A subclass of Python objects (a masked array too) arrives equal, through pickle in-band."""
    objects = np.array(["a", None, 3], dtype=object)
    obj = objects.view(Tagged) if kind == "subclass" else np.ma.MaskedArray(objects, mask=[False, True, False])
    got, _ = _round_trip(obj)
    assert type(got) is type(obj) and got.dtype == object
    assert list(got) == list(obj)


@pytest.mark.filterwarnings(MATRIX_WARNING)
def test_subclasses_from_read_only_memory_are_read_only_views() -> None:
    """From read-only memory (full_batch, DataSystem) recarray, matrix and masked array data
    (and mask) are read-only views, as plain arrays are."""
    objs = {
        "rec": np.rec.fromarrays([np.arange(8)], names="a"),
        "matrix": np.matrix(np.eye(3)),
        "masked": np.ma.MaskedArray(np.arange(8.0), mask=np.arange(8) > 5),
    }
    got, buf = _round_trip(objs, read_only=True)
    parts = [got["rec"], got["matrix"], got["masked"].data, got["masked"].mask]
    assert [np.shares_memory(p, buf) and not p.flags.writeable for p in parts] == [True] * 4


# -- through a broker ------------------------------------------------------------------------------


def test_received_recarray_and_masked_array_are_views_of_shared_memory(broker: int) -> None:
    """A recarray of 500,000 rows and a 1,000,000-element masked array sent whole arrive as
    their classes, equal, with data (and mask) in the broker's shared memory, owning nothing."""
    rec = np.rec.fromarrays([np.arange(500_000), np.arange(500_000) * 0.5], names="id,score")
    values = np.arange(1_000_000, dtype=np.float64)
    masked = np.ma.MaskedArray(values, mask=values % 7 == 0, fill_value=0.5)
    name = f"subclasses-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(rec)
        sender.send(masked)
        got_rec = receiver.recv(timeout=10)
        got_masked = receiver.recv(timeout=10)
    assert type(got_rec) is np.recarray and np.array_equal(got_rec.score, rec.score)
    assert type(got_masked) is np.ma.MaskedArray and got_masked.fill_value == 0.5
    assert np.array_equal(got_masked.mask, masked.mask) and np.array_equal(got_masked.data, values)
    parts = {"recarray": got_rec, "masked data": got_masked.data, "masked mask": got_masked.mask}
    assert {k: (_in_arena(p, broker), p.flags.owndata) for k, p in parts.items()} == {k: (True, False) for k in parts}


def _subclass_rows(kind: str, tmp_path: Path) -> Any:
    if kind == "memmap":  # the features file: 200,000 x 10 float64
        np.save(tmp_path / "features.npy", np.arange(200_000 * 10, dtype=np.float64).reshape(200_000, 10))
        return np.load(tmp_path / "features.npy", mmap_mode="r")
    if kind == "recarray":
        return np.rec.fromarrays([np.arange(200_000), np.arange(200_000) * 0.5], names="id,score")
    values = np.arange(200_000, dtype=np.float64)
    return np.ma.MaskedArray(values, mask=values % 3 == 0, fill_value=-1.0)


@pytest.mark.parametrize("kind", ["memmap", "recarray", "masked"])
def test_subclass_splits_into_row_blocks_viewing_shared_memory(broker: int, tmp_path: Path, kind: str) -> None:
    """A memmap, recarray or masked array sent to 2 shards arrives as two row blocks, each equal
    to its half (a masked block with its mask rows), of the class it must have, viewing the
    broker's shared memory."""
    obj = _subclass_rows(kind, tmp_path)
    half = len(obj) // 2
    name = f"split-{kind}-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name, num_shards=2) as sender:
        with DataReceiver(ADDRESS, dataset_name=name, shard_id=0) as rx0, DataReceiver(ADDRESS, dataset_name=name, shard_id=1) as rx1:
            sender.send(obj)
            blocks = [rx0.recv(timeout=10), rx1.recv(timeout=10)]
    expected_class = {"memmap": np.ndarray, "recarray": np.recarray, "masked": np.ma.MaskedArray}[kind]
    for i, block in enumerate(blocks):
        rows = obj[i * half : (i + 1) * half]
        assert type(block) is expected_class and block.dtype == obj.dtype
        assert np.array_equal(np.asarray(block), np.asarray(rows)), f"block {i} has other rows"
        assert _in_arena(np.ma.getdata(block), broker), f"block {i} is a copy"
        if kind == "masked":
            assert np.array_equal(block.mask, rows.mask) and _in_arena(block.mask, broker)
    del obj
