"""shmchannel: move processed data between processes through shared memory.

The ``mindpandas.channel`` API (``DataSender``, ``DataReceiver``) on a local broker and a
shared-memory data system (``DataSystem``), started on first use.

Example::

    from shmchannel import DataReceiver, DataSender

    with DataSender(dataset_name="clicks", num_shards=2) as sender:     # producer process
        sender.send(df)

    with DataReceiver(dataset_name="clicks", shard_id=0, wait=30) as receiver:  # a trainer
        for part in receiver:
            train(part)
"""

import logging as _logging

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
    ObjectLost,
    ObjectNotFound,
    ProtocolError,
    ReentrantCall,
    StoreFull,
    StoreFullTimeout,
    UnsupportedType,
)
from .store.table import StoreStats

__version__ = "0.1.0"

# The library logs (under "shmchannel") and never prints; what shows is the application's choice.
_logging.getLogger("shmchannel").addHandler(_logging.NullHandler())


def start_broker(memory: int | str | None = None, idle_timeout: float | None = None) -> int:
    """Start this user's broker if none runs (clients also do this on first use); return its pid.

    ``memory`` is the store capacity (bytes or a size like ``"4G"``), ``idle_timeout`` the
    seconds it stays up with no clients, channels or objects.

    Example::

        shmchannel.start_broker(memory="16G", idle_timeout=600)   # before the first channel
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

    Example::

        pid = shmchannel.stop_broker()   # None if none was running
    """
    from .broker import daemon

    return daemon.stop(timeout)


def status(address: str | None = None) -> dict[str, object] | None:
    """The figures of the channels at ``address``: what ``shmchannel status`` shows.

    ``address`` None or an IPv4 address of this machine means this user's broker (a query
    never starts one); a Ray address (``"ray:auto"``, ``"ray://head:10001"``) the channels
    of that Ray cluster. Rates are per second over the last ``rate_window`` seconds.

    Example, an embedded broker with one channel (``store`` is ``StoreStats`` as a dict)::

        {"backend": "embedded", "pid": 4242, "started": 1718000000.0, "uptime": 12.5,
         "clients": 3, "idle_timeout": 60.0,
         "store": {"capacity": 2147483648, "used": 1048576, "free": 2146435072,
                   "reserved": 4194304, "objects": 8, "inline_bytes": 1024},
         "channels": [{
             "namespace": "default", "dataset_name": "clicks", "num_shards": 2,
             "full_batch": False, "max_queue_size": 10, "closed": False,
             "sender": True,                 # a sender is attached
             "receivers": 2,                 # receivers attached, in all
             "shard_receivers": [1, 1],      # ...and per shard
             "depths": [3, 0],               # per shard: objects not handed to a user yet
             "sent_objects": 120, "sent_bytes": 7864320,  # since the channel was created
             "received_objects": [117, 120], "received_bytes": [3833856, 3932160],  # per shard
             "rates": {"sent_objects": 24.0, "sent_bytes": 1572864.0,
                       "received_objects": 47.8, "received_bytes": 1566310.4},
             "rate_window": 5, "created": 1718000001.2}]}

    For a Ray address: ``{"backend": "ray", "address": address, "channels": [...]}``, each
    channel with the keys above (depths count queued objects only), or ``namespace``,
    ``dataset_name`` and ``error`` for a channel actor that could not answer.

    Returns:
        The figures, or None if no embedded broker runs.

    Raises:
        InvalidArgument: ``address`` is neither None, an IPv4 address of this machine, nor
            a Ray address (or Ray is not installed).
        BrokerUnavailable: the broker died while answering, or the Ray cluster cannot be reached.
    """
    if isinstance(address, str) and address.startswith("ray:"):
        from .backends.ray import list_channels

        return {"backend": "ray", "address": address, "channels": list_channels(address)}
    if address is not None:
        from .backends import backend_for

        backend_for(address)  # raises unless it is this machine's; connects to nothing
    from .broker import daemon

    figures = daemon.status()
    return None if figures is None else {"backend": "embedded", **figures}

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
    "ObjectLost",
    "ObjectNotFound",
    "ProtocolError",
    "ReentrantCall",
    "StoreFull",
    "StoreFullTimeout",
    "StoreStats",
    "UnsupportedType",
    "__version__",
    "start_broker",
    "status",
    "stop_broker",
]
