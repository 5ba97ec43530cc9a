"""Helpers for testing code that uses shmchannel (and for shmchannel's own tests).

``isolated_broker()`` gives a test its own broker in its own runtime directory and checks,
when it ends, that the broker process is gone and nothing of it is left in /dev/shm.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
import time
from typing import Any, Callable, Iterator

from . import config
from .broker import daemon


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "condition") -> Any:
    """Return ``predicate()`` once it is truthy; AssertionError naming ``message`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


@contextlib.contextmanager
def isolated_runtime(memory: str = "256M", idle_timeout: float = 60.0) -> Iterator[str]:
    """Point this process (and children it spawns) at a fresh runtime directory.

    On exit, stops any broker started there, discards what brokers killed there left for
    recovery, and asserts that no broker process and no /dev/shm entry of it remain.
    """
    saved = {k: os.environ.get(k) for k in ("SHMCHANNEL_RUNTIME_DIR", "SHMCHANNEL_MEMORY", "SHMCHANNEL_IDLE_TIMEOUT")}
    path = tempfile.mkdtemp(prefix="shc-")  # short: a Unix socket path has at most 107 bytes
    os.environ.update(
        SHMCHANNEL_RUNTIME_DIR=path, SHMCHANNEL_MEMORY=memory, SHMCHANNEL_IDLE_TIMEOUT=str(idle_timeout)
    )
    try:
        yield path
    finally:
        pid = _pid_of_broker()
        daemon.stop()
        daemon.discard_dead(Path(path))
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(path, ignore_errors=True)
        if pid is not None:
            wait_until(lambda: not daemon.pid_alive(pid), 10, f"broker {pid} to exit")
            assert not config.our_shm_entries(pid), f"broker {pid} left {config.our_shm_entries(pid)}"


def _pid_of_broker() -> int | None:
    status = daemon.status()
    return None if status is None else int(status["pid"])


@contextlib.contextmanager
def isolated_broker(memory: str = "256M", idle_timeout: float = 60.0) -> Iterator[int]:
    """A running broker of its own for the block; yields its pid (see ``isolated_runtime``)."""
    with isolated_runtime(memory, idle_timeout):
        yield start_idle_broker()


def start_idle_broker() -> int:
    """Start (or find) this runtime directory's broker and return its pid once it has let go
    of the connection that started it, so what a test counts from then on is its own."""
    conn = daemon.ensure_running()
    pid = int(conn.info["pid"])
    conn.close()
    wait_until(lambda: broker_connections(pid) == 0, 10, f"broker {pid} to drop the connection that started it")
    return pid


def broker_connections(pid: int) -> int:
    """How many client connections broker ``pid`` holds open: its sockets that are connected
    and carry the broker's socket path (its listening socket is not connected; asyncio's
    internal socket pair has no path)."""
    inodes = {link[len("socket:["):-1] for link in open_files(pid) if link.startswith("socket:[")}
    path = str(config.socket_path())
    count = 0
    with open("/proc/net/unix") as table:
        next(table)  # Num RefCount Protocol Flags Type St Inode Path
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes and fields[5] == "03" and fields[7] == path:
                count += 1
    return count


def open_files(pid: int) -> list[str]:
    """What process ``pid`` has open, one entry per descriptor, sorted (readlink of /proc)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed between listdir and readlink
            pass
    return sorted(links)


def start_process(target: Callable[..., Any], *args: Any) -> multiprocessing.process.BaseProcess:
    """Start ``target(*args)`` in a fresh interpreter (spawn), as the tests' children are."""
    proc = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def join_ok(proc: multiprocessing.process.BaseProcess, timeout: float = 60.0) -> None:
    """Join a child within ``timeout`` (killing it if it hangs) and assert it exited 0."""
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
        raise AssertionError(f"child {proc.pid} did not finish within {timeout} s (killed)")
    assert proc.exitcode == 0, f"child {proc.pid} exited with {proc.exitcode}"


def mapped_file(address: int) -> str:
    """The file mapped at ``address`` in this process, from /proc/self/maps ('' for
    anonymous memory: the heap, torch's own allocations): where a received array's data
    lives, e.g. in the broker's arena (``config.our_shm_entries``).

    Raises:
        AssertionError: nothing is mapped at ``address``.

    Example::

        assert mapped_file(array.ctypes.data).startswith("/dev/shm/shmchannel-")
    """
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) == 6 else ""
    raise AssertionError(f"address {address:#x} is not mapped in this process")
