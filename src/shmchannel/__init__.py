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
]
