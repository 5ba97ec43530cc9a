"""Issue 16's targets for the Ray backend, on a 2-node Ray cluster started on this machine.

    .venv/bin/python bench/quick_ray.py

Starts the cluster with `ray start` (a head with resource node_a, a second raylet with
node_b, 1 GB object store each, in a temporary directory of its own) and stops it at the
end, errors or not: it ends the processes of this cluster only (found by that directory),
not the other Ray clusters of the machine as `ray stop` would. Measures, in one run:

1. Throughput of 64 MiB arrays, sender task on node_a, receiver task on node_b, for
   shmchannel's Ray backend and for plain Ray measured the same way: the producer
   `ray.put`s each array and hands its ObjectRef (nested in a list, so Ray does not resolve
   it) to the consumer through a `ray.util.queue.Queue(maxsize=2)`; the consumer `ray.get`s
   it and checks the stamp. Rate at the receiver, the first object untimed. The two peers
   alternate rep by rep (shm, ray, shm, ray, ...) so drift hits both. Target:
   shmchannel / ray >= 0.8 (medians).
2. Scale: (a) one sender on node_a streaming COUNT arrays of 64 MiB into a channel whose
   receiver is on node_b; (b) two senders, one per node, each streaming COUNT into its own
   channel, received on the other node (every byte crosses nodes, as in (a), and each node
   both sends and receives). Aggregate GB/s = all bytes / (last recv - first send; a
   sender's clock starts at its first send, once attached).
   Target: (b) / (a) >= 1.5 (medians; (a) and (b) alternate). The same two layouts with
   plain Ray (put + Queue per stream, as in 1.) give this machine's own ceiling: both
   "nodes" share its cores and memory, so what plain Ray cannot scale here, nothing can.
   Also the CPU the channel
   actors use per object: utime + stime of each actor's process (/proc/<pid>/stat, 10 ms
   ticks, summed over the reps), read while the stream's receivers are still attached
   (the actor exits when the last one leaves).
3. Wake-up latency of a blocked recv on node_b when the driver (node_a) sends (issue 3's).

Not while tests that use the Ray fixture run (tests/conftest.py): their setup refuses to
start while another Ray runs, and their teardown's `ray stop --force` ends this cluster too.
QUICK_RAY_COUNT and QUICK_RAY_REPS (12 and 3) shorten a trial run. Prints each rep, then a
summary: one line per metric, with its target and whether it was met.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray

MIB = 1 << 20
SIZE = 64 * MIB
COUNT = int(os.environ.get("QUICK_RAY_COUNT", 12))  # arrays per stream
REPS = int(os.environ.get("QUICK_RAY_REPS", 3))  # per peer / per layout, interleaved
WAKES = 200
STORE = 1000 * 1000 * 1000  # object store per node: (b) keeps a node's own and the other's objects
RAY = str(Path(sys.executable).with_name("ray"))
TIMEOUT = 120.0  # seconds any one step may take before the run is declared hung


# -- the cluster ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster(temp_dir: str) -> str:
    port = _free_port()
    common = [f"--object-store-memory={STORE}", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--resources={\"node_a\": 100}",
                    "--include-dashboard=false", *common], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--resources={\"node_b\": 100}",
                    *common], check=True, stdout=subprocess.DEVNULL)
    return f"127.0.0.1:{port}"


def stop_cluster(temp_dir: str) -> None:
    """End this cluster's processes: those whose command line names ``temp_dir`` (GCS,
    raylets, agents, monitors) and their descendants (the workers, whose titles Ray rewrites)."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
            roots.append(proc)
    procs = set(roots)
    for proc in roots:
        try:
            procs.update(proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def node_id() -> str:
    return str(ray.get_runtime_context().get_node_id())


def payload() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8)


# -- 1. throughput: shmchannel vs plain Ray --------------------------------------------------

