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
    ├── ObjectLost                                Ray lost an object with the process owning it
    ├── ProtocolError                             the broker sent something we do not understand
    └── ReentrantCall (RuntimeError)              a signal handler called an endpoint its own
                                                  thread was inside

``InvalidArgument`` is both a ValueError (what ``mindpandas.channel`` raises for bad
arguments, so code written for it keeps working) and a TypeError (what Python raises for a
wrong type). The broker replies with a wire code; ``from_wire`` is the one table that maps it
back to a class, so a broker error surfaces as the same class a local check would raise.
"""

from __future__ import annotations


class ChannelError(Exception):
    """Root of every error shmchannel raises on purpose.

    Example::

        try:
            sender.send(batch, timeout=5)
        except shmchannel.ChannelError as exc:   # any of the errors below
            log.error("channel failed: %s", exc)
    """

    code = "error"


class InvalidArgument(ChannelError, ValueError, TypeError):
    """A parameter has the wrong type or value; the message names it.

    Example::

        DataSender("127.0.0.1", num_shards=0)
        # InvalidArgument: num_shards must be a positive int, got 0 (int)
    """

    code = "invalid"


class ChannelNotFound(InvalidArgument):
    """No channel of that (namespace, dataset_name) exists (and waiting, if asked, ran out).

    Example::

        try:
            receiver = DataReceiver("127.0.0.1", dataset_name="clicks", wait=30)
        except ChannelNotFound:
            sys.exit("no producer started within 30 s")
    """

    code = "not_found"


class NameInUse(InvalidArgument):
    """A sender already owns this (namespace, dataset_name).

    Example::

        first = DataSender("127.0.0.1", dataset_name="clicks")
        DataSender("127.0.0.1", dataset_name="clicks")   # NameInUse, a ValueError
    """

    code = "name_in_use"


class UnsupportedType(ChannelError, TypeError):
    """``send`` got an object of a type the channel cannot split or carry.

    Example::

        DataSender("127.0.0.1", num_shards=2).send({"a": 1})   # a scalar cannot be split
        DataSender("127.0.0.1").send(lambda x: x)             # cannot be pickled
    """

    code = "unsupported_type"


class ChannelClosed(ChannelError):
    """The sender closed the channel and everything queued for this shard was received.

    This is the normal end of a stream: ``for obj in receiver`` stops on it.

    Example::

        while True:
            try:
                batch = receiver.recv()
            except ChannelClosed:
                break          # the producer is done
    """

    code = "closed"


class EndpointClosed(ChannelError, ValueError):
    """This sender, receiver or data system was closed by its own ``close()``.

    Example::

        receiver.close()
        receiver.recv()     # EndpointClosed, a ValueError
    """

    code = "endpoint_closed"


class ChannelTimeout(ChannelError, TimeoutError):
    """A blocking call waited ``timeout`` seconds without completing; nothing was changed.

    Example::

        try:
            batch = receiver.recv(timeout=5)
        except TimeoutError:           # ChannelTimeout is one
            batch = None               # nothing queued: the receiver is unchanged
    """

    code = "timeout"


class ObjectNotFound(ChannelError, KeyError):
    """The data system holds no object under this key.

    Example::

        try:
            ds.get(key)
        except KeyError:               # ObjectNotFound is one
            ...                        # deleted, or never stored
    """

    code = "no_such_key"

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


class StoreFull(ChannelError, MemoryError):
    """The shared-memory store cannot hold the object (it is larger than the store).

    Example::

        try:
            sender.send(huge)
        except MemoryError as exc:     # StoreFull is one; the message says what was asked
            ...                        # start the broker larger: shmchannel start --memory 16G
    """

    code = "store_full"


class StoreFullTimeout(StoreFull, TimeoutError):
    """The store stayed too full for the object until the timeout ran out.

    Example::

        try:
            sender.send(batch, timeout=10)
        except StoreFullTimeout:       # receivers hold too much: nothing was queued
            ...
    """

    code = "store_full_timeout"


class BrokerUnavailable(ChannelError, ConnectionError):
    """The broker could not be started or reached, or it died; the OS error is the cause.

    Example::

        try:
            batch = receiver.recv()
        except ConnectionError:        # BrokerUnavailable is one
            receiver = DataReceiver("127.0.0.1", dataset_name="clicks")  # a new broker recovers the queue
    """

    code = "broker_unavailable"


class ObjectLost(ChannelError):
    """An object sent on the Ray backend is lost: the process that owned it died -- its
    sender, before the holder of its node adopted it, or that holder, with its node -- and
    Ray keeps no other copy of an object put by a process that is gone. The message names
    the object, its node and its owner. The object is consumed; the next ``recv`` returns
    the next one. A sender's ``close`` raises it for objects the holder could not adopt.

    Example::

        try:
            batch = receiver.recv(timeout=30)
        except shmchannel.ObjectLost as exc:
            log.warning("skipping a batch: %s", exc)
    """

    code = "object_lost"


class ProtocolError(ChannelError):
    """A frame on the broker socket broke the protocol (a bug, or a foreign program on the
    socket): the connection is closed and the endpoint must be made anew.

    Example::

        except ProtocolError as exc:
            log.critical("broker spoke nonsense: %s", exc)
    """

    code = "protocol"


class ReentrantCall(ChannelError, RuntimeError):
    """A call re-entered an endpoint its own thread is already inside: a signal handler
    (or a finalizer) ran while that thread was in a ``send``/``recv``/... of the same
    endpoint. Waiting would never end -- the outer call cannot go on until the handler
    returns -- so the inner call raises this at once and the outer call is unharmed. Use
    the endpoint from another thread, or set a flag in the handler and act on it after.

    Example::

        def on_alarm(signum, frame):
            try:
                sender.send(heartbeat)
            except ReentrantCall:
                pending.append(heartbeat)   # the main thread is inside sender.send
    """

    code = "reentrant"


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
        ObjectLost,
        ProtocolError,
        ReentrantCall,
        Cancelled,
    )
}


def from_wire(code: str, message: str) -> ChannelError:
    """Return the exception for a broker reply's error ``code`` (unknown codes: ChannelError)."""
    return _BY_CODE.get(code, ChannelError)(message)
