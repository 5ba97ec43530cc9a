"""shmchannel: move processed data between processes through shared memory.

The ``mindpandas.channel`` API (``DataSender``, ``DataReceiver``) on a local broker and a
shared-memory data system (``DataSystem``), started on first use.
"""

from .channel import DataReceiver, DataSender, DataSystem
from .errors import (
    BrokerUnavailable,
    ChannelClosed,
    ChannelError,
    ChannelNotFound,
    ChannelTimeout,
    EndpointClosed,
    InvalidArgument,
    NameInUse,
    ObjectNotFound,
    ProtocolError,
    StoreFull,
    StoreFullTimeout,
    UnsupportedType,
)
from .store.table import StoreStats

__version__ = "0.1.0"


def start_broker(memory: int | str | None = None, idle_timeout: float | None = None) -> int:
    """Start this user's broker if none runs (clients also do this on first use); return its pid.

    ``memory`` is the store capacity (bytes or a size like ``"4G"``), ``idle_timeout`` the
    seconds it stays up with no clients, channels or objects.
    """
    from .broker import daemon
    from .config import parse_size

    conn = daemon.ensure_running(None if memory is None else parse_size(memory), idle_timeout)
    try:
        return int(conn.info["pid"])
    finally:
        conn.close()


def stop_broker(timeout: float = 10.0) -> int | None:
    """Stop this user's broker and remove its shared memory; its pid, or None if none ran.

    Queued objects are lost: stop only what nobody needs any more.
    """
    from .broker import daemon

    return daemon.stop(timeout)


def status() -> dict[str, object] | None:
    """The broker's figures (pid, store usage, channels with queue depths), None if none runs."""
    from .broker import daemon

    return daemon.status()

__all__ = [
    "BrokerUnavailable",
    "ChannelClosed",
    "ChannelError",
    "ChannelNotFound",
    "ChannelTimeout",
    "DataReceiver",
    "DataSender",
    "DataSystem",
    "EndpointClosed",
    "InvalidArgument",
    "NameInUse",
    "ObjectNotFound",
    "ProtocolError",
    "StoreFull",
    "StoreFullTimeout",
    "StoreStats",
    "UnsupportedType",
    "__version__",
    "start_broker",
    "status",
    "stop_broker",
]
