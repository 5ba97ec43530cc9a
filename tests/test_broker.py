"""The broker's framing on a raw socket: split frames, garbage, unknown operations."""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
import pytest

import shmchannel
from shmchannel import DataSender, DataSystem, config
from shmchannel.broker import protocol, rules
from shmchannel.testing import wait_until

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


def _request(sock: socket.socket, msg: dict, payload: bytes = b"") -> None:
    sock.sendall(b"".join(protocol.encode(msg, payload)))


def test_posted_request_is_answered_only_when_it_fails(broker: int) -> None:
    """A posted send that succeeds gets no reply; one that fails gets an error marked posted;
    the next plain request's reply follows both."""
    ident = {"namespace": "default", "dataset_name": "posted"}
    with _raw() as sock:
        _request(sock, {"op": "create", **ident, "num_shards": 1, "max_queue_size": 4})
        assert _reply(sock)["room"] == 4
        _request(sock, {"op": "send", **ident, "parts": [{"inline": [0, 3]}], "posted": True}, b"abc")
        _request(sock, {"op": "send", **ident, "parts": [], "posted": True})
        _request(sock, {"op": "queue", **ident, "shard": 0})
        failure = _reply(sock)
        assert failure["ok"] is False and failure["posted"] is True
        assert failure["message"] == "send to default/posted needs 1 parts, got 0"
        assert len(_reply(sock)["queue"]) == 1


def test_requests_behind_a_waiting_one_are_handled_in_order(broker: int) -> None:
    """Requests that arrive while an earlier request of the same client waits (here a send to
    a full queue) wait behind it and are answered in order once it completes."""
    ident = {"namespace": "default", "dataset_name": "behind"}
    with _raw() as sock, _raw() as other:
        _request(sock, {"op": "create", **ident, "num_shards": 1, "max_queue_size": 1})
        _reply(sock)
        _request(sock, {"op": "send", **ident, "parts": [{"inline": [0, 1]}]}, b"a")
        assert _reply(sock) == {"ok": True, "room": 0}
        # b waits for room; c and the sync queue up behind it, not beside it.
        _request(sock, {"op": "send", **ident, "parts": [{"inline": [0, 1]}], "id": 2}, b"b")
        _request(sock, {"op": "send", **ident, "parts": [{"inline": [0, 1]}], "posted": True, "id": 3}, b"c")
        _request(sock, {"op": "sync", "id": 4})
        _request(other, {"op": "open", **ident, "shard": 0})
        _reply(other)
        for expected in (b"a", b"b", b"c"):
            _request(other, {"op": "recv", **ident, "shard": 0, "timeout": 10})
            json_len, payload_len = protocol.parse_head(_exactly(other, protocol.HEAD.size))
            assert protocol.parse_body(_exactly(other, json_len), request=False)["ok"]
            assert _exactly(other, payload_len).endswith(expected)
        assert _reply(sock) == {"ok": True, "room": 0, "id": 2}  # b's reply, after a was received
        assert _reply(sock) == {"ok": True, "id": 4}  # after c was queued: its order was kept


def test_a_look_is_answered_while_an_earlier_request_of_its_connection_waits(broker: int) -> None:
    """A queue listing sent behind a send that waits for room is answered at once, with its
    own id, and the waiting send is answered later with its id (issue 11: a monitoring
    thread's get_queue hung behind its producer thread's blocked send)."""
    ident = {"namespace": "default", "dataset_name": "look"}
    with _raw() as sock, _raw() as other:
        _request(sock, {"op": "create", **ident, "num_shards": 1, "max_queue_size": 1})
        _reply(sock)
        _request(sock, {"op": "send", **ident, "parts": [{"inline": [0, 1]}], "id": 1}, b"a")
        assert _reply(sock) == {"ok": True, "room": 0, "id": 1}
        _request(sock, {"op": "send", **ident, "parts": [{"inline": [0, 1]}], "id": 2}, b"b")  # waits
        _request(sock, {"op": "queue", **ident, "shard": 0, "id": 3})
        look = _reply(sock)
        assert look["id"] == 3 and len(look["queue"]) == 1
        _request(other, {"op": "open", **ident, "shard": 0})
        _reply(other)
        _request(other, {"op": "recv", **ident, "shard": 0, "timeout": 10})
        assert _reply(other)["ok"]
        assert _reply(sock) == {"ok": True, "room": 0, "id": 2}


