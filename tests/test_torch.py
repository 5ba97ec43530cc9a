"""shmchannel.torch for real: a broker, a sender in a spawned process, DataLoader workers
(forked and spawned) and two spawned ranks of a gloo process group; nothing is mocked.

Zero-copy is proven by the memory map, not by flags: a tensor is a view of shared memory
exactly when ``/proc/self/maps`` says its first byte lies in the broker's arena file. Senders
use ``inline_threshold=0`` so that even small objects travel through the arena.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed (pip install 'shmchannel[torch]')")
pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pl = pytest.importorskip("polars")

import psutil  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from shmchannel import DataSender  # noqa: E402
from shmchannel import config  # noqa: E402
from shmchannel.broker import daemon  # noqa: E402
from shmchannel.testing import join_ok, mapped_file, start_process, wait_until  # noqa: E402
from shmchannel.torch import ChannelDataset, to_tensors  # noqa: E402

from .conftest import ADDRESS  # noqa: E402

ROWS, COLS = 8, 4  # each streamed object; a shard of two gets ROWS // 2 of its rows
COUNT = 20  # objects per stream
HALF = ROWS // 2


def _array(k: int) -> np.ndarray:
    """Object ``k`` of a stream: its values say which object and which row they come from."""
    return np.arange(k * ROWS * COLS, (k + 1) * ROWS * COLS, dtype=np.float32).reshape(ROWS, COLS)


def _stream_arrays(name: str, count: int, num_shards: int) -> None:
    """Child: send ``count`` arrays over ``num_shards`` shards (queues of 4: it waits for readers), then close."""
    with DataSender(ADDRESS, dataset_name=name, num_shards=num_shards, max_queue_size=4, inline_threshold=0) as sender:
        for k in range(count):
            sender.send(_array(k), timeout=15)


def _send_all(name: str, objects: list[Any], num_shards: int = 1, full_batch: bool = False) -> None:
    """Queue ``objects`` (all fit) and close the channel, from this process."""
    with DataSender(ADDRESS, dataset_name=name, num_shards=num_shards, full_batch=full_batch,
                    max_queue_size=max(len(objects), 1), inline_threshold=0) as sender:
        for obj in objects:
            sender.send(obj, timeout=10)


def _in_arena(tensor: Any, broker: int) -> bool:
    """Whether ``tensor``'s data lies in the shared-memory arena of broker ``broker``."""
    return mapped_file(tensor.data_ptr()) in {str(p) for p in config.our_shm_entries(broker)}


def _receivers(name: str) -> list[int] | None:
    """Open receivers per shard of channel ``name`` as the broker reports them; None once the
    broker has dropped the channel (closed, drained and left by every receiver)."""
    status = daemon.status()
    assert status is not None
    channels = [c for c in status["channels"] if c["dataset_name"] == name]
    return list(channels[0]["shard_receivers"]) if channels else None


