"""Defaults and where things live: runtime directory, shared-memory names, sizes.

Environment variables (read when used, so tests can point each broker elsewhere):

- ``SHMCHANNEL_ADDRESS``: the address endpoints use when given none (default ``127.0.0.1``,
  the embedded broker; ``ray:auto`` to put every channel on a Ray cluster).
- ``SHMCHANNEL_RUNTIME_DIR``: the broker's socket, lock and log (default
  ``$XDG_RUNTIME_DIR/shmchannel`` or ``/tmp/shmchannel-<uid>``), created mode 0700.
- ``SHMCHANNEL_MEMORY``: store capacity for a broker started on demand (``2G``, ``512M``...).
- ``SHMCHANNEL_IDLE_TIMEOUT``: seconds an idle broker waits before it exits.
- ``SHMCHANNEL_SHM_DIR``: the tmpfs where a broker keeps its arena (default ``/dev/shm``;
  for containers whose /dev/shm is tiny).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

from .errors import InvalidArgument

#: Prefix of every /dev/shm entry a broker makes: ``shmchannel-<uid>-<broker pid>-<what>``.
SHM_PREFIX = "shmchannel"
SHM_DIR = Path("/dev/shm")

DEFAULT_MEMORY = 2 << 30
DEFAULT_IDLE_TIMEOUT = 60.0

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int, *, name: str = "memory") -> int:
    """Parse ``"512M"``, ``"2G"``, ``"1.5g"``, ``"4096"`` or an int into bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
        if not match:
            raise InvalidArgument(f"{name} must be a size like 512M or 2G, got {text!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise InvalidArgument(f"{name} must be a positive size, got {text!r}")
    return value


def shm_dir() -> Path:
    """Where brokers keep their arenas (a tmpfs: its pages are memory)."""
    return Path(os.environ.get("SHMCHANNEL_SHM_DIR") or SHM_DIR)


def default_address() -> str:
    """The address of endpoints created without one."""
    return os.environ.get("SHMCHANNEL_ADDRESS") or "127.0.0.1"


def runtime_dir(create: bool = True) -> Path:
    """The per-user directory of the broker socket; created 0700 and checked to be ours."""
    env = os.environ.get("SHMCHANNEL_RUNTIME_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "shmchannel"
    else:
        path = Path(tempfile.gettempdir()) / f"shmchannel-{os.getuid()}"
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
        if info.st_uid != os.getuid():
            raise PermissionError(f"runtime directory {path} belongs to uid {info.st_uid}, not to us")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(path, 0o700)
    return path


def socket_path() -> Path:
    return runtime_dir() / "broker.sock"


def default_memory() -> int:
    env = os.environ.get("SHMCHANNEL_MEMORY")
    return parse_size(env, name="SHMCHANNEL_MEMORY") if env else DEFAULT_MEMORY


def default_idle_timeout() -> float:
    env = os.environ.get("SHMCHANNEL_IDLE_TIMEOUT")
    return float(env) if env else DEFAULT_IDLE_TIMEOUT


#: Microseconds a waiting endpoint polls before it sleeps (queue/events.py: ``SPIN``).
DEFAULT_SPIN_US = 20.0


def spin_seconds() -> float:
    """``SHMCHANNEL_SPIN_US`` in seconds (0 turns polling off).

    Raises:
        InvalidArgument: it is not a number of microseconds from 0 to 10,000.
    """
    env = os.environ.get("SHMCHANNEL_SPIN_US")
    if not env:
        return DEFAULT_SPIN_US / 1e6
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10_000:
        raise InvalidArgument(f"SHMCHANNEL_SPIN_US must be microseconds from 0 to 10000, got {env!r}")
    return value / 1e6


def ray_adopt_after() -> float:
    """``SHMCHANNEL_RAY_ADOPT_AFTER``: seconds an object waits in a Ray channel's queue
    before the holder of its node adopts it (backends/ray/actors.py; 1 by default).

    Raises:
        InvalidArgument: it is not a finite number of seconds >= 0.
    """
    return _seconds("SHMCHANNEL_RAY_ADOPT_AFTER", 1.0)


def ray_holder_idle() -> float:
    """``SHMCHANNEL_RAY_HOLDER_IDLE``: seconds a Ray holder stays without work before it
    exits (backends/ray/holder.py; 60 by default). At least 2: a holder must outlive the
    moment between its answer to an adoption and the channel counting what it adopted.

    Raises:
        InvalidArgument: it is not a finite number of seconds >= 2.
    """
    return _seconds("SHMCHANNEL_RAY_HOLDER_IDLE", 60.0, minimum=2.0)


def _seconds(name: str, default: float, minimum: float = 0.0) -> float:
    env = os.environ.get(name)
    if not env:
        return default
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not minimum <= value < float("inf"):
        raise InvalidArgument(f"{name} must be a number of seconds >= {minimum:g}, got {env!r}")
    return value


def shm_name(broker_pid: int, what: str) -> str:
    """Name of one /dev/shm entry of the broker ``broker_pid``."""
    return f"{SHM_PREFIX}-{os.getuid()}-{broker_pid}-{what}"


def our_shm_entries(broker_pid: int | None = None) -> list[Path]:
    """/dev/shm entries of this user's brokers (of one broker when ``broker_pid`` is given)."""
    prefix = f"{SHM_PREFIX}-{os.getuid()}-"
    if broker_pid is not None:
        prefix += f"{broker_pid}-"
    try:
        return sorted(p for p in shm_dir().iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (a zombie has released everything)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in (b"Z", b"X")
