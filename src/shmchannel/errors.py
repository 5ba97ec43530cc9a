"""Errors of shmchannel: one root, split by cause.

::

    ChannelError
    ├── InvalidArgument (ValueError, TypeError)   a parameter has the wrong type or value
    │   ├── ChannelNotFound                       no channel of that name (receiver side)
    │   └── NameInUse                             a live sender already owns that name
    ├── UnsupportedType (TypeError)               send() got an object it cannot carry
    ├── ChannelClosed                             normal end of stream: drained after close()
    ├── EndpointClosed (ValueError)               use of a sender/receiver after *your* close()
    ├── ChannelTimeout (TimeoutError)             a blocking call ran out of time
    ├── ObjectNotFound (KeyError)                 DataSystem key unknown (or already deleted)
    ├── StoreFull (MemoryError)                   the shared-memory store cannot hold an object
    │   └── StoreFullTimeout (TimeoutError)       ...and no space came free before the timeout
    ├── BrokerUnavailable (ConnectionError)       the broker cannot be reached or died
    └── ProtocolError                             the broker sent something we do not understand

``InvalidArgument`` is both a ValueError (what ``mindpandas.channel`` raises for bad
arguments, so code written for it keeps working) and a TypeError (what Python raises for a
wrong type). The broker replies with a wire code; ``from_wire`` is the one table that maps it
back to a class, so a broker error surfaces as the same class a local check would raise.
"""

from __future__ import annotations


class ChannelError(Exception):
    """Root of every error shmchannel raises on purpose."""

    code = "error"


class InvalidArgument(ChannelError, ValueError, TypeError):
    """A parameter has the wrong type or value; the message names it."""

    code = "invalid"


class ChannelNotFound(InvalidArgument):
    """No channel of that (namespace, dataset_name) exists (and waiting, if asked, ran out)."""

    code = "not_found"


class NameInUse(InvalidArgument):
    """A sender already owns this (namespace, dataset_name)."""

    code = "name_in_use"


class UnsupportedType(ChannelError, TypeError):
    """``send`` got an object of a type the channel cannot split or carry."""

    code = "unsupported_type"


class ChannelClosed(ChannelError):
    """The sender closed the channel and everything queued for this shard was received.

    This is the normal end of a stream: ``for obj in receiver`` stops on it.
    """

    code = "closed"


class EndpointClosed(ChannelError, ValueError):
    """This sender, receiver or data system was closed by its own ``close()``."""

    code = "endpoint_closed"


class ChannelTimeout(ChannelError, TimeoutError):
    """A blocking call waited ``timeout`` seconds without completing; nothing was changed."""

    code = "timeout"


class ObjectNotFound(ChannelError, KeyError):
    """The data system holds no object under this key."""

    code = "no_such_key"

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


class StoreFull(ChannelError, MemoryError):
    """The shared-memory store cannot hold the object (it is larger than the store)."""

    code = "store_full"


class StoreFullTimeout(StoreFull, TimeoutError):
    """The store stayed too full for the object until the timeout ran out."""

    code = "store_full_timeout"


class BrokerUnavailable(ChannelError, ConnectionError):
    """The broker could not be started or reached, or it died; the OS error is the cause."""

    code = "broker_unavailable"


class ProtocolError(ChannelError):
    """A frame on the broker socket broke the protocol."""

    code = "protocol"


class Cancelled(ChannelError):
    """A blocking request was cancelled by its own client (internal: never reaches users)."""

    code = "cancelled"


_BY_CODE: dict[str, type[ChannelError]] = {
    cls.code: cls
    for cls in (
        ChannelError,
        InvalidArgument,
        ChannelNotFound,
        NameInUse,
        UnsupportedType,
        ChannelClosed,
        EndpointClosed,
        ChannelTimeout,
        ObjectNotFound,
        StoreFull,
        StoreFullTimeout,
        BrokerUnavailable,
        ProtocolError,
        Cancelled,
    )
}


def from_wire(code: str, message: str) -> ChannelError:
    """Return the exception for a broker reply's error ``code`` (unknown codes: ChannelError)."""
    return _BY_CODE.get(code, ChannelError)(message)
