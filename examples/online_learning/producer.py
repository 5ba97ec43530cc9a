"""The feature-engineering process: watch a directory for CSV chunks, turn each into
features, and send fixed-size batches through a 2-shard channel to the trainers.

Each batch of ``batch_rows`` rows is split by the channel: the first half goes to
trainer 0, the second half to trainer 1. Rows are batched across chunk boundaries, so
every batch has the same size except perhaps the last; ``send`` blocks while a trainer is
``max_queue_size`` batches behind (backpressure), so a slow trainer slows the producer
instead of filling memory. At the end of the stream (``_DONE``) the sender is closed,
which ends the trainers' loops once they have drained their queues.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pandas as pd

from events import DONE
from features import FeaturePipeline
from schema import say
from shmchannel import DataSender

SHARDS = 2
#: Seconds between looks at the directory. Polling is portable and costs nothing at this
#: rate; inotify (Linux) would wake up at once, at the price of a dependency.
POLL_S = 0.02


def arriving_chunks(directory: Path) -> Iterator[Path]:
    """Yield each ``chunk-*.csv`` of ``directory`` once, in name order, as it appears;
    return after ``_DONE`` appears and every chunk before it was yielded."""
    seen: set[Path] = set()
    while True:
        done = (directory / DONE).exists()  # looked at first: chunks are renamed before it
        new = sorted(p for p in directory.glob("chunk-*.csv") if p not in seen)
        for path in new:
            seen.add(path)
            yield path
        if done and not new:
            return
        if not new:
            time.sleep(POLL_S)


def produce(directory: str, address: str, namespace: str, dataset_name: str, batch_rows: int,
            max_queue_size: int) -> dict[str, object]:
    """Run the producer until the end of the stream; return its counts and timings."""
    if batch_rows <= 0 or batch_rows % SHARDS:
        raise ValueError(f"batch_rows must be a positive multiple of {SHARDS}, got {batch_rows}")
    pipeline = FeaturePipeline()
    pending: list[pd.DataFrame] = []
    pending_rows = chunks = rows_in = rows_sent = batches = dropped = 0
    feature_s = send_s = 0.0
    began = time.monotonic()
    with DataSender(address, namespace=namespace, num_shards=SHARDS, dataset_name=dataset_name,
                    max_queue_size=max_queue_size) as sender:

        def send(batch: pd.DataFrame) -> None:
            nonlocal rows_sent, batches, send_s
            t = time.monotonic()
            sender.send(batch)  # rows [0, n/2) to shard 0, [n/2, n) to shard 1
            send_s += time.monotonic() - t
            rows_sent += len(batch)
            batches += 1

        for path in arriving_chunks(Path(directory)):
            t = time.monotonic()
            raw = pd.read_csv(path)
            pending.append(pipeline(raw))
            feature_s += time.monotonic() - t
            chunks += 1
            rows_in += len(raw)
            pending_rows += len(raw)
            if pending_rows < batch_rows:
                continue
            stream = pd.concat(pending, ignore_index=True)
            full = len(stream) - len(stream) % batch_rows
            for start in range(0, full, batch_rows):
                send(stream.iloc[start : start + batch_rows])
            pending, pending_rows = [stream.iloc[full:]], len(stream) - full
        if pending_rows:
            rest = pd.concat(pending, ignore_index=True)
            dropped = len(rest) % SHARDS  # one row cannot be split between two shards
            if len(rest) > dropped:
                send(rest.iloc[: len(rest) - dropped])
    elapsed = time.monotonic() - began
    say(
        f"[producer] {rows_in:,} events from {chunks} chunks -> {batches} batches of up to {batch_rows:,} rows "
        f"in {elapsed:.1f} s (features {feature_s:.1f} s, blocked on trainers {send_s:.1f} s)"
        + (f"; {dropped} row left over (an odd total does not split over {SHARDS} shards)" if dropped else "")
    )
    return {"chunks": chunks, "rows_in": rows_in, "rows_sent": rows_sent, "batches": batches, "dropped": dropped}
