"""Soak (issue 5, item 9): several senders and receivers at once, mixed sizes, receivers
SIGKILLed and restarted at random; everything arrives, in order per shard, and nothing is
left behind."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from shmchannel import ChannelClosed, ChannelNotFound, DataReceiver, DataSender, DataSystem
from shmchannel.broker import daemon
from shmchannel.testing import broker_connections, join_ok, open_files, start_process, wait_until

from .conftest import ADDRESS

CHANNELS = 4        # one sender each
SHARDS = 2          # so 8 receivers
OBJECTS = 240       # per channel
KILLS = 30          # receivers killed while the streams run, at least
RUN_FOR = 120.0     # seconds the streams may take, at most
WORK = 0.02         # seconds a receiver works on each object before asking for the next
#: Bytes per object (split over the shards), cycled: inline ones and arena ones up to 8 MiB.
SIZES = [100, 4_000, 60_000, 300_000, 1_000_000, 100, 8 << 20, 20_000]


def _object(seq: int) -> np.ndarray:
    rows = max(SHARDS, SIZES[seq % len(SIZES)] // 8 // SHARDS * SHARDS)
    return np.full(rows, seq, dtype=np.float64)


def _send(channel: int, kills: Any) -> None:
    """Send the stream, keeping pace with the killing: object ``seq`` waits for
    ``KILLS * seq // OBJECTS`` kills, so a fast machine cannot end the stream before the
    receivers have been killed throughout it."""
    with DataSender(ADDRESS, dataset_name=f"soak-{channel}", num_shards=SHARDS, max_queue_size=4) as sender:
        for seq in range(OBJECTS):
            while kills.value < KILLS * seq // OBJECTS:
                time.sleep(0.01)
            sender.send(_object(seq), timeout=120)


def _receive(channel: int, shard: int, log: str, wait: float) -> None:
    """Append each object's number to ``log`` before asking for the next (which acknowledges
    it): every acknowledged object is in the log even if this process is killed."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        receiver = DataReceiver(ADDRESS, dataset_name=f"soak-{channel}", shard_id=shard, wait=wait)
    except ChannelNotFound:  # killed after its stream ended: the drained channel is gone
        os.write(fd, b"end\n")
        return
    with receiver:
        while True:
            try:
                part = receiver.recv(timeout=120)
            except ChannelClosed:
                break
            seq = int(part[0])
            assert (part == seq).all() and len(part) == len(_object(seq)) // SHARDS
            os.write(fd, f"{seq}\n".encode())
            time.sleep(WORK)  # holding the object, as a trainer does: a kill now must redeliver it
            del part
    os.write(fd, b"end\n")
    os.close(fd)


def test_soak_with_receivers_killed_at_random(broker: int, tmp_path: Path) -> None:
    """4 senders x 8 receivers, objects from 100 B to 8 MiB, a random receiver SIGKILLed and
    restarted every ~0.3 s, 30 times or more spread over the streams (the senders keep pace
    with the kills, however fast the machine), most often while it works on an object it
    was handed, which must then come again (it does, at least once in the run).

    Every object reaches its shard at least once, first deliveries in order and none
    missing; afterwards the store is empty and the broker's open files are back to what
    they were (the fixture hands over a broker with no client)."""
    rng = random.Random(9)
    broker_files = open_files(broker)
    slots = [(c, s) for c in range(CHANNELS) for s in range(SHARDS)]
    logs = {slot: str(tmp_path / f"rx-{slot[0]}-{slot[1]}.log") for slot in slots}
    receivers: dict[tuple[int, int], Any] = {slot: start_process(_receive, *slot, logs[slot], 60) for slot in slots}
    kills = multiprocessing.get_context("spawn").Value("i", 0)
    senders = [start_process(_send, c, kills) for c in range(CHANNELS)]
    deadline = time.monotonic() + RUN_FOR
    while time.monotonic() < deadline and any(p.is_alive() for p in senders):
        time.sleep(rng.uniform(0.1, 0.5))
        slot = rng.choice(slots)
        proc = receivers[slot]
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            with kills.get_lock():
                kills.value += 1
            # A restart finds its channel at once, or never: once drained it is gone.
            receivers[slot] = start_process(_receive, *slot, logs[slot], 2)
    for proc in senders:
        join_ok(proc, 120)
    for proc in receivers.values():
        join_ok(proc, 120)
    assert kills.value >= KILLS - 1, f"only {kills.value} receivers were killed: the soak was too short to mean much"
    repeats = 0
    for slot, log in logs.items():
        lines = Path(log).read_text().split()
        assert lines[-1] == "end", f"{slot}: the last receiver did not reach the end of the stream"
        seqs = [int(x) for x in lines if x != "end"]
        first = list(dict.fromkeys(seqs))  # first deliveries, in the order they came
        assert first == list(range(OBJECTS)), f"{slot}: first deliveries {first[:10]}... of {len(first)}"
        # A repeat is an object handed out but not acknowledged when its receiver died: it
        # comes again right where that receiver stopped, never out of order.
        for i in range(1, len(seqs)):
            assert seqs[i] <= seqs[i - 1] + 1, f"{slot}: {seqs[i - 1]} then {seqs[i]}"
        repeats += len(seqs) - len(first)
    assert repeats, "no kill hit a receiver holding an object: redelivery went untested"
    with DataSystem(ADDRESS) as ds:
        stats = ds.stats()
    assert (stats.used, stats.objects, stats.inline_bytes) == (0, 0, 0), stats
    wait_until(lambda: broker_connections(broker) == 0, 10, "the broker to drop every client connection")
    assert open_files(broker) == broker_files, "the broker's open files are not what they were"
    assert not (daemon.status() or {}).get("channels"), "channels left behind"