def _children() -> set[int]:
    """Pids of this process's children, but multiprocessing's resource tracker (it lives on)."""
    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                found.add(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def _features_and_label(df: Any) -> tuple[Any, Any]:
    """transform of the ChannelDataset docstring: (x, y) from a DataFrame."""
    return torch.tensor(df[["a", "b"]].to_numpy()), torch.tensor(df["y"].to_numpy())


def _rank(name: str, rank: int, store_path: str, count: int) -> None:
    """Child: one rank of a gloo group reads shard ``dist.get_rank()`` and checks its rows."""
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # both ranks are on this machine; no guessing of interfaces
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        dataset = ChannelDataset(ADDRESS, name, shard_id=dist.get_rank(), wait=15, timeout=15)
        rows = torch.cat(list(DataLoader(dataset, batch_size=None)))
        expected = np.concatenate([_array(k)[rank * HALF : (rank + 1) * HALF] for k in range(count)])
        assert torch.equal(rows, torch.from_numpy(expected)), f"rank {rank} got other rows"
        total = torch.tensor([rows.shape[0]])
        dist.all_reduce(total)  # what both ranks saw together: every row of every object
        assert int(total) == count * ROWS, f"the ranks saw {int(total)} rows, not {count * ROWS}"
    finally:
        dist.destroy_process_group()


# -- ordering, zero-copy, workers ---------------------------------------------------------------


def test_two_shards_arrive_once_in_order_as_views_of_shared_memory(broker: int) -> None:
    """A sender process's arrays reach two shard datasets row block by row block, in order,
    each as a tensor whose memory is the broker's arena, and both loaders then end."""
    name = f"order-{os.getpid()}"
    proc = start_process(_stream_arrays, name, COUNT, 2)
    loaders = [iter(DataLoader(ChannelDataset(ADDRESS, name, shard_id=i, wait=15, timeout=15), batch_size=None))
               for i in (0, 1)]
    got: list[list[Any]] = [[], []]
    for _ in range(COUNT):  # both shards in step: the sender's queues hold 4
        for shard, loader in enumerate(loaders):
            tensor = next(loader)
            assert isinstance(tensor, torch.Tensor) and tensor.shape == (HALF, COLS)
            assert _in_arena(tensor, broker), f"{mapped_file(tensor.data_ptr())!r} is not the arena"
            got[shard].append(tensor)
    assert [next(loader, None) for loader in loaders] == [None, None]  # end of stream ends both
    join_ok(proc, 20)
    for shard in (0, 1):
        expected = np.concatenate([_array(k)[shard * HALF : (shard + 1) * HALF] for k in range(COUNT)])
        assert torch.equal(torch.cat(got[shard]), torch.from_numpy(expected))
    got[0][0][0, 0] = -1.0  # a writable view: no copy was needed to give torch a tensor
    assert float(got[0][0][0, 0]) == -1.0


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_of_one_shard_get_each_object_once(broker: int, context: str) -> None:
    """Two DataLoader workers on one shard: every object arrives once, the loader ends at
    the end of the stream, and no worker process is left."""
    name = f"workers-{os.getpid()}-{context}"
    before = _children()
    _send_all(name, [_array(k) for k in range(COUNT)])  # a sender process would cost one more torch import
    dataset = ChannelDataset(ADDRESS, name, wait=15, timeout=15, prefetch=1)  # no transform: spawned workers
    # then import torch but not this module (with pandas, pyarrow, polars): seconds on a busy machine
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context=context, timeout=60)
    seen, workers = [], set()
    for tensor in loader:
        workers = workers or _children() - before
        k = int(tensor[0, 0]) // (ROWS * COLS)
        assert torch.equal(tensor, torch.from_numpy(_array(k)))
        assert tensor.is_shared() and not _in_arena(tensor, broker)  # the DataLoader moved it to torch's memory
        seen.append(k)
    assert sorted(seen) == list(range(COUNT)), f"objects seen: {seen}"
    assert len(workers) == 2, f"worker processes: {workers}"
    wait_until(lambda: not workers & _children(), 10, "the DataLoader workers to exit")
    wait_until(lambda: _receivers(name) is None, 10, "the workers' receivers to close and the channel to go")


# -- what to_tensors makes of each type --------------------------------------------------------

_STRINGS = np.array([f"s{i}" for i in range(ROWS)], dtype=object)
_FLOATS, _INTS, _BOOLS = np.arange(ROWS) / 2, np.arange(ROWS) * 3, np.arange(ROWS) % 3 == 0

