"""What the ML-facing layers cost on top of a plain recv (issue 6):

- 16 MiB float32 arrays, sender process -> receiver: ``DataReceiver.recv`` against
  ``ChannelDataset`` under ``DataLoader(batch_size=None)`` (GB/s; the dataset yields
  zero-copy tensors, so both should move at the same speed);
- 1 KiB arrays: ``recv`` against ``await arecv`` and ``async for`` (objects/s; the asyncio
  calls hop through a worker thread).

    .venv/bin/python bench/quick_ml.py [--reps 3]

Medians of ``--reps`` runs on an isolated broker (1 GiB store), removed after.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any, Callable

import numpy as np

from shmchannel import DataReceiver, DataSender
from shmchannel.testing import isolated_broker, join_ok, start_process

ADDRESS = "127.0.0.1"
MIB = 1 << 20


def _stream(name: str, count: int, nbytes: int) -> None:
    data = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    with DataSender(ADDRESS, dataset_name=name, max_queue_size=8) as sender:
        for i in range(count):
            data[0] = i
            sender.send(data)


def _timed(name: str, count: int, nbytes: int, consume: Callable[[str], int]) -> float:
    """Seconds ``consume(name)`` takes for a stream of ``count`` objects (checks it saw all)."""
    proc = start_process(_stream, name, count, nbytes)
    start = time.perf_counter()
    seen = consume(name)
    elapsed = time.perf_counter() - start
    join_ok(proc, 120)
    assert seen == count, f"{name}: {seen} of {count}"
    return elapsed


def _by_recv(name: str) -> int:
    seen = 0
    with DataReceiver(ADDRESS, dataset_name=name, wait=60) as receiver:
        for arr in receiver:
            assert arr[0] == seen and float(arr[::1024].sum()) >= 0
            seen += 1
            del arr
    return seen


def _by_dataset(name: str) -> int:
    from torch.utils.data import DataLoader

    from shmchannel.torch import ChannelDataset

    seen = 0
    for tensor in DataLoader(ChannelDataset(ADDRESS, name), batch_size=None):
        assert int(tensor[0]) == seen and float(tensor[::1024].sum()) >= 0
        seen += 1
        del tensor
    return seen


def _by_arecv(name: str) -> int:
    async def main() -> int:
        seen = 0
        with DataReceiver(ADDRESS, dataset_name=name, wait=60) as receiver:
            async for arr in receiver:
                assert arr[0] == seen
                seen += 1
        return seen

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import torch  # noqa: F401  (imported once, outside the timings)

    big, small = 16 * MIB, 1024
    runs: dict[str, list[float]] = {}
    cases: list[tuple[str, int, int, Callable[[str], int], Any]] = [
        ("16 MiB via recv", 200, big, _by_recv, "GB/s"),
        ("16 MiB via ChannelDataset + DataLoader", 200, big, _by_dataset, "GB/s"),
        ("1 KiB via recv", 5000, small, _by_recv, "objects/s"),
        ("1 KiB via async for (arecv)", 5000, small, _by_arecv, "objects/s"),
    ]
    with isolated_broker(memory="1G"):
        for rep in range(args.reps):
            for label, count, nbytes, consume, unit in cases:
                elapsed = _timed(f"{label.split()[0]}-{consume.__name__}-{rep}", count, nbytes, consume)
                value = count * nbytes / elapsed / 1e9 if unit == "GB/s" else count / elapsed
                runs.setdefault(label, []).append(value)
                print(f"  rep {rep + 1}: {label}: {value:,.2f} {unit}", flush=True)
    print()
    for label, count, nbytes, consume, unit in cases:
        values = runs[label]
        print(f"{label:42s} median {statistics.median(values):>10,.2f} {unit}  (runs: {', '.join(f'{v:,.2f}' for v in values)})")


if __name__ == "__main__":
    main()
