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
        conn = daemon.ensure_running()
        pid = int(conn.info["pid"])
        conn.close()
        yield pid


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
