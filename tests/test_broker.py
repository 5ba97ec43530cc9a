"""The broker's framing on a raw socket: split frames, garbage, unknown operations."""

from __future__ import annotations

import socket

import numpy as np

from shmchannel import DataSystem, config
from shmchannel.broker import protocol

from .conftest import ADDRESS


def _raw() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(config.socket_path()))
    return sock


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:  # never read past this frame: the next reply may follow at once
        chunk = sock.recv(n - len(data))
        assert chunk, "the broker closed the connection"
        data += chunk
    return data


def _reply(sock: socket.socket) -> dict:
    json_len, payload_len = protocol.parse_head(_exactly(sock, protocol.HEAD.size))
    body = _exactly(sock, json_len)
    _exactly(sock, payload_len)
    return protocol.parse_body(body, request=False)


def test_frame_sent_byte_by_byte_is_answered(broker: int) -> None:
    """A request that arrives one byte at a time gets its one reply."""
    with _raw() as sock:
        frame = b"".join(protocol.encode({"op": "hello", "version": protocol.PROTOCOL_VERSION}))
        for i in range(len(frame)):
            sock.sendall(frame[i : i + 1])
        assert _reply(sock)["pid"] == broker


def test_two_requests_in_one_write_get_two_replies(broker: int) -> None:
    """Frames packed back to back in one write are each answered, in order."""
    with _raw() as sock:
        frames = [b"".join(protocol.encode({"op": "contains", "key": k})) for k in ("a", "b")]
        sock.sendall(b"".join(frames))
        assert _reply(sock) == {"ok": True, "found": False}
        assert _reply(sock) == {"ok": True, "found": False}


def test_unknown_operation_is_an_error_reply(broker: int) -> None:
    """An unknown operation gets an error naming it, and the connection keeps working."""
    with _raw() as sock:
        sock.sendall(b"".join(protocol.encode({"op": "fly"})))
        assert _reply(sock) == {"ok": False, "error": "invalid", "message": "unknown operation 'fly'"}
        sock.sendall(b"".join(protocol.encode({"op": "contains", "key": "a"})))
        assert _reply(sock)["ok"]


def test_garbage_disconnects_only_its_sender(broker: int) -> None:
    """A client sending an impossible frame length is disconnected; others keep working."""
    with DataSystem(ADDRESS) as ds, _raw() as bad:
        bad.sendall(b"\xff\xff\xff\xff\x00\x00\x00\x00not json")
        assert bad.recv(100) == b""  # the broker hung up
        key = ds.put(np.arange(100_000))
        np.testing.assert_array_equal(ds.get(key), np.arange(100_000))
        ds.delete(key)