#: id -> (object of ROWS rows, {key: expected values of all rows}, keys that must be zero-copy);
#: an object that converts to one tensor has the key "".
_TYPES: dict[str, tuple[Callable[[], Any], dict[str, np.ndarray], set[str]]] = {
    "pandas.DataFrame": (
        lambda: pd.DataFrame({"f": _FLOATS, "i": _INTS, "b": _BOOLS,
                              "c": pd.Categorical(["lo", "hi"] * (ROWS // 2)), "s": _STRINGS}),
        {"f": _FLOATS, "i": _INTS, "b": _BOOLS, "c": np.array([1, 0] * (ROWS // 2), np.int8), "s": _STRINGS},
        {"f", "i", "b"},
    ),
    "pandas.Series": (lambda: pd.Series(_FLOATS), {"": _FLOATS}, {""}),
    "dict": (lambda: {"x": _FLOATS.reshape(ROWS, 1) * [1, 2], "y": _INTS},
             {"x": _FLOATS.reshape(ROWS, 1) * [1, 2], "y": _INTS}, {"x", "y"}),
    "torch.Tensor": (lambda: torch.from_numpy(_INTS.copy()), {"": _INTS}, {""}),
    # Arrow and polars hand out read-only views, so to_tensors copies their columns.
    "pyarrow.Table": (lambda: pa.table({"f": _FLOATS, "i": _INTS, "s": _STRINGS.astype(str)}),
                      {"f": _FLOATS, "i": _INTS, "s": _STRINGS}, set()),
    "pyarrow.RecordBatch": (lambda: pa.RecordBatch.from_pydict({"f": _FLOATS, "i": _INTS, "s": _STRINGS.astype(str)}),
                            {"f": _FLOATS, "i": _INTS, "s": _STRINGS}, set()),
    "polars.DataFrame": (lambda: pl.DataFrame({"f": _FLOATS, "i": _INTS, "b": _BOOLS, "s": _STRINGS.astype(str)}),
                         {"f": _FLOATS, "i": _INTS, "b": _BOOLS, "s": _STRINGS}, set()),
}


@pytest.mark.parametrize("kind", list(_TYPES))
def test_each_type_arrives_as_tensors_per_shard(broker: int, kind: str) -> None:
    """An object of each sendable type, split over two shards, arrives on each as tensors of
    its rows (strings as NumPy arrays, categoricals as codes), zero-copy where promised."""
    make, expected, zero_copy = _TYPES[kind]
    name = f"types-{os.getpid()}-{kind}"
    _send_all(name, [make()], num_shards=2)
    for shard in (0, 1):
        (got,) = list(DataLoader(ChannelDataset(ADDRESS, name, shard_id=shard, timeout=10), batch_size=None))
        got = got if isinstance(got, dict) else {"": got}
        assert sorted(got) == sorted(expected)
        for key, values in expected.items():
            want = values[shard * HALF : (shard + 1) * HALF]
            if values.dtype == object:
                assert isinstance(got[key], np.ndarray) and list(got[key]) == list(want), key
                continue
            assert isinstance(got[key], torch.Tensor), f"{key!r}: {type(got[key]).__name__}"
            assert torch.equal(got[key], torch.from_numpy(want)), key
            assert _in_arena(got[key], broker) == (key in zero_copy), f"{key!r}: expected zero-copy {key in zero_copy}"


def test_to_tensors_keeps_what_torch_cannot_hold_and_copies_what_it_cannot_view() -> None:
    """In-process: long doubles and strings stay arrays; big-endian numbers become native
    tensors; reversed and field views become tensors of their values; a nested dict is
    converted throughout; an integer column with a missing value becomes floats with NaN."""
    fields = np.zeros(3, dtype=[("a", "<f8"), ("b", "<i4")])
    got = to_tensors({"long": np.ones(2, np.longdouble), "big": np.arange(2, dtype=">f8"), "text": np.array(["a", "b"]),
                      "rev": np.arange(4)[::-1], "field": fields["a"], "inner": {"x": np.ones(2, np.float32)}})
    assert isinstance(got["long"], np.ndarray) and isinstance(got["text"], np.ndarray)
    assert got["big"].dtype == torch.float64 and got["big"].tolist() == [0.0, 1.0]
    assert got["rev"].tolist() == [3, 2, 1, 0] and got["field"].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(got["inner"]["x"], torch.ones(2))
    missing = to_tensors(pd.Series(pd.array([1, None], dtype="Int64")))
    assert missing.dtype == torch.float64 and missing[0] == 1 and torch.isnan(missing[1])


def test_datetime_columns_arrive_as_int64_through_the_loader(broker: int) -> None:
    """A DataFrame with naive and tz-aware datetimes and a timedelta goes through the documented
    recipe (DataLoader, batch_size=None) as int64 counts of each column's unit (UTC)."""
    name = f"datetimes-{os.getpid()}"
    when = pd.date_range("2024-01-01", periods=ROWS, freq="h")
    frame = pd.DataFrame({"when": when, "local": when.tz_localize("Europe/Paris"),
                          "took": pd.to_timedelta(np.arange(ROWS), unit="s"), "x": _FLOATS})
    _send_all(name, [frame])
    (got,) = DataLoader(ChannelDataset(ADDRESS, name, timeout=10), batch_size=None)
    assert got["when"].dtype == got["local"].dtype == got["took"].dtype == torch.int64
    assert got["when"].tolist() == frame["when"].astype("int64").tolist()
    assert got["local"].tolist() == frame["local"].astype("int64").tolist()  # UTC instants
    assert got["took"].tolist() == frame["took"].astype("int64").tolist()


def test_duplicate_column_names_are_refused_not_merged() -> None:
    """to_tensors maps columns by name: a DataFrame with two columns "a" raises, naming them."""
    with pytest.raises(ValueError, match=r"duplicate column names \['a'\]; rename them or pass transform="):
        to_tensors(pd.DataFrame([[1, 2, 3]], columns=["a", "a", "b"]))


# -- transform, full_batch, leaving early, timeouts --------------------------------------------


def test_transform_replaces_to_tensors(broker: int) -> None:
    """transform= is called on each received DataFrame; its (x, y) tuples come out of the loader."""
    name = f"transform-{os.getpid()}"
    frames = [pd.DataFrame({"a": _FLOATS + k, "b": _FLOATS * k, "y": _INTS + k}) for k in range(3)]
    _send_all(name, frames)
    dataset = ChannelDataset(ADDRESS, name, transform=_features_and_label, timeout=10)
    got = list(DataLoader(dataset, batch_size=None))
    assert len(got) == 3
    for (x, y), frame in zip(got, frames):
        assert torch.equal(x, torch.tensor(frame[["a", "b"]].to_numpy()))
        assert torch.equal(y, torch.tensor(frame["y"].to_numpy()))


def test_falsy_callable_transform_is_still_called(broker: int) -> None:
    """A transform that is callable but falsy (an empty nn.Sequential has len 0) is used, not to_tensors."""
    name = f"falsy-{os.getpid()}"
    _send_all(name, [pd.DataFrame({"a": _FLOATS})])
    identity = torch.nn.Sequential()
    assert not identity
    (got,) = DataLoader(ChannelDataset(ADDRESS, name, transform=identity, timeout=10), batch_size=None)
    assert isinstance(got, pd.DataFrame) and got["a"].tolist() == _FLOATS.tolist()


def test_non_callable_transform_is_refused() -> None:
    """A transform that cannot be called raises TypeError naming the parameter."""
    with pytest.raises(TypeError, match=r"^transform must be callable or None, got 3 \(int\)$"):
        ChannelDataset(ADDRESS, "never-opened", transform=3)  # type: ignore[arg-type]


def test_full_batch_objects_become_private_copies(broker: int) -> None:
    """On a full_batch channel each shard gets the whole object as tensors of its own memory
    (the shared memory is read-only), with the right values and no warning."""
    name = f"full-{os.getpid()}"
    frame = pd.DataFrame({"f": _FLOATS, "i": _INTS})
    _send_all(name, [_array(1), frame], num_shards=2, full_batch=True)
    got = [list(DataLoader(ChannelDataset(ADDRESS, name, shard_id=shard, timeout=10), batch_size=None))
           for shard in (0, 1)]
    for array, columns in got:
        assert torch.equal(array, torch.from_numpy(_array(1)))
        assert torch.equal(columns["f"], torch.from_numpy(_FLOATS)) and torch.equal(columns["i"], torch.from_numpy(_INTS))
        for tensor in (array, columns["f"], columns["i"]):
            assert not _in_arena(tensor, broker), "a tensor over read-only shared memory"
    got[0][0][0, 0] = -1.0  # each shard's copy is its own
    assert float(got[1][0][0, 0]) == float(_array(1)[0, 0])


def test_leaving_the_loop_early_gives_the_rest_to_the_next_dataset(broker: int) -> None:
    """Breaking out of the loader closes its receiver at once; its prefetched objects and the
    queued ones go, in order, to the next dataset of the shard."""
    name = f"early-{os.getpid()}"
    _send_all(name, [np.full(4, k) for k in range(10)])
    for k, tensor in enumerate(DataLoader(ChannelDataset(ADDRESS, name, timeout=10), batch_size=None)):
        assert int(tensor[0]) == k
        if k == 2:
            break
    assert _receivers(name) == [0], "the receiver of the abandoned loop is still open"
    rest = [int(t[0]) for t in DataLoader(ChannelDataset(ADDRESS, name, timeout=10), batch_size=None)]
    assert rest == list(range(3, 10))


def test_timeout_raises_when_nothing_comes(broker: int) -> None:
    """With timeout= and an open but empty channel the loader raises TimeoutError, and the
    dataset's receiver is closed."""
    name = f"silent-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name):
        loader = DataLoader(ChannelDataset(ADDRESS, name, timeout=0.2), batch_size=None)
        message = rf"^recv timed out after 0\.2 s: shard 0 of default/{re.escape(name)} stayed empty$"
        with pytest.raises(TimeoutError, match=message):
            next(iter(loader))
        assert _receivers(name) == [0]


# -- DistributedDataParallel -------------------------------------------------------------------


def test_two_ranks_read_their_own_shard(broker: int, tmp_path: Any) -> None:
    """Two spawned ranks of a gloo group (FileStore) each read shard dist.get_rank() of a
    channel: each gets its own rows in order, and together every row."""
    name = f"ranks-{os.getpid()}"
    _send_all(name, [_array(k) for k in range(COUNT)], num_shards=2)  # queued up front: two imports of torch, not three
    ranks = [start_process(_rank, name, rank, str(tmp_path / "rendezvous"), COUNT) for rank in (0, 1)]
    for proc in ranks:
        join_ok(proc, 30)  # two imports of torch at once take 10 s on a busy machine
    assert _receivers(name) is None, "a rank left its receiver open"
