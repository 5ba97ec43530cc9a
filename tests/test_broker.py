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
    """A posted request that succeeds gets no reply; one that fails gets an error marked
    posted; the next plain request's reply follows both."""
    ident = {"namespace": "default", "dataset_name": "posted"}
    with _raw() as sock:
        _request(sock, {"op": "create", **ident, "num_shards": 1, "max_queue_size": 4, "posted": True})
        _request(sock, {"op": "create", **ident, "num_shards": 0, "max_queue_size": 4, "posted": True})
        _request(sock, {"op": "queue", **ident, "shard": 0})
        failure = _reply(sock)
        assert failure["ok"] is False and failure["posted"] is True
        assert failure["message"] == "num_shards must be an int from 1 to 4096, got 0"
        assert _reply(sock) == {"ok": True, "queue": []}


def _open_missing(sock: socket.socket, name: str, rid: int) -> None:
    """An open of a channel no one made yet: it waits, for ``create`` (or its timeout)."""
    _request(sock, {"op": "open", "namespace": "default", "dataset_name": name, "shard": 0, "timeout": 30, "id": rid})


def _create(sock: socket.socket, name: str) -> None:
    _request(sock, {"op": "create", "namespace": "default", "dataset_name": name, "num_shards": 1, "max_queue_size": 4})
    assert _reply(sock)["ok"]


def test_requests_behind_a_waiting_one_are_handled_in_order(broker: int) -> None:
    """Requests that arrive while an earlier request of the same client waits (here an open
    of a channel not made yet) wait behind it and are answered in order once it completes."""
    with _raw() as sock, _raw() as other:
        _open_missing(sock, "behind", 2)
        _request(sock, {"op": "create", "namespace": "default", "dataset_name": "after", "num_shards": 1,
                        "max_queue_size": 4, "posted": True, "id": 3})
        _request(sock, {"op": "sync", "id": 4})
        _request(other, {"op": "status"})
        assert [c["dataset_name"] for c in _reply(other)["channels"]] == []  # the create waits its turn
        _create(other, "behind")
        assert _reply(sock)["id"] == 2  # the open, once the channel was made
        assert _reply(sock) == {"ok": True, "id": 4}  # after the create: its order was kept
        _request(other, {"op": "status"})
        assert sorted(c["dataset_name"] for c in _reply(other)["channels"]) == ["after", "behind"]


def test_a_look_is_answered_while_an_earlier_request_of_its_connection_waits(broker: int) -> None:
    """A queue listing sent behind an open that waits is answered at once, with its own id,
    and the waiting open is answered later with its id (issue 11: a monitoring thread's
    get_queue hung behind its producer thread's blocked call)."""
    with _raw() as sock, _raw() as other:
        _create(other, "look")
        _open_missing(sock, "not-yet", 2)
        _request(sock, {"op": "queue", "namespace": "default", "dataset_name": "look", "shard": 0, "id": 3})
        look = _reply(sock)
        assert look == {"ok": True, "queue": [], "id": 3}
        _create(other, "not-yet")
        assert _reply(sock)["id"] == 2


def test_cancel_withdraws_only_the_request_it_names(broker: int) -> None:
    """A cancel naming a request that waits behind another withdraws that one (answered
    Cancelled with its id) and leaves the waiting one waiting."""
    with _raw() as sock, _raw() as other:
        _open_missing(sock, "first", 2)  # waits
        _open_missing(sock, "second", 3)  # behind it
        _request(sock, {"op": "cancel", "id": 3})
        withdrawn = _reply(sock)
        assert (withdrawn["ok"], withdrawn["error"], withdrawn["id"]) == (False, "cancelled", 3)
        _request(sock, {"op": "cancel", "id": 99})  # names nothing: changes nothing
        _create(other, "second")
        _create(other, "first")
        assert _reply(sock)["id"] == 2
        _request(other, {"op": "status"})
        receivers = {c["dataset_name"]: c["receivers"] for c in _reply(other)["channels"]}
        assert receivers == {"first": 1, "second": 0}  # the withdrawn open attached nothing


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
