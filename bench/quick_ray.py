"""Issue 3's two numbers on a 2-node Ray cluster started on this machine: cross-node
throughput of 64 MiB arrays and the wake-up latency of a blocked recv.

    .venv/bin/python bench/quick_ray.py

Starts the cluster with `ray start` (a head with resource node_a, a second raylet with
node_b, 600 MB object store each) and stops it at the end.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MIB = 1 << 20
COUNT = 12
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster(store: int) -> str:
    port = _free_port()
    common = [f"--object-store-memory={store}", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--resources={\"node_a\": 100}",
                    "--include-dashboard=false", *common], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--resources={\"node_b\": 100}",
                    *common], check=True, stdout=subprocess.DEVNULL)
    return f"127.0.0.1:{port}"


def main() -> None:
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    address = start_cluster(600 * 1000 * 1000)
    os.environ["RAY_ADDRESS"] = address
    try:
        import ray

        ray.init(address=address, logging_level="WARNING", log_to_driver=False)

        @ray.remote(num_cpus=0, resources={"node_a": 1})
        def produce(size: int, count: int) -> str:
            from shmchannel import DataSender

            data = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
            with DataSender("ray:auto", dataset_name="tput", max_queue_size=2) as sender:
                for i in range(count):
                    data[0] = i
                    sender.send(data)
            return str(ray.get_runtime_context().get_node_id())

        @ray.remote(num_cpus=0, resources={"node_b": 1})
        def consume(size: int, count: int) -> tuple[str, float]:
            from shmchannel import DataReceiver

            with DataReceiver("ray:auto", dataset_name="tput", wait=60) as receiver:
                first = receiver.recv(timeout=60)
                del first
                start = time.perf_counter()
                for i in range(1, count):
                    arr = receiver.recv(timeout=60)
                    assert arr.nbytes == size and arr[0] == i % 256
                    del arr
                return str(ray.get_runtime_context().get_node_id()), (count - 1) * size / (time.perf_counter() - start) / 1e9

        @ray.remote(num_cpus=0, resources={"node_b": 1})
        def wake_receiver(rounds: int) -> list[float]:
            from shmchannel import DataReceiver

            lat = []
            with DataReceiver("ray:auto", dataset_name="wake", wait=60) as receiver:
                receiver.recv(timeout=60)
                for _ in range(rounds):
                    sent_at = receiver.recv(timeout=60)[0]
                    lat.append(time.perf_counter() - sent_at)
            return lat

        rates = []
        for _ in range(3):
            c = consume.remote(64 * MIB, COUNT)
            p_node = ray.get(produce.remote(64 * MIB, COUNT))
            c_node, rate = ray.get(c)
            assert c_node != p_node
            rates.append(rate)
        from shmchannel import DataSender

        w = wake_receiver.remote(200)
        with DataSender("ray:auto", dataset_name="wake") as sender:
            sender.send([0.0])
            for _ in range(200):
                time.sleep(0.01)
                sender.send([time.perf_counter()])
        lat = sorted(ray.get(w))
        print(f"Ray backend, 64 MiB arrays node_a -> node_b: median {statistics.median(rates):.2f} GB/s "
              f"(runs: {', '.join(f'{r:.2f}' for r in rates)})")
        print(f"Ray backend wake-up of a blocked recv on the other node ({len(lat)} sends): "
              f"p50 {lat[len(lat) // 2] * 1e3:.2f} ms, p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms")
        ray.shutdown()
    finally:
        subprocess.run([RAY, "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