@ray.remote(num_cpus=0)
def shm_send(name: str, count: int) -> tuple[str, float]:
    """Streams ``count`` arrays into channel ``name``; (node, time of the first send)."""
    from shmchannel import DataSender

    data = payload()
    with DataSender("ray:auto", dataset_name=name, max_queue_size=2) as sender:
        start = time.perf_counter()
        for i in range(count):
            data[0] = i % 256
            sender.send(data)
    return node_id(), start


@ray.remote(num_cpus=0)
def shm_rate(name: str, count: int) -> tuple[str, float]:
    """(node, GB/s over objects 1..count-1 of channel ``name``)."""
    from shmchannel import DataReceiver

    with DataReceiver("ray:auto", dataset_name=name, wait=60) as receiver:
        receiver.recv(timeout=60)  # untimed: the stream starting
        start = time.perf_counter()
        for i in range(1, count):
            arr = receiver.recv(timeout=60)
            assert arr.nbytes == SIZE and arr[0] == i % 256
            del arr
        return node_id(), (count - 1) * SIZE / (time.perf_counter() - start) / 1e9


@ray.remote(num_cpus=0)
def ray_send(queue: Any, count: int, consumer: list[Any]) -> tuple[str, float]:
    """``shm_send`` for plain Ray: (node, time of the first put)."""
    data = payload()
    start = time.perf_counter()
    for i in range(count):
        data[0] = i % 256
        queue.put([ray.put(data)])  # nested: the queue actor and the consumer borrow it unresolved
    ray.get(consumer[0], timeout=TIMEOUT)  # we own the objects: stay until the consumer is done
    return node_id(), start


@ray.remote(num_cpus=0)
def ray_rate(queue: Any, count: int) -> tuple[str, float]:
    ray.get(queue.get(timeout=60)[0])  # untimed, as for shmchannel
    start = time.perf_counter()
    for i in range(1, count):
        arr = ray.get(queue.get(timeout=60)[0])
        assert arr.nbytes == SIZE and arr[0] == i % 256
        del arr
    return node_id(), (count - 1) * SIZE / (time.perf_counter() - start) / 1e9


def throughput_rep(peer: str, rep: int) -> float:
    on_a, on_b = {"resources": {"node_a": 1}}, {"resources": {"node_b": 1}}
    if peer == "shm":
        name = f"tput-{rep}"
        consumer = shm_rate.options(**on_b).remote(name, COUNT)
        p_node, _ = ray.get(shm_send.options(**on_a).remote(name, COUNT), timeout=TIMEOUT)
        c_node, rate = ray.get(consumer, timeout=TIMEOUT)
    else:
        from ray.util.queue import Queue

        queue = Queue(maxsize=2, actor_options={"num_cpus": 0})
        consumer = ray_rate.options(**on_b).remote(queue, COUNT)
        p_node, _ = ray.get(ray_send.options(**on_a).remote(queue, COUNT, [consumer]), timeout=TIMEOUT)
        c_node, rate = ray.get(consumer, timeout=TIMEOUT)
        queue.shutdown()
    assert c_node != p_node
    return rate


# -- 2. scale: 1 sender vs 2 senders, channel actors' CPU ------------------------------------

@ray.remote(num_cpus=0)
class Gate:
    """Receivers that got everything wait here, still attached, until the driver has read
    the channel actors' CPU."""

    def __init__(self) -> None:
        self.arrived = 0
        self.opened = asyncio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        await self.opened.wait()

    async def count(self) -> int:
        return self.arrived

    async def open(self) -> None:
        self.opened.set()


@ray.remote(num_cpus=0)
def shm_drain(name: str, count: int, gate: Any) -> tuple[str, float]:
    """Receives all ``count`` objects of ``name``; (node, time of the last recv)."""
    from shmchannel import DataReceiver

    with DataReceiver("ray:auto", dataset_name=name, wait=60) as receiver:
        for i in range(count):
            arr = receiver.recv(timeout=60)
            assert arr.nbytes == SIZE and arr[0] == i % 256
            del arr
        end = time.perf_counter()
        ray.get(gate.arrive.remote(), timeout=TIMEOUT)
    return node_id(), end


