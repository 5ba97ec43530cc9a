"""A feature pipeline that builds its batches in place, in shared memory: nothing is copied.

The producer asks its sender for loaned arrays (``sender.empty``): a float32 feature matrix
and a float32 label vector per batch. It writes the features straight into them -- numpy
ufuncs with ``out=`` -- and sends ``{"x": features, "y": labels}`` through a 2-shard
channel: trainer 0 gets the first half of the rows, trainer 1 the second, each as
read-only views of the very memory the producer wrote. No byte of a batch is copied on
the way (``DataSender.empty``; README, "Zero-copy send").

Each trainer fits a linear model by gradient steps on what arrives. At the end the
example checks that the store is empty: every loan went back once both trainers were done
with it.

    python examples/loaned_batches.py [--batches 30] [--rows 200000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time

import numpy as np

import shmchannel
from shmchannel import DataReceiver, DataSender, DataSystem

CHANNEL = "loaned-features"
FEATURES = 32
TRUE_WEIGHTS = np.linspace(-1.0, 1.0, FEATURES).astype(np.float32)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fill_batch(rng: np.random.Generator, raw: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """Feature engineering written in place: standardized raw signals, their squares and
    a label from a known linear model plus noise."""
    half = FEATURES // 2
    rng.standard_normal(raw.shape, dtype=np.float32, out=raw)  # the "raw events" (scratch, reused)
    np.subtract(raw, raw.mean(axis=0), out=x[:, :half])
    np.divide(x[:, :half], raw.std(axis=0) + 1e-6, out=x[:, :half])
    np.square(x[:, :half], out=x[:, half:])
    np.subtract(x[:, half:], 1.0, out=x[:, half:])
    np.matmul(x, TRUE_WEIGHTS, out=y)
    y += rng.standard_normal(len(y), dtype=np.float32) * 0.1


def producer(batches: int, rows: int) -> None:
    rng = np.random.default_rng(0)
    raw = np.empty((rows, FEATURES // 2), np.float32)
    start = time.perf_counter()
    with DataSender(dataset_name=CHANNEL, num_shards=2, max_queue_size=4) as sender:
        for _ in range(batches):
            x = sender.empty((rows, FEATURES), np.float32)  # in shared memory, ours until sent
            y = sender.empty(rows, np.float32)
            fill_batch(rng, raw, x, y)
            sender.send({"x": x, "y": y})  # rows [0, n/2) to trainer 0, the rest to trainer 1: no copy
            assert not x.flags.writeable  # receivers may still read it: the send made it read-only
    mb = batches * rows * (FEATURES + 1) * 4 / 1e6
    say(f"[producer] sent {batches} batches of {rows:,} rows ({mb:,.0f} MB) in {time.perf_counter() - start:.2f} s")


def trainer(shard: int) -> None:
    weights = np.zeros(FEATURES, np.float32)
    rows = batches = 0
    views = True
    with DataReceiver(dataset_name=CHANNEL, shard_id=shard, wait=60) as receiver:
        while True:
            try:
                batch = receiver.recv(timeout=60)
            except shmchannel.ChannelClosed:
                break
            x, y = batch["x"], batch["y"]
            views &= not x.flags.writeable and not y.flags.writeable  # read-only views of the loans
            residual = x @ weights - y
            weights -= 0.5 * (x.T @ residual) / len(y)
            loss = float(np.mean(residual * residual))
            rows += len(y)
            batches += 1
            if batches % 10 == 0:
                say(f"[trainer {shard}] batch {batches:3d}: {rows:,} rows, loss {loss:.4f}")
            del batch, x, y, residual
    error = float(np.abs(weights - TRUE_WEIGHTS).max())
    say(f"[trainer {shard}] done: {batches} batches, {rows:,} rows, views {views}, "
        f"largest weight error {error:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--rows", type=int, default=200_000, help="rows per batch (even)")
    args = parser.parse_args()
    was_running = shmchannel.status() is not None
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=trainer, args=(shard,), name=f"trainer {shard}") for shard in (0, 1)]
    procs.append(ctx.Process(target=producer, args=(args.batches, args.rows), name="producer"))
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join(timeout=120)
            if proc.is_alive():
                proc.kill()
                raise SystemExit(f"loaned_batches: {proc.name} hung; killed it")
            if proc.exitcode != 0:
                raise SystemExit(f"loaned_batches: {proc.name} failed with exit code {proc.exitcode}")
        with DataSystem() as ds:
            deadline = time.monotonic() + 5
            while ds.stats().objects and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = ds.stats()
        say(f"store after the run: {stats.objects} objects, {stats.used} bytes in use")
    finally:
        if not was_running:
            shmchannel.stop_broker()


if __name__ == "__main__":
    main()
