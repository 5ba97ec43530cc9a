"""The client's reading side of protocol.py: a byte stream cut into whole frames.

A frame leaves the buffer only whole, so a read cut short (an interrupt, a timeout) leaves
the stream in step. Each frame's payload is copied into a buffer that starts on a 64-byte
boundary -- the copy out of the read buffer was needed anyway -- because the inline blobs
in it (a DataSystem get) start on 64-byte offsets and their arrays must start
where the blob layout promises (issue 11: a bytearray starts where malloc puts it, 16 bytes).
"""

from __future__ import annotations

import socket
from typing import Any

from ..serialization.arrays import aligned_copy
from . import protocol

Reply = tuple[dict[str, Any], memoryview]
READ_CHUNK = 64 * 1024
_EMPTY = memoryview(b"")  # the payload of most replies


class FrameReader:
    """Bytes read from a socket, handed out as whole (message, payload) frames."""

    def __init__(self, max_json: int = protocol.MAX_REPLY_JSON) -> None:
        self._max_json = max_json
        self._buf = bytearray()
        self._scratch = memoryview(bytearray(READ_CHUNK))  # reused: a fresh large buffer per recv costs an mmap

    def fill(self, sock: socket.socket) -> int:
        """One read from ``sock`` into the buffer; the bytes read (0: the peer closed).

        Raises:
            OSError: the socket failed.
        """
        n = sock.recv_into(self._scratch)
        self._buf += self._scratch[:n]
        return n

    def next_frame(self) -> Reply | None:
        """The frame at the head of the buffer, removed, if it is all in; else None.

        Raises:
            protocol.FrameError: the bytes are no frame (the stream cannot be resynchronized).
        """
        size = protocol.HEAD.size
        if len(self._buf) < size:
            return None
        json_len, payload_len = protocol.parse_head(self._buf[:size], max_json=self._max_json)
        end = size + json_len + payload_len
        if len(self._buf) < end:
            return None
        msg = protocol.parse_body(self._buf[size : size + json_len], request=False)
        if payload_len:
            with memoryview(self._buf) as view:
                data = aligned_copy(view[size + json_len : end])
        else:
            data = _EMPTY
        del self._buf[:end]
        return msg, data