def channel_actor_pid(name: str) -> int:
    """The pid of channel ``name``'s actor (named "shmchannel:<name>" in Ray namespace
    "default", shmchannel's default namespace), waiting for its receiver to create it."""
    deadline = time.monotonic() + 60
    while True:
        try:
            actor = ray.get_actor("shmchannel:" + name, namespace="default")
            break
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60))


def cpu_ticks(pid: int) -> int:
    """utime + stime of process ``pid``, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


@ray.remote(num_cpus=0)
def ray_drain(queue: Any, count: int) -> tuple[str, float]:
    """``shm_drain`` for plain Ray: (node, time of the last get)."""
    for i in range(count):
        arr = ray.get(queue.get(timeout=60)[0])
        assert arr.nbytes == SIZE and arr[0] == i % 256
        del arr
    return node_id(), time.perf_counter()


def ray_scale_rep(streams: list[tuple[str, str, str]], count: int) -> float:
    """``scale_rep`` with plain Ray: aggregate GB/s."""
    from ray.util.queue import Queue

    queues = [Queue(maxsize=2, actor_options={"num_cpus": 0}) for _ in streams]
    drains = [ray_drain.options(resources={r: 1}).remote(q, count) for q, (_, _, r) in zip(queues, streams)]
    sends = [ray_send.options(resources={s: 1}).remote(q, count, [d]) for q, d, (_, s, _) in zip(queues, drains, streams)]
    sent, received = ray.get(sends, timeout=TIMEOUT), ray.get(drains, timeout=TIMEOUT)
    for queue in queues:
        queue.shutdown()
    assert all(s_node != r_node for (s_node, _), (r_node, _) in zip(sent, received))
    wall = max(end for _, end in received) - min(start for _, start in sent)
    return len(streams) * count * SIZE / wall / 1e9


def scale_rep(streams: list[tuple[str, str, str]], count: int) -> tuple[float, int, float]:
    """Streams of ``count`` arrays, each (dataset_name, sender's node, receiver's node), all
    at once; (aggregate GB/s, the channel actors' CPU ticks, seconds between the first sends)."""
    gate = Gate.remote()
    drains = [shm_drain.options(resources={r: 1}).remote(name, count, gate) for name, _, r in streams]
    pids = [channel_actor_pid(name) for name, _, _ in streams]
    before = sum(cpu_ticks(pid) for pid in pids)
    sends = [shm_send.options(resources={s: 1}).remote(name, count) for name, s, _ in streams]
    deadline = time.monotonic() + TIMEOUT
    while ray.get(gate.count.remote()) < len(streams):
        done, _ = ray.wait(drains + sends, num_returns=len(drains + sends), timeout=0.02)
        ray.get(done)  # a task that failed raises here
        if time.monotonic() > deadline:
            raise TimeoutError(f"scale run {[s[0] for s in streams]} did not finish in {TIMEOUT} s")
    ticks = sum(cpu_ticks(pid) for pid in pids) - before
    ray.get(gate.open.remote())
    sent, received = ray.get(sends, timeout=TIMEOUT), ray.get(drains, timeout=TIMEOUT)
    assert all(s_node != r_node for (s_node, _), (r_node, _) in zip(sent, received))
    starts = [start for _, start in sent]
    wall = max(end for _, end in received) - min(starts)
    ray.kill(gate)
    return len(streams) * count * SIZE / wall / 1e9, ticks, max(starts) - min(starts)


# -- 3. wake-up latency -----------------------------------------------------------------------

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


def wake_latency() -> list[float]:
    from shmchannel import DataSender

    w = wake_receiver.remote(WAKES)
    with DataSender("ray:auto", dataset_name="wake") as sender:
        sender.send([0.0])
        for _ in range(WAKES):
            time.sleep(0.01)
            sender.send([time.perf_counter()])
    return sorted(ray.get(w, timeout=TIMEOUT))


# -- the run ----------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def runs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    temp_dir = tempfile.mkdtemp(prefix="quick-ray-", dir="/tmp")
    try:
        address = start_cluster(temp_dir)
        os.environ["RAY_ADDRESS"] = address
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        tick = 1000 / os.sysconf("SC_CLK_TCK")  # ms

        rates: dict[str, list[float]] = {"shm": [], "ray": []}
        for rep in range(REPS):
            for peer in ("shm", "ray"):
                rates[peer].append(throughput_rep(peer, rep))
                print(f"throughput rep {rep + 1} {peer}: {rates[peer][-1]:.2f} GB/s", flush=True)
        shm, plain = statistics.median(rates["shm"]), statistics.median(rates["ray"])

        layouts = {
            "1 sender": lambda rep: [(f"scale1-{rep}", "node_a", "node_b")],
            "2 senders": lambda rep: [(f"scale2a-{rep}", "node_a", "node_b"), (f"scale2b-{rep}", "node_b", "node_a")],
        }
        scale_rep(layouts["2 senders"]("warm"), 2)  # untimed: node_b's holder, workers started
        agg: dict[str, list[float]] = {k: [] for k in layouts}
        plain_agg: dict[str, list[float]] = {k: [] for k in layouts}
        ticks = {k: 0 for k in layouts}
        for rep in range(REPS):
            for layout, streams in layouts.items():
                rate, used, skew = scale_rep(streams(rep), COUNT)
                agg[layout].append(rate)
                ticks[layout] += used
                print(f"scale rep {rep + 1} {layout}: {rate:.2f} GB/s aggregate, channel actors {used} ticks, "
                      f"first sends {skew * 1e3:.0f} ms apart", flush=True)
                plain_agg[layout].append(ray_scale_rep(streams(rep), COUNT))
                print(f"scale rep {rep + 1} {layout}, plain Ray: {plain_agg[layout][-1]:.2f} GB/s aggregate", flush=True)
        one, two = statistics.median(agg["1 sender"]), statistics.median(agg["2 senders"])
        plain_one, plain_two = statistics.median(plain_agg["1 sender"]), statistics.median(plain_agg["2 senders"])
        objects = {k: REPS * COUNT * len(streams(0)) for k, streams in layouts.items()}
        per_object = {k: ticks[k] * tick / objects[k] for k in layouts}

        lat = wake_latency()
        p50, p99 = lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3

        print(f"\n== Summary ({REPS} reps each, medians; 64 MiB arrays, {COUNT} per stream) ==")
        print(f"throughput node_a->node_b: shmchannel {shm:.2f} GB/s ({runs(rates['shm'])}) vs "
              f"Ray put+Queue {plain:.2f} GB/s ({runs(rates['ray'])}): ratio {shm / plain:.2f} "
              f"(target >= 0.8): {verdict(shm / plain >= 0.8)}")
        print(f"scale: 2 senders (node_a->node_b + node_b->node_a, own channels) {two:.2f} GB/s ({runs(agg['2 senders'])}) "
              f"vs 1 sender (node_a->node_b) {one:.2f} GB/s ({runs(agg['1 sender'])}): ratio {two / one:.2f} "
              f"(target >= 1.5): {verdict(two / one >= 1.5)}")
        print(f"scale, plain Ray (this machine's ceiling): 2 streams {plain_two:.2f} GB/s ({runs(plain_agg['2 senders'])}) "
              f"vs 1 stream {plain_one:.2f} GB/s ({runs(plain_agg['1 sender'])}): ratio {plain_two / plain_one:.2f}")
        print(f"channel actor CPU per object (utime+stime, {tick:.0f} ms ticks): 1 sender "
              f"{per_object['1 sender']:.2f} ms ({ticks['1 sender']} ticks / {objects['1 sender']} objects), "
              f"2 senders {per_object['2 senders']:.2f} ms ({ticks['2 senders']} ticks / {objects['2 senders']} objects) "
              f"(no target: reported)")
        print(f"wake-up of a blocked recv on node_b ({len(lat)} sends from node_a): p50 {p50:.2f} ms, "
              f"p99 {p99:.2f} ms (no target: reported)")
        ray.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_cluster(temp_dir)
        print(f"(Ray logs: {temp_dir})")


if __name__ == "__main__":
    main()
