"""Layer 4: backends. ``backend_for(address)`` picks one from the address a user gives."""

from __future__ import annotations

import functools
import ipaddress
import socket

from ..config import default_address
from ..errors import InvalidArgument
from .base import Backend
# Imported here, not on first use: an import in a call can be cut by an interrupt inside
# importlib, which then leaves the module's source file open (the random-interrupt tests).
from .embedded import EmbeddedBackend

REMOTE_HINT = (
    "the embedded backend serves this machine only; remote machines are served by the Ray backend "
    "(a Ray address such as 'ray://head:10001')"
)


@functools.lru_cache(maxsize=64)
def _is_local_ipv4(address: str) -> bool:
    ip = ipaddress.IPv4Address(address)
    if ip.is_loopback:
        return True
    if ip.is_unspecified or ip.is_multicast:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))  # succeeds only for an address of one of our interfaces
        except OSError:
            return False
    return True


def backend_for(address: object, *, inline_threshold: int | None = None) -> Backend:
    """The backend that serves ``address`` (None: ``SHMCHANNEL_ADDRESS``, else this machine).

    Raises:
        InvalidArgument: ``address`` is not a string, not an IPv4 address, or not one of this
            machine's addresses (the message names the backend for remote machines).
    """
    if address is None:
        address = default_address()
    if not isinstance(address, str):
        raise InvalidArgument(f"address must be a str (an IPv4 address of this machine), got {address!r} ({type(address).__name__})")
    if address.startswith("ray:"):
        from .ray import RayBackend

        return RayBackend(address)
    try:
        local = _is_local_ipv4(address)
    except ValueError:
        raise InvalidArgument(
            f"address must be an IPv4 address of this machine such as '127.0.0.1', got {address!r}; {REMOTE_HINT}"
        ) from None
    if not local:
        raise InvalidArgument(f"address {address!r} is not an IPv4 address of this machine; {REMOTE_HINT}")
    return EmbeddedBackend(inline_threshold=inline_threshold)
