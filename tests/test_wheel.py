"""The wheel works where there is no compiler (issue 14).

Builds the sdist and, from it, the wheel (``python -m build``: so the sdist is checked to
hold everything the build needs, the native core's C source included), installs the wheel
and NumPy into a fresh venv with no compiler reachable (a PATH without one, CC pointing
nowhere, binary packages only), and there sends and receives one array through the public
API, from outside the source tree. The broker that run starts lives in this test's runtime
directory (SHMCHANNEL_RUNTIME_DIR, inherited) and is stopped with the venv's own
``shmchannel stop``; then it must be gone with nothing of it left in /dev/shm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shmchannel import config
from shmchannel.broker import daemon
from shmchannel.testing import wait_until

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (ROOT / "setup.py").exists(), reason="needs the source tree (setup.py) to build the wheel from"
)

SCRIPT = textwrap.dedent(
    """
    import mmap
    import uuid

    import numpy as np

    import shmchannel
    import shmchannel._native as native
    from shmchannel import DataReceiver, DataSender

    region = native.Region(mmap.mmap(-1, 64))
    assert region.add(8, 2) == 0 and region.load(8) == 2

    name = f"wheel-{uuid.uuid4().hex[:12]}"
    data = np.arange(12_000, dtype=np.float64).reshape(1000, 12)
    with DataSender(address="127.0.0.1", dataset_name=name) as sender:
        with DataReceiver(address="127.0.0.1", dataset_name=name, wait=30) as receiver:
            sender.send(data)
            got = receiver.recv(timeout=30)
            assert isinstance(got, np.ndarray) and got.dtype == data.dtype, type(got)
            assert np.array_equal(got, data)
            del got
    print("shmchannel", shmchannel.__file__)
    print("native", native.__file__)
    print("sent and received")
    """
)


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.timeout(60)  # about 10 s here; building and pip dominate
def test_the_wheel_installs_and_works_without_a_compiler(tmp_path: Path, _isolated: str) -> None:
    pytest.importorskip("build", reason="needs the build package (in the test extra)")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], dict(os.environ), tmp_path, 50)
    wheels = list(dist.glob("shmchannel-*.whl"))
    assert len(wheels) == 1, wheels
    assert "-cp3" in wheels[0].name and "linux" in wheels[0].name, f"not a platform wheel: {wheels[0].name}"

    # No compiler anywhere pip or the build could look: an empty PATH, CC and CXX nowhere.
    nobin = tmp_path / "bin"
    nobin.mkdir()
    for tool in ("gcc", "cc", "c++", "clang"):
        assert shutil.which(tool, path=str(nobin)) is None
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CFLAGS", "LDSHARED"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PATH=str(nobin), CC="/nonexistent/cc", CXX="/nonexistent/c++")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env, tmp_path, 40)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--only-binary=:all:", str(wheels[0]), "numpy"], env, tmp_path, 50)

    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    pid = None
    try:
        out = _run([str(python), str(script)], env, tmp_path, 40)
        status = daemon.status()  # the broker of this test's runtime directory, which the run started
        assert status is not None, f"no broker runs in {_isolated}"
        pid = int(status["pid"])
        assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == bytes(python), "not the venv's broker"
    finally:
        stopped = subprocess.run([str(venv / "bin" / "shmchannel"), "stop"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=30)
    assert "sent and received" in out, out
    site = str(venv / "lib")
    modules = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("shmchannel ", "native ")))
    assert modules["shmchannel"].startswith(site), modules
    assert modules["native"].startswith(site) and modules["native"].endswith(".so"), modules
    assert stopped.returncode == 0 and f"broker {pid} stopped" in stopped.stdout, (stopped.stdout, stopped.stderr)
    wait_until(lambda: not daemon.pid_alive(pid), 10, f"broker {pid} to exit")
    assert not config.our_shm_entries(pid), f"broker {pid} left {config.our_shm_entries(pid)}"
