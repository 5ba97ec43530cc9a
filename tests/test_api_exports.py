"""The public names of the package."""

from __future__ import annotations

import shmchannel


def test_all_is_pinned() -> None:
    """__all__ lists exactly the public API; a change here is a change of the API."""
    assert sorted(shmchannel.__all__) == sorted(
        [
            "BrokerUnavailable", "ChannelClosed", "ChannelError", "ChannelNotFound", "ChannelTimeout",
            "DataReceiver", "DataSender", "DataSystem", "EndpointClosed", "InvalidArgument", "NameInUse",
            "ObjectNotFound", "ProtocolError", "StoreFull", "StoreFullTimeout", "StoreStats", "UnsupportedType",
            "__version__", "start_broker", "status", "stop_broker",
        ]
    )
    for name in shmchannel.__all__:
        assert hasattr(shmchannel, name), name


def test_every_error_derives_from_channel_error() -> None:
    """Each exported error class is a ChannelError."""
    for name in shmchannel.__all__:
        obj = getattr(shmchannel, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, shmchannel.ChannelError), name
