"""The online-learning example (examples/online_learning, ``make example``) in a short version.

It runs as a user runs it, ``python examples/online_learning/run.py``, in a subprocess that
inherits the test's runtime directory (SHMCHANNEL_RUNTIME_DIR, set by the autouse fixture),
so its broker is this test's and the fixture checks that none is left.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shmchannel.testing import wait_until

# Looked up, not imported: the example imports them in its own processes.
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("torch", "pandas")),
    reason="the example needs the torch and pandas extras",
)

RUN = Path(__file__).resolve().parents[1] / "examples" / "online_learning" / "run.py"
CHUNKS, ROWS_PER_CHUNK = 8, 4000
SHORT = ["--chunks", str(CHUNKS), "--rows-per-chunk", str(ROWS_PER_CHUNK), "--interval", "0.05", "--log-every", "4"]


def processes_of(runtime_dir: str) -> list[int]:
    """Pids of this user's processes whose environment points at ``runtime_dir``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"].real == os.getuid() and proc.environ().get("SHMCHANNEL_RUNTIME_DIR") == runtime_dir:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return [pid for pid in found if pid != os.getpid()]


def test_online_learning_example_trains_each_event_once_and_beats_the_base_rate(_isolated: str) -> None:
    """A short run exits 0, both trainers report, every event is trained on exactly once by
    one of them, their final loss is below the base rate, and nothing is left behind."""
    proc = subprocess.run([sys.executable, str(RUN), *SHORT], capture_output=True, text=True, timeout=90)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr

    events = CHUNKS * ROWS_PER_CHUNK
    assert f"[events]   wrote {CHUNKS} chunks, {events:,} events" in out, out
    trained = 0
    for shard in (0, 1):
        assert re.search(rf"^\[trainer {shard}\] batch +\d+ +rows +[\d,]+ +loss [\d.]+ .* rows/s$", out, re.M), out
        done = re.search(
            rf"^\[trainer {shard}\] done: ([\d,]+) rows .* final loss ([\d.]+) vs base rate ([\d.]+)", out, re.M
        )
        assert done, out
        trained += int(done[1].replace(",", ""))
        assert float(done[2]) < float(done[3]), f"trainer {shard} did not beat the base rate:\n{out}"
    assert trained == events, out
    assert re.search(rf"^check: each of the {events:,} events sent was trained on exactly once", out, re.M), out

    workdir = re.search(r"into (\S+)$", out, re.M)
    assert workdir and not Path(workdir[1]).exists(), f"temp dir left: {workdir}"
    assert "listening" in (Path(_isolated) / "broker.log").read_text(), "the broker ran elsewhere"
    wait_until(lambda: not processes_of(_isolated), 10, f"the example's processes to exit: {processes_of(_isolated)}")


LOANED = Path(__file__).resolve().parents[1] / "examples" / "loaned_batches.py"


def test_loaned_batches_example_sends_views_and_leaves_the_store_empty(_isolated: str) -> None:
    """The in-place producer example (examples/loaned_batches.py) exits 0; each trainer gets
    half the rows of every batch as read-only views, learns the known weights, and the store
    is empty at the end: every loan went back."""
    batches, rows = 12, 20_000
    proc = subprocess.run([sys.executable, str(LOANED), "--batches", str(batches), "--rows", str(rows)],
                          capture_output=True, text=True, timeout=90)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    for shard in (0, 1):
        done = re.search(rf"^\[trainer {shard}\] done: (\d+) batches, ([\d,]+) rows, views (\w+), "
                         r"largest weight error ([\d.]+)$", out, re.M)
        assert done, out
        assert int(done[1]) == batches and int(done[2].replace(",", "")) == batches * rows // 2, out
        assert done[3] == "True", f"trainer {shard} got copies, not read-only views:\n{out}"
        assert float(done[4]) < 0.05, out
    assert "store after the run: 0 objects, 0 bytes in use" in out, out
    wait_until(lambda: not processes_of(_isolated), 10, f"the example's processes to exit: {processes_of(_isolated)}")
