"""Lifecycle through the public API: data outliving its sender, wake-up, ordering, broker start/stop."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import psutil
import pytest

from shmchannel import ChannelClosed, DataReceiver, DataSender, DataSystem, config
from shmchannel.broker import daemon
from shmchannel.queue import events, layout
from shmchannel.testing import join_ok, start_process, wait_until

from .conftest import ADDRESS

MIB = 1 << 20

#: futex: the system call a thread waiting for its reply sits in (the connection's reader
#: thread reads the socket and hands the reply over).
FUTEX_SYSCALLS = {"x86_64": {"202"}, "aarch64": {"98"}}.get(platform.machine(), set())


# -- children (module level: spawn imports them by name) ----------------------------------


def _send_and_exit_without_close(address: str, name: str) -> None:
    sender = DataSender(address, dataset_name=name, max_queue_size=20)
    for i in range(10):
        sender.send(np.full(MIB // 8, i, dtype=np.float64))
        sender.send([i, f"item {i}"])
    # No close(): the process just ends.


def _send_counting(name: str, count: int) -> None:
    with DataSender(ADDRESS, dataset_name=name, max_queue_size=100) as sender:
        for i in range(count):
            sender.send([i])


def _start_data_system_at_once(barrier: Any, results: Any) -> None:
    barrier.wait(30)
    with DataSystem(ADDRESS):
        status = daemon.status()
        assert status is not None
        results.put(int(status["pid"]))


# -- helpers ------------------------------------------------------------------------------


def _waiting_for_reply(native_id: int, receiver: DataReceiver) -> bool:
    """True once the thread sleeps in recv on the channel's futex word (queue/ring.py),
    announced in its event count: a send now must wake it."""
    claimer = receiver._endpoint._claimer
    counted = bool(claimer.region.load32(claimer.base + layout.H_DATA_SEQ) & events.WAITING)
    try:
        with open(f"/proc/self/task/{native_id}/syscall") as f:
            call = f.read().split()[0]
        with open(f"/proc/self/task/{native_id}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state == "S" and (call in FUTEX_SYSCALLS or not FUTEX_SYSCALLS) and counted


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmchannel", *args],
        env=dict(os.environ), capture_output=True, text=True, timeout=30,
    )


def _broker_processes(runtime_dir: str) -> list[int]:
    """Pids of broker daemons whose runtime directory is ``runtime_dir``."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "shmchannel.broker.daemon" not in " ".join(proc.info["cmdline"] or ()):
                continue
            if proc.environ().get("SHMCHANNEL_RUNTIME_DIR") == runtime_dir and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


# -- tests --------------------------------------------------------------------------------


