"""Every test runs against a broker of its own runtime directory, never the user's."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from shmchannel import config
from shmchannel.broker import daemon
from shmchannel.testing import isolated_broker, isolated_runtime

ADDRESS = "127.0.0.1"


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[str]:
    """A fresh runtime directory per test; afterwards no broker and no /dev/shm entry is left."""
    with isolated_runtime() as path:
        yield path


@pytest.fixture
def broker(_isolated: str) -> Iterator[int]:
    """A running broker (256 MiB store); yields its pid."""
    conn = daemon.ensure_running()
    pid = int(conn.info["pid"])
    conn.close()
    yield pid


@pytest.fixture
def small_store() -> Iterator[int]:
    """A broker whose store holds only 4 MiB."""
    daemon.stop()
    os.environ["SHMCHANNEL_MEMORY"] = "4M"
    conn = daemon.ensure_running()
    pid = int(conn.info["pid"])
    conn.close()
    yield pid


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    leftovers = [p for p in config.our_shm_entries() if not daemon.pid_alive(int(p.name.split("-")[2]))]
    assert not leftovers, f"/dev/shm entries of dead brokers: {leftovers}"


__all__ = ["ADDRESS", "isolated_broker"]
