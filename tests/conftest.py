"""Fixtures: every test gets a broker of its own runtime directory (never the user's), and
the behaviour tests run against both backends through the ``address`` fixture.

The Ray backend runs on one real local Ray cluster per test session (``ray start --head``
with a small object store), stopped at the end; each Ray test's channel actors are killed
after it, and the session asserts that no Ray process is left.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from shmchannel import config
from shmchannel.broker import daemon
from shmchannel.testing import isolated_broker, isolated_runtime, start_idle_broker, wait_until

ADDRESS = "127.0.0.1"
RAY_ADDRESS = "ray:auto"
RAY_STORE = 200 * 1000 * 1000

BACKENDS = ["embedded", "ray"]


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[str]:
    """A fresh runtime directory per test; afterwards no broker and no /dev/shm entry is left."""
    with isolated_runtime() as path:
        yield path


@pytest.fixture
def broker(_isolated: str) -> Iterator[int]:
    """A running broker (256 MiB store) with no client connected; yields its pid."""
    yield start_idle_broker()


@pytest.fixture
def small_store() -> Iterator[int]:
    """A broker whose store holds only 4 MiB."""
    daemon.stop()
    os.environ["SHMCHANNEL_MEMORY"] = "4M"
    yield start_idle_broker()


# -- Ray -------------------------------------------------------------------------------------


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def ray_processes() -> list[str]:
    """Command lines of Ray's own processes (raylet, gcs_server, workers) of this user."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            if proc.info["uids"].real != os.getuid():
                continue
            line = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(k in line for k in ("raylet", "gcs_server", "ray::", "default_worker.py", "dashboard/agent.py", "log_monitor.py")):
            found.append(line[:120])
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One Ray cluster for the session: two nodes on this machine (resources node_a and
    node_b, 200 MB object store each), stopped after; no Ray process may be left."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'shmchannel[ray]')")
    assert not ray_processes(), f"Ray already runs here: {ray_processes()[:3]}"
    # No usage reporting; no token: the second raylet of this machine would need it passed.
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    port = _free_port()
    store = f"--object-store-memory={RAY_STORE}"
    quiet = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "timeout": 120}
    try:
        subprocess.run([_ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=2", store,
                        '--resources={"node_a": 100}', "--include-dashboard=false", "--disable-usage-stats"], **quiet)
        subprocess.run([_ray_cli(), "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", store,
                        '--resources={"node_b": 100}', "--disable-usage-stats"], **quiet)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"  # for "ray:auto" here and in children
        yield RAY_ADDRESS
    finally:
        import ray

        ray.shutdown()
        subprocess.run([_ray_cli(), "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120)
        os.environ.pop("RAY_ADDRESS", None)
        wait_until(lambda: not ray_processes(), 30, "Ray's processes to exit")


@pytest.fixture
def ray_two_nodes(ray_cluster: str) -> Iterator[str]:
    """The session's two-node cluster, this process connected to it; channel actors killed after."""
    from shmchannel.backends.ray import connect

    connect(ray_cluster)
    yield ray_cluster
    _kill_channel_actors()


def _kill_channel_actors() -> list[str]:
    """Kill every shmchannel actor on the cluster but the nodes' holders (they own no object
    once the channels are gone: holder.py); the names of those that were left."""
    import ray

    from shmchannel.backends.ray.actors import PREFIX
    from shmchannel.backends.ray.cluster import HOLDER

    left = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(PREFIX) and not entry["name"].startswith(HOLDER):
            try:
                actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            except ValueError:  # it exited between the listing and here (its last receiver left)
                continue
            left.append(f"{entry['namespace']}/{entry['name']}")
            ray.kill(actor)
    return left


@pytest.fixture(params=BACKENDS)
def address(request: Any, _isolated: str) -> Iterator[str]:
    """The address of a channel backend: the embedded broker, or the session's Ray cluster."""
    if request.param == "embedded":
        request.getfixturevalue("broker")
        yield ADDRESS
        return
    address = request.getfixturevalue("ray_cluster")
    yield address
    import ray

    if ray.is_initialized():
        _kill_channel_actors()


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    leftovers = [p for p in config.our_shm_entries() if not daemon.pid_alive(int(p.name.split("-")[2]))]
    assert not leftovers, f"/dev/shm entries of dead brokers: {leftovers}"


RAY_FIXTURES = {"ray_cluster", "ray_two_nodes"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the Ray cluster ``ray``, so ``-m "not ray"`` runs the rest
    (``-k "not ray"`` would also drop every test with "array" in its name)."""
    for item in items:
        params = getattr(item, "callspec", None)
        on_ray = params is not None and params.params.get("address") == "ray"
        if on_ray or RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


__all__ = ["ADDRESS", "BACKENDS", "isolated_broker", "ray_processes"]