def test_cancel_withdraws_only_the_request_it_names(broker: int) -> None:
    """A cancel naming a request that waits behind another withdraws that one (answered
    Cancelled with its id) and leaves the waiting one waiting."""
    ident = {"namespace": "default", "dataset_name": "withdraw"}
    with _raw() as sock, _raw() as other:
        _request(sock, {"op": "create", **ident, "num_shards": 1, "max_queue_size": 1})
        _reply(sock)
        _request(sock, {"op": "send", **ident, "parts": [{"inline": [0, 1]}]}, b"a")
        _reply(sock)
        _request(sock, {"op": "send", **ident, "parts": [{"inline": [0, 1]}], "id": 2}, b"b")  # waits
        _request(sock, {"op": "send", **ident, "parts": [{"inline": [0, 1]}], "id": 3}, b"c")  # behind it
        _request(sock, {"op": "cancel", "id": 3})
        withdrawn = _reply(sock)
        assert (withdrawn["ok"], withdrawn["error"], withdrawn["id"]) == (False, "cancelled", 3)
        _request(sock, {"op": "cancel", "id": 99})  # names nothing: changes nothing
        _request(other, {"op": "open", **ident, "shard": 0})
        _reply(other)
        _request(other, {"op": "recv", **ident, "shard": 0, "timeout": 10})
        _reply(other)
        assert _reply(sock) == {"ok": True, "room": 0, "id": 2}
        _request(sock, {"op": "queue", **ident, "shard": 0, "id": 4})
        assert len(_reply(sock)["queue"]) == 1  # b only: c was withdrawn


@pytest.mark.parametrize("field", ["namespace", "dataset_name"])
def test_raw_name_over_the_bound_is_refused_and_status_stays_readable(broker: int, field: str) -> None:
    """A raw create whose name has 200,000 characters gets an 'invalid' reply naming the field
    and the bound (the API's rule, MAX_NAME), creates nothing, and status answers as before
    (issue 13: such a name broke status for every client)."""
    msg = {"op": "create", "namespace": "default", "dataset_name": "ok", "num_shards": 1, "max_queue_size": 4}
    msg[field] = "x" * 200_000
    with _raw() as sock:
        _request(sock, msg)
        reply = _reply(sock)
        assert (reply["ok"], reply["error"]) == (False, "invalid")
        assert reply["message"].startswith(f"request field '{field}' must be 1 to {rules.MAX_NAME} characters without NUL")
        _request(sock, {"op": "status"})
        assert _reply(sock)["channels"] == []


def test_send_naming_one_block_twice_is_refused_and_stores_nothing(broker: int) -> None:
    """A send whose two parts name the same allocated block is refused whole: no object is
    stored (it was left in no queue, holding its block for good), and the block returns to
    the store when the client leaves."""
    ident = {"namespace": "default", "dataset_name": "twice"}
    with _raw() as sock:
        _request(sock, {"op": "create", **ident, "num_shards": 2, "max_queue_size": 4})
        assert _reply(sock)["ok"]
        _request(sock, {"op": "alloc", "sizes": [4096]})
        (offset,) = _reply(sock)["offsets"]
        part = {"offset": offset, "size": 4096}
        _request(sock, {"op": "send", **ident, "parts": [part, part]})
        reply = _reply(sock)
        assert (reply["ok"], reply["error"], reply["message"]) == (False, "invalid", f"offset {offset} is named by more than one part of one send")
        _request(sock, {"op": "stats"})
        assert _reply(sock)["objects"] == 0
    with DataSystem(ADDRESS) as ds:
        wait_until(lambda: ds.stats().used == 0, 10, "the client's block to return to the store")


def test_shards_of_all_channels_are_bounded_and_listed_over_pages(broker: int) -> None:
    """Channels of MAX_SHARDS shards up to MAX_SHARDS_IN_ALL in all are made; one more shard
    is refused naming the bound (each shard costs the broker about 1 KiB, and a raw client
    could make channels without end: issue 13); status lists them all, over several pages."""
    full = rules.MAX_SHARDS_IN_ALL // rules.MAX_SHARDS
    with _raw() as sock:
        for i in range(full):
            _request(sock, {"op": "create", "namespace": "wide", "dataset_name": f"c{i:02d}",
                            "num_shards": rules.MAX_SHARDS, "max_queue_size": 1})
            assert _reply(sock)["ok"]
        _request(sock, {"op": "create", "namespace": "wide", "dataset_name": "one-more", "num_shards": 1, "max_queue_size": 1})
        reply = _reply(sock)
        assert (reply["ok"], reply["error"], reply["message"]) == (
            False, "invalid", f"no room for a channel of num_shards=1: a broker holds at most {rules.MAX_SHARDS_IN_ALL} "
            f"shards in all its channels (MAX_SHARDS_IN_ALL) and the others have {rules.MAX_SHARDS_IN_ALL}; close channels first")
        status: Any = shmchannel.status()
        assert [c["dataset_name"] for c in status["channels"]] == [f"c{i:02d}" for i in range(full)]
    with DataSender(ADDRESS, namespace="wide", dataset_name="one-more"):  # the raw client's channels went with it
        pass