def test_data_outlives_sender_exit(address: str) -> None:
    """Objects a child sent stay queued after it exits without close and arrive in order, intact."""
    name = f"outlives-{os.getpid()}"
    join_ok(start_process(_send_and_exit_without_close, address, name), 120)
    with DataReceiver(address, dataset_name=name) as receiver:
        for i in range(10):
            array = receiver.recv(timeout=30)
            assert isinstance(array, np.ndarray)
            assert array.dtype == np.float64 and array.shape == (MIB // 8,)
            assert (array == i).all(), f"array {i} corrupted"
            del array
            assert receiver.recv(timeout=30) == [i, f"item {i}"]
        assert receiver.get_queue(0) == []


def test_blocked_recv_wakes_promptly(broker: int) -> None:
    """A recv blocked on an empty shard returns within a fraction of a second of the send."""
    name = f"wake-{os.getpid()}"
    latencies = []
    with DataSender(ADDRESS, dataset_name=name) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        for i in range(5):
            arrived: dict[str, Any] = {}

            def receive() -> None:
                obj = receiver.recv(timeout=10)
                arrived["time"] = time.perf_counter()
                arrived["obj"] = obj

            thread = threading.Thread(target=receive, name=f"receiver-{i}")
            thread.start()
            wait_until(lambda: thread.native_id is not None and _waiting_for_reply(thread.native_id, receiver), 5,
                       "the receiver thread to block in recv")
            start = time.perf_counter()
            sender.send([i])
            thread.join(10)
            assert not thread.is_alive(), "recv did not return after the send"
            assert arrived["obj"] == [i]
            latencies.append(arrived["time"] - start)
    print(f"\nWAKE-UP LATENCY send->recv return: median {sorted(latencies)[2] * 1e6:.0f} us, "
          f"max {max(latencies) * 1e6:.0f} us ({', '.join(f'{x * 1e6:.0f}' for x in latencies)} us)")
    assert max(latencies) < 0.5, f"recv woke {max(latencies):.3f} s after the send: polling?"


def test_many_small_messages_arrive_once_in_order(broker: int) -> None:
    """20,000 small lists from a child sender arrive exactly once each, in order."""
    name = f"many-{os.getpid()}"
    count = 20_000
    child = start_process(_send_counting, name, count)
    got = []
    with DataReceiver(ADDRESS, dataset_name=name, wait=30) as receiver:
        while True:
            try:
                got.append(receiver.recv(timeout=10))
            except ChannelClosed:
                break
    join_ok(child, 60)
    assert len(got) == count
    assert got == [[i] for i in range(count)]


def test_simultaneous_starts_make_one_broker() -> None:
    """Four processes starting the broker at the same moment all reach one and the same broker."""
    import multiprocessing

    assert daemon.status() is None
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    children = [start_process(_start_data_system_at_once, barrier, results) for _ in range(4)]
    pids = [results.get(timeout=60) for _ in children]
    for child in children:
        join_ok(child, 60)
    status = daemon.status()
    assert status is not None
    assert pids == [status["pid"]] * 4
    assert _broker_processes(str(config.runtime_dir())) == [status["pid"]]


def test_cli_stop_removes_broker_and_shared_memory(broker: int) -> None:
    """`shmchannel stop` ends the broker process and leaves none of its entries in /dev/shm."""
    assert config.our_shm_entries(broker), "the broker made no arena"
    result = _cli("stop")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"broker {broker} stopped\n"
    assert not daemon.pid_alive(broker)
    assert config.our_shm_entries(broker) == []


def test_cli_status_shows_channel_shards_and_depths(broker: int) -> None:
    """`shmchannel status` lists an open channel with its shard count and per-shard queue depths."""
    name = f"status-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name, num_shards=2, max_queue_size=5) as sender:
        for i in range(3):
            sender.send(np.arange(2 * i, 2 * i + 2))
        with DataReceiver(ADDRESS, dataset_name=name, shard_id=0) as receiver:
            np.testing.assert_array_equal(receiver.recv(timeout=10), [0])
            result = _cli("status", "--plain")
    assert result.returncode == 0, result.stderr
    rows = [re.split(r"\s{2,}", line) for line in result.stdout.splitlines()]
    header = next(row for row in rows if row[0] == "channel")
    row = next((row for row in rows if row[0] == f"default/{name}"), None)
    assert row is not None, result.stdout
    cells = dict(zip(header, row))
    assert cells["shards"] == "2"
    assert cells["queued"] == "2 3 (max 5)"
    assert cells["sender"] == "yes"
    assert cells["state"] == "open"


def test_cli_start_with_idle_timeout_exits_when_idle() -> None:
    """`shmchannel start --memory 64M --idle-timeout 0.5` starts a broker that exits by itself and removes its arena."""
    result = _cli("start", "--memory", "64M", "--idle-timeout", "0.5")
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"broker started \(pid (\d+), socket (.+)\)\n", result.stdout)
    assert match, result.stdout
    pid = int(match.group(1))
    assert match.group(2) == str(config.socket_path())
    wait_until(lambda: not daemon.pid_alive(pid), 10, f"idle broker {pid} to exit")
    assert config.our_shm_entries(pid) == []
    log = (config.runtime_dir() / "broker.log").read_text()
    assert re.search(rf" {pid} INFO shmchannel.broker: broker {pid} listening on .*, arena .* of {64 * MIB} bytes\n", log), log
    assert re.search(rf" {pid} INFO shmchannel.broker: idle for 0.5 s with no channels, objects or clients: exiting\n", log), log
    assert daemon.status() is None


