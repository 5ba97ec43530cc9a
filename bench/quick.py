"""Quick check of the two numbers issue 2 asks for: wake-up latency and 64 MiB throughput.

    .venv/bin/python bench/quick.py [--rounds N]

Runs on an isolated broker (its own runtime directory, 1 GiB store) and removes it after.
The full comparison against peers is `make bench` (bench/, issue 4).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from shmchannel import DataReceiver, DataSender
from shmchannel.testing import isolated_broker, join_ok, start_process

ADDRESS = "127.0.0.1"
MIB = 1 << 20


def _stream_large(count: int, size: int) -> None:
    data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    with DataSender(ADDRESS, dataset_name="large", max_queue_size=4) as sender:
        for i in range(count):
            data[0] = i % 256
            sender.send(data)


def _wake_receiver(rounds: int, out: object, ready: object) -> None:
    lat = []
    with DataReceiver(ADDRESS, dataset_name="wake", wait=30) as receiver:
        receiver.recv(timeout=30)  # warm-up
        ready.set()  # type: ignore[attr-defined]
        for _ in range(rounds):
            sent_at = receiver.recv(timeout=30)[0]
            lat.append(time.perf_counter() - sent_at)  # CLOCK_MONOTONIC: same clock in both processes
    out.put(lat)  # type: ignore[attr-defined]


def throughput(count: int, size: int) -> float:
    with DataSender(ADDRESS, dataset_name="warm") as s, DataReceiver(ADDRESS, dataset_name="warm") as r:
        s.send(np.zeros(size, np.uint8))
        r.recv()
    proc = start_process(_stream_large, count, size)
    with DataReceiver(ADDRESS, dataset_name="large", wait=30) as receiver:
        first = receiver.recv(timeout=30)
        assert first[0] == 0
        del first
        start = time.perf_counter()
        for i in range(1, count):
            arr = receiver.recv(timeout=30)
            assert arr.nbytes == size and arr[0] == i % 256 and int(arr[::4096].sum()) >= 0
            del arr
        elapsed = time.perf_counter() - start
    join_ok(proc, 60)
    return (count - 1) * size / elapsed / 1e9


def wake(rounds: int) -> list[float]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out, ready = ctx.Queue(), ctx.Event()
    proc = start_process(_wake_receiver, rounds, out, ready)
    with DataSender(ADDRESS, dataset_name="wake") as sender:
        sender.send([0.0])
        assert ready.wait(60)
        for _ in range(rounds):
            time.sleep(0.002)  # let the receiver block again: we measure the wake-up of an idle recv
            sender.send([time.perf_counter()])
        lat = out.get(timeout=60)
    join_ok(proc, 30)
    return lat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with isolated_broker(memory="1G"):
        rates = [throughput(16, 64 * MIB) for _ in range(args.rounds)]
        lat = sorted(x for _ in range(args.rounds) for x in wake(300))
    copy_src, copy_dst = np.ones(64 * MIB, np.uint8), np.zeros(64 * MIB, np.uint8)
    copies = []
    for _ in range(10):
        t = time.perf_counter()
        np.copyto(copy_dst, copy_src)
        copies.append(64 * MIB / (time.perf_counter() - t) / 1e9)
    print(f"64 MiB arrays, 1 sender -> 1 receiver process: median {statistics.median(rates):.2f} GB/s "
          f"(runs: {', '.join(f'{r:.2f}' for r in rates)}); memcpy in one process: {statistics.median(copies):.2f} GB/s")
    p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    print(f"wake-up of a blocked recv ({len(lat)} sends): p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us")


if __name__ == "__main__":
    main()
