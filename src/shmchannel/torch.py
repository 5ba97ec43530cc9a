"""PyTorch loading: a channel shard as a ``torch.utils.data.IterableDataset``.

Example::

    from torch.utils.data import DataLoader
    from shmchannel.torch import ChannelDataset

    dataset = ChannelDataset("127.0.0.1", "clicks", shard_id=rank)
    for batch in DataLoader(dataset, batch_size=None):   # each object is already a batch
        loss = model(batch["features"]).mean()           # a DataFrame arrives as {column: tensor}

How shards map to processes: a channel of ``num_shards = N`` splits every object into N row
blocks; the receiver of ``shard_id = i`` gets block i. With DistributedDataParallel give
each rank its own shard (``num_shards = world_size``, ``shard_id = rank``). Within one rank,
a ``DataLoader`` with ``num_workers = W`` runs W receivers of the same shard, one per worker:
each object goes to exactly one of them, so the rank sees every object of its shard once.
Order across workers is the DataLoader's round-robin, not the send order; use
``num_workers=0`` when order matters.

Workers cost more than they bring unless ``transform`` is heavy: receiving is cheap, while
the DataLoader moves every tensor of every batch from the worker to the training process
(about 1 ms per tensor here), and a worker of a process that was itself started with
``spawn`` re-imports torch (pass ``multiprocessing_context="fork"`` to the DataLoader; do
not fork while another thread of the process uses a receiver).

Zero-copy: numeric arrays become tensors over the shared memory they arrived in
(``torch.from_numpy``). Two cases copy: objects of a ``full_batch`` channel arrive
read-only (every receiver shares them) and torch has no read-only tensors; and with
``num_workers > 0`` the DataLoader itself moves each tensor from the worker into torch's own
shared memory.

torch is an extra (``pip install 'shmchannel[torch]'``); importing this module imports it.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"shmchannel.torch needs PyTorch, which is not installed ({exc}); pip install 'shmchannel[torch]'"
    ) from exc

import numpy as np

from .channel import PREFETCH, DataReceiver
from .errors import ChannelClosed, InvalidArgument
from .serialization.tensors import NUMPY_TORCH

__all__ = ["ChannelDataset", "to_tensors"]

def _array_to_tensor(array: np.ndarray) -> Any:
    if array.dtype.kind in "mM" and array.dtype.isnative:
        array = array.view(np.int64)  # counts of the dtype's unit: DataLoader cannot convert datetimes
    elif array.dtype.name in NUMPY_TORCH and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))  # torch has no big-endian tensors
    if array.dtype.name not in NUMPY_TORCH:
        return array  # strings, objects, long doubles: torch has no such tensors
    if not array.flags.writeable:
        return torch.from_numpy(array.copy())  # shared by every receiver: see the module doc
    if any(stride < 0 or stride % array.itemsize for stride in array.strides):
        return torch.from_numpy(array.copy())  # a reversed or field view: torch cannot view it
    return torch.from_numpy(array)


def _column_to_tensor(column: Any) -> Any:
    """A pandas Series: numeric values as a tensor, a categorical as its integer codes."""
    pd = sys.modules["pandas"]
    if isinstance(column.dtype, pd.CategoricalDtype):
        return _array_to_tensor(np.asarray(column.cat.codes))
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        column = column.dt.tz_convert(None)  # UTC, as numpy datetime64 (else an object array)
    values = column.to_numpy()
    if isinstance(values, np.ndarray) and not values.flags.writeable and values.base is not None:
        # pandas' Copy-on-Write (always on since pandas 3) hands out a read-only view even of
        # writable memory; without this every column was copied. numpy refuses the flag where
        # the memory itself is read-only (full_batch), and the column is copied then.
        with contextlib.suppress(ValueError):
            values.flags.writeable = True
    return _array_to_tensor(values)


def to_tensors(obj: Any) -> Any:
    """``obj`` with its numeric data as tensors, zero-copy where the memory allows.

    - numeric ``numpy.ndarray`` -> ``torch.Tensor`` (``torch.from_numpy``);
    - pandas ``DataFrame`` -> ``{column: tensor}``, categoricals as their integer codes;
      pandas ``Series`` -> tensor; numeric columns share the frame's memory (Copy-on-Write
      does not protect the frame from writes through the tensors);
    - pyarrow ``Table``/``RecordBatch`` and polars ``DataFrame`` -> ``{column: tensor}``
      (copies: their arrays are read-only);
    - ``dict`` -> the same dict with each value converted;
    - datetimes and timedeltas -> int64 counts of their unit (``datetime64[us]``: µs since
      the epoch; time zones converted to UTC); big-endian numbers -> native (a copy);
    - anything else (tensors, strings, lists...) unchanged; so are columns torch cannot
      hold (strings, nullable booleans with missing values), as NumPy arrays;
      integer columns with missing values become float tensors with NaN (as pandas, Arrow
      and polars convert them to NumPy).

    Example::

        to_tensors(pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]}))
        # {'x': tensor([1., 2.], dtype=torch.float64), 'y': tensor([0, 1])}
    """
    if isinstance(obj, np.ndarray):
        return _array_to_tensor(obj)
    if isinstance(obj, dict):
        return {key: to_tensors(value) for key, value in obj.items()}
    pd = sys.modules.get("pandas")
    if pd is not None:
        if isinstance(obj, pd.DataFrame):
            names = [str(name) for name in obj.columns]
            if len(set(names)) < len(names):
                twice = sorted({name for name in names if names.count(name) > 1})
                raise InvalidArgument(
                    f"to_tensors maps columns by name, and the DataFrame has duplicate column names {twice}; "
                    "rename them or pass transform="
                )
            return {name: _column_to_tensor(obj.iloc[:, i]) for i, name in enumerate(names)}
        if isinstance(obj, pd.Series):
            return _column_to_tensor(obj)
    pa = sys.modules.get("pyarrow")
    if pa is not None and isinstance(obj, (pa.Table, pa.RecordBatch)):
        return {name: _array_to_tensor(_arrow_column(obj.column(name))) for name in obj.column_names}
    pl = sys.modules.get("polars")
    if pl is not None and isinstance(obj, pl.DataFrame):
        return {name: _array_to_tensor(obj.get_column(name).to_numpy()) for name in obj.columns}
    return obj


def _arrow_column(column: Any) -> np.ndarray:
    # A column of one chunk without nulls is viewed as is; others need a copy to be contiguous.
    chunks = getattr(column, "chunks", [column])
    if len(chunks) == 1:
        return np.asarray(chunks[0].to_numpy(zero_copy_only=False))
    return np.asarray(column.to_numpy())


class ChannelDataset(IterableDataset):
    """One shard of a channel as an ``IterableDataset``: yields each object as tensors
    (see ``to_tensors``) or as ``transform(obj)``, and ends when the sender closes the
    channel and the shard is drained.

    Each iteration (each ``DataLoader`` worker, each epoch) opens a receiver of its own and
    closes it at the end, also when the loop is left early. Objects are already batches:
    use ``DataLoader(dataset, batch_size=None)``.

    Example::

        dataset = ChannelDataset("127.0.0.1", "clicks", shard_id=0, namespace="ctr",
                                 transform=lambda df: (torch.tensor(df[FEATURES].to_numpy()),
                                                       torch.tensor(df["label"].to_numpy())))
        for x, y in DataLoader(dataset, batch_size=None, num_workers=2):
            ...

    Args:
        address: the channel's address, as for ``DataReceiver`` ("127.0.0.1" or "ray:...").
        dataset_name: the channel's name.
        shard_id: which shard this dataset reads (``rank`` under DistributedDataParallel).
        namespace: the channel's namespace.
        transform: called on each received object instead of ``to_tensors``.
        wait: seconds each receiver waits for the channel to appear (None: forever).
        timeout: seconds to wait for each object (None: forever); ``TimeoutError`` after.
        prefetch: objects a receiver fetches per round trip (see ``DataReceiver``); with
            several workers on one shard a smaller value spreads objects more evenly.
    """

    def __init__(
        self,
        address: str,
        dataset_name: str = "dataset",
        shard_id: int = 0,
        namespace: str = "default",
        transform: Callable[[Any], Any] | None = None,
        *,
        wait: float | None = 60.0,
        timeout: float | None = None,
        prefetch: int = PREFETCH,
    ) -> None:
        super().__init__()
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {transform!r} ({type(transform).__name__})")
        self.address = address
        self.dataset_name = dataset_name
        self.shard_id = shard_id
        self.namespace = namespace
        self.transform = transform
        self.wait = wait
        self.timeout = timeout
        self.prefetch = prefetch

    def receiver(self) -> DataReceiver:
        """A new receiver of this dataset's shard (what each iteration uses).

        Example::

            with dataset.receiver() as receiver:   # e.g. to peek before training
                first = receiver.peek(timeout=60)
        """
        return DataReceiver(
            self.address, self.namespace, self.shard_id, self.dataset_name, wait=self.wait, prefetch=self.prefetch
        )

    def __iter__(self) -> Iterator[Any]:
        """Open a receiver and yield its objects converted, until the end of the stream.

        Example::

            for features in ChannelDataset("127.0.0.1", "clicks"):   # without a DataLoader
                ...
        """
        convert = to_tensors if self.transform is None else self.transform  # a callable may be falsy
        with self.receiver() as receiver:
            while True:
                try:
                    obj = receiver.recv(self.timeout)
                except ChannelClosed:
                    return
                yield convert(obj)
                del obj  # our reference would keep the object's memory from the store

    def __repr__(self) -> str:
        worker = get_worker_info()
        where = f" worker {worker.id}/{worker.num_workers}" if worker is not None else ""
        return f"<ChannelDataset {self.namespace}/{self.dataset_name} shard {self.shard_id}{where}>"