def test_status_queries_do_not_keep_an_idle_broker_alive() -> None:
    """A broker with idle timeout 1 s exits about 1 s after its last sender left, though
    `status` asks it every 0.1 s meanwhile (as `shmchannel status --watch` does)."""
    result = _cli("start", "--idle-timeout", "1")
    assert result.returncode == 0, result.stderr
    pid = int(re.search(r"pid (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    with DataSender(ADDRESS, dataset_name="idle-watch") as sender:
        sender.send([1])
    with DataReceiver(ADDRESS, dataset_name="idle-watch") as receiver:
        assert receiver.recv(timeout=10) == [1]
    left = time.monotonic()
    while daemon.pid_alive(pid) and time.monotonic() - left < 10:
        daemon.status()
        time.sleep(0.1)
    gone = time.monotonic() - left
    assert not daemon.pid_alive(pid), "the broker stayed up for 10 s of status queries"
    assert 0.9 <= gone < 5, f"the broker exited {gone:.2f} s after the last client"


def test_broker_removes_entries_of_dead_broker() -> None:
    """A starting broker unlinks the /dev/shm entries that a dead broker of this user left."""
    dead = next(pid for pid in range(4_194_000, 4_000_000, -1) if not daemon.pid_alive(pid))
    stale = config.SHM_DIR / config.shm_name(dead, "arena")
    stale.write_bytes(b"left by a crashed broker")
    try:
        conn = daemon.ensure_running()
        conn.close()
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


def test_next_client_replaces_a_killed_broker(broker: int) -> None:
    """After the broker is SIGKILLed, the sender goes on (its queues and slab are in shared
    memory) and closes; the next client starts a new broker, which takes the dead one's
    arena over, with what was sent in it."""
    import signal

    with DataSender(ADDRESS, dataset_name="killed") as sender:
        sender.send(np.ones(MIB))
        assert config.our_shm_entries(broker)
        os.kill(broker, signal.SIGKILL)
        wait_until(lambda: not daemon.pid_alive(broker), 10, "the broker to die")
        sender.send([1])
    with DataSystem(ADDRESS) as ds:
        assert ds.stats().objects == 2
        status = daemon.status()
        assert status is not None and status["pid"] != broker
        assert not config.our_shm_entries(broker)
        with DataReceiver(ADDRESS, dataset_name="killed") as receiver:
            assert receiver.recv(timeout=10).shape == (MIB,)
            assert receiver.recv(timeout=10) == [1]
            with pytest.raises(ChannelClosed):
                receiver.recv(timeout=10)
        assert ds.stats().objects == 0


def _pong(rounds: int) -> None:
    with DataSender(ADDRESS, dataset_name="pong") as sender, \
            DataReceiver(ADDRESS, dataset_name="ping", wait=60) as receiver:
        for _ in range(rounds):
            sender.send(receiver.recv(timeout=10))


def test_ping_pong_never_misses_a_wakeup(broker: int) -> None:
    """Two processes bouncing a message 2,000 times never leave a blocked recv asleep.

    Each recv blocks just as the other side's send arrives: the race in which the broker
    once fired the wake-up before the waiting request had subscribed to it.
    """
    rounds = 2000
    with DataSender(ADDRESS, dataset_name="ping") as sender:
        proc = start_process(_pong, rounds)
        with DataReceiver(ADDRESS, dataset_name="pong", wait=60) as receiver:
            for i in range(rounds):
                sender.send([i])
                assert receiver.recv(timeout=10) == [i]
    join_ok(proc, 30)
