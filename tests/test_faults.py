"""Faults caused for real on the embedded backend: a sender SIGKILLed in the middle of its
sends, and a tmpfs too small for the store."""

from __future__ import annotations

import gc
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import pytest

from shmchannel import DataReceiver, DataSender, DataSystem, StoreFull, StoreFullTimeout
from shmchannel.backends import embedded
from shmchannel.broker import daemon
from shmchannel.testing import start_process, wait_until

from .conftest import ADDRESS

MIB = 1 << 20
SHARDS = 3


def _stats() -> Any:
    with DataSystem(ADDRESS) as ds:
        return ds.stats()


def _send_forever(name: str, ready: Any) -> None:
    """Sharded numbered objects, big and small in turn, until killed."""
    with DataSender(ADDRESS, dataset_name=name, num_shards=SHARDS, max_queue_size=1000) as sender:
        ready.set()
        i = 0
        while True:
            rows = 3 * 40_000 if i % 3 == 0 else 3  # 320 KiB per shard (arena) or a few bytes (inline)
            obj = np.full(rows, i, dtype=np.float64)
            sender.send(obj)
            i += 1


def _drain(name: str, shard: int) -> list[int]:
    seqs = []
    with DataReceiver(ADDRESS, dataset_name=name, shard_id=shard) as receiver:
        while receiver.get_queue(shard):
            part = receiver.recv(timeout=10)
            assert (part == part[0]).all()
            seqs.append(int(part[0]))
    return seqs


def test_sender_killed_mid_send_leaves_every_shard_or_none(broker: int) -> None:
    """SIGKILL at random moments of a sender's stream of 3-shard objects: each object is
    queued on all three shards or on none, in order, and nothing it allocated is left."""
    import multiprocessing

    rng = random.Random(5)
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(8):
        name = f"killed-tx-{round_}"
        ready = ctx.Event()
        proc = start_process(_send_forever, name, ready)
        assert ready.wait(60)
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        # The broker forgets the dead sender once it has read all it sent.
        wait_until(lambda: not any(c["sender"] for c in (daemon.status() or {}).get("channels", [])
                                   if c["dataset_name"] == name), 10, "the broker to notice the dead sender")
        per_shard = [_drain(name, shard) for shard in range(SHARDS)]
        assert per_shard[0] == list(range(len(per_shard[0]))), f"round {round_}: shard 0 got {per_shard[0][:20]}..."
        assert per_shard[0] == per_shard[1] == per_shard[2], f"round {round_}: shards differ"
        wait_until(lambda: _stats().used == 0 and _stats().objects == 0, 10,
                   f"round {round_}: the store to be empty (nothing orphaned)")


# -- a tmpfs too small for the store --------------------------------------------------------


@pytest.fixture
def small_tmpfs(_isolated: str) -> Iterator[str]:
    """A 24 MiB tmpfs as the brokers' shm dir (skipped where mounting is not allowed)."""
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    path = tempfile.mkdtemp(prefix="shc-tmpfs-")
    result = subprocess.run([mount, "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", path],
                            capture_output=True, text=True)
    if result.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    saved = os.environ.get("SHMCHANNEL_SHM_DIR")
    os.environ["SHMCHANNEL_SHM_DIR"] = path
    try:
        yield path
    finally:
        daemon.stop()
        embedded._arena = None  # this process's mapping of the arena keeps the tmpfs busy
        gc.collect()
        left = os.listdir(path)
        if saved is None:
            del os.environ["SHMCHANNEL_SHM_DIR"]
        else:
            os.environ["SHMCHANNEL_SHM_DIR"] = saved
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)
        assert left == [], f"the broker left {left} in its tmpfs"


def test_tmpfs_too_small_for_the_store_is_backpressure_not_sigbus(small_tmpfs: str) -> None:
    """A 256 MiB store on a 24 MiB tmpfs: objects that fit in the tmpfs flow; one that does
    not waits, then fails with StoreFull naming the tmpfs and the size asked -- no SIGBUS,
    nothing queued -- and the channel goes on working after."""
    os.environ["SHMCHANNEL_MEMORY"] = "256M"
    name = "tiny-tmpfs"
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        (arena,) = [entry for entry in os.listdir(small_tmpfs) if entry.startswith("shmchannel-")]
        for i in range(3):
            sender.send(np.full(2 * MIB, i, dtype=np.uint8))
            assert receiver.recv(timeout=10)[0] == i
        with pytest.raises(StoreFullTimeout, match=rf"^no room in {small_tmpfs} for the store's pages: asked for "
                                                   r"\d+ bytes, No space left on device \(the store has \d+ of "
                                                   r"268435456 bytes free\) after waiting 0.5 s$"):
            sender.send(np.ones(40 * MIB, dtype=np.uint8), timeout=0.5)
        assert isinstance(StoreFullTimeout("x"), StoreFull)
        assert sender.get_queue(0) == []
        sender.send(np.full(2 * MIB, 9, dtype=np.uint8))
        assert receiver.recv(timeout=10)[0] == 9
        assert os.stat(os.path.join(small_tmpfs, arena)).st_blocks * 512 <= 24 * MIB
