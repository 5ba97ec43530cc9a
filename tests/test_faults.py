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
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from shmchannel import ChannelClosed, DataReceiver, DataSender, DataSystem, StoreFull, StoreFullTimeout
from shmchannel.backends import arena_client
from shmchannel import config
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
        arena_client._arena = None  # this process's mapping of the arena keeps the tmpfs busy
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
        (arena,) = [entry for entry in os.listdir(small_tmpfs) if entry.endswith("-arena")]
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


# -- the broker killed ----------------------------------------------------------------------


def _item(i: int) -> np.ndarray:
    """Object i of a stream: every 5th one large (through the arena), the others inline."""
    return np.full(20_000 if i % 5 == 0 else 4, i, dtype=np.float64)


def _blocked_recv(name: str, started: Any, out: Any) -> None:
    with DataReceiver(ADDRESS, dataset_name=name, wait=30) as receiver:
        started.set()
        try:
            for _ in range(2):
                out.put((receiver.recv(timeout=30), time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 -- reported to the test
            out.put((repr(exc), time.monotonic()))


def test_broker_killed_loses_nothing_and_streams_go_on(broker: int) -> None:
    """Send 100 objects, receive 40, SIGKILL the broker. With no broker running, the
    streams go on: a receiver blocked in recv gets the next object sent, the sender sends
    10 more, the receiver takes 10 more (the queues are in shared memory; a sender needs
    the broker only for a new slab, and each has one from its first send). The next
    client starts a broker that takes the arena over: a new receiver gets exactly the rest,
    in order. A view received before the crash keeps its values throughout, and nothing
    of the dead broker is left in /dev/shm."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    started, out = ctx.Event(), ctx.Queue()
    sender = DataSender(ADDRESS, dataset_name="survives", max_queue_size=200)
    idle_sender = DataSender(ADDRESS, dataset_name="idle")
    blocked = start_process(_blocked_recv, "idle", started, out)
    assert started.wait(60)
    for i in range(100):
        sender.send(_item(i))
    receiver = DataReceiver(ADDRESS, dataset_name="survives")
    held = None
    for i in range(40):
        got = receiver.recv(timeout=10)
        np.testing.assert_array_equal(got, _item(i))
        if i == 35:
            held = got  # a zero-copy view into the arena
    receiver.ack()
    idle_sender.send([6])
    assert out.get(timeout=10)[0] == [6]  # and the other process blocks in its next recv
    os.kill(broker, signal.SIGKILL)
    wait_until(lambda: not daemon.pid_alive(broker), 10, "the broker to die")

    idle_sender.send([7])
    what, _ = out.get(timeout=10)
    assert what == [7], what
    blocked.join(10)
    for i in range(100, 110):
        sender.send(_item(i), timeout=10)
    for i in range(40, 50):
        np.testing.assert_array_equal(receiver.recv(timeout=10), _item(i))
    receiver.ack()
    for endpoint in (receiver, sender, idle_sender):
        endpoint.close()  # their broker is gone: closing must not fail
    assert daemon.status() is None  # no broker ran meanwhile

    with DataReceiver(ADDRESS, dataset_name="survives") as again:  # starts a new broker
        new_pid = (daemon.status() or {})["pid"]
        assert new_pid != broker
        assert len(again.get_queue(0)) == 60
        for i in range(50, 110):
            np.testing.assert_array_equal(again.recv(timeout=10), _item(i))
        with pytest.raises(ChannelClosed):
            again.recv(timeout=10)
    assert held is not None
    np.testing.assert_array_equal(held, _item(35))
    assert config.our_shm_entries(broker) == []  # its arena is the new broker's now, its journal gone
    del held, got
    with DataSystem(ADDRESS) as ds:
        wait_until(lambda: ds.stats().objects == 0, 10, "every object to be consumed and released")


def test_recovery_after_the_journal_was_rewritten(broker: int) -> None:
    """A stream long enough for the journal to be rewritten (compacted) several times, then
    the broker killed: what was queued comes back, in order, and the journal stayed short."""
    name = "compacted"
    payload = 16_000  # floats of 8 bytes: 128 KiB objects through the arena, and inline ones
    with DataSender(ADDRESS, dataset_name=name, max_queue_size=50) as sender, DataReceiver(
        ADDRESS, dataset_name=name
    ) as receiver:
        for i in range(600):
            sender.send(np.full(payload if i % 2 else 1000, i, dtype=np.float64))
            if i >= 20:
                assert int(receiver.recv(timeout=10)[0]) == i - 20
        receiver.ack()
        receiver.get_queue(0)
        (journal,) = [e for e in config.our_shm_entries(broker) if e.name.endswith("-journal")]
        assert journal.stat().st_size < 4 << 20, "the journal was never rewritten"
        os.kill(broker, signal.SIGKILL)
    with DataReceiver(ADDRESS, dataset_name=name) as again:
        assert [int(again.recv(timeout=10)[0]) for _ in range(20)] == list(range(580, 600))
        assert again.get_queue(0) == []


def _broker_in(runtime: str) -> int:
    """Start a broker for ``runtime`` (from this process) and return its pid."""
    os.environ["SHMCHANNEL_RUNTIME_DIR"] = runtime
    conn = daemon.ensure_running()
    pid = int(conn.info["pid"])
    conn.close()
    return pid


def test_a_dead_brokers_queue_waits_for_its_own_runtime_directory(broker: int, tmp_path: Path) -> None:
    """Two projects of one user (two runtime directories): when the first one's broker is
    killed, a broker started for the second leaves the dead one's data alone; the first
    project's next broker recovers it."""
    first = os.environ["SHMCHANNEL_RUNTIME_DIR"]
    second = str(tmp_path / "rt")
    os.makedirs(second, mode=0o700)
    with DataSender(ADDRESS, dataset_name="mine") as sender:
        sender.send([1, 2, 3])
        assert len(sender.get_queue(0)) == 1  # a round trip: the broker has it
        os.kill(broker, signal.SIGKILL)
        wait_until(lambda: not daemon.pid_alive(broker), 10, "the broker to die")
    try:
        other = _broker_in(second)
        assert config.our_shm_entries(broker), "another project's broker removed our dead broker's data"
        daemon.stop()
        assert not daemon.pid_alive(other)
    finally:
        os.environ["SHMCHANNEL_RUNTIME_DIR"] = first
    with DataReceiver(ADDRESS, dataset_name="mine") as receiver:
        assert receiver.recv(timeout=10) == [1, 2, 3]
