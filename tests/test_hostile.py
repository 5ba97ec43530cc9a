"""Hostile and careless clients of the embedded broker (issue 5, items 6-8).

- The broker survives garbage: random bytes, truncated frames, impossible lengths, frames
  that are not requests, malformed requests, clients that never speak and a thousand
  connections opened and dropped. Each abuse runs while a real DataSender/DataReceiver
  pair streams on another channel (``streaming``), which must go on delivering every
  object once, in order, to the same broker.
- Names: odd but valid names work end to end and never become files anywhere.
- Security: only the broker's uid gets in -- the runtime directory keeps others out, and
  the broker itself refuses a peer of another uid (SO_PEERCRED).

The broker's stderr is ``broker.log`` in the runtime directory: where the broker logs why
it dropped a client, the tests check that line.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pwd
import random
import re
import resource
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from shmchannel import ChannelClosed, DataReceiver, DataSender, DataSystem, config
from shmchannel.broker import daemon, protocol
from shmchannel.channel import MAX_NAME
from shmchannel.testing import join_ok, open_files, start_process, wait_until

from .conftest import ADDRESS

pytestmark = pytest.mark.timeout(60)  # each runs in well under 20 s; this only bounds a hang

#: The channel the streaming pair uses; abusers name it too, and must not disturb it.
STREAM = {"namespace": "stream-ns", "dataset_name": "stream"}
ARENA_ROWS = 8192  # int64 rows: 64 KiB through the arena; the other objects (4 rows) travel inline


# -- the streaming pair (children: module level, spawn imports them by name) ----------------


def _stream_send(stop: Any, sent: Any) -> None:
    with DataSender(ADDRESS, max_queue_size=4, **STREAM) as sender:
        i = 0
        while not stop.is_set():
            sender.send(np.full(ARENA_ROWS if i % 2 else 4, i, dtype=np.int64), timeout=30)
            i += 1
            sent.value = i
            time.sleep(0.001)  # two CPUs here: leave the abuse and the broker some room


def _stream_recv(received: Any) -> None:
    with DataReceiver(ADDRESS, wait=30, **STREAM) as receiver:
        i = 0
        while True:
            try:
                got = receiver.recv(timeout=30)
            except ChannelClosed:
                return
            rows = ARENA_ROWS if i % 2 else 4
            assert got.shape == (rows,) and (got == i).all(), f"object {i} arrived as {got[:4]} ({got.shape})"
            i += 1
            received.value = i


class Stream:
    def __init__(self, received: Any) -> None:
        self._received = received

    def flowing(self, more: int = 5, timeout: float = 15.0) -> None:
        """Wait until ``more`` further objects have arrived."""
        mark = self._received.value
        wait_until(lambda: self._received.value >= mark + more, timeout, f"the stream to move on from {mark} objects")


@contextlib.contextmanager
def streaming(broker: int) -> Iterator[Stream]:
    """A sender and a receiver process streaming on ``STREAM`` for the block; after it, the
    stream must still flow, end cleanly with every object received once and in order (the
    receiver checks each), and the broker must be the same process."""
    ctx = multiprocessing.get_context("spawn")
    stop, sent, received = ctx.Event(), ctx.Value("q", 0), ctx.Value("q", 0)
    procs = [start_process(_stream_send, stop, sent), start_process(_stream_recv, received)]
    stream = Stream(received)
    try:
        stream.flowing(10, 30)
        yield stream
        stream.flowing()
    finally:
        stop.set()
        for proc in procs:
            join_ok(proc, 30)
    assert received.value == sent.value > 10
    assert _status()["pid"] == broker


# -- helpers ----------------------------------------------------------------------------


def _status() -> dict[str, Any]:
    status = daemon.status()
    assert status is not None, "the broker is gone"
    return status


def _clients() -> int:
    return int(_status()["clients"])  # counts the status request's own connection


def _raw(timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(config.socket_path()))  # blocking: waits while the listen backlog is full (EAGAIN otherwise)
    sock.settimeout(timeout)
    return sock


def _frame(body: dict[str, Any] | bytes, payload: bytes = b"") -> bytes:
    if isinstance(body, dict):
        return b"".join(protocol.encode(body, payload))
    return protocol.HEAD.pack(len(body), len(payload)) + body + payload


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the broker closed the connection"
        data += chunk
    return data


def _reply(sock: socket.socket) -> dict[str, Any]:
    json_len, payload_len = protocol.parse_head(_exactly(sock, protocol.HEAD.size))
    body = _exactly(sock, json_len)
    _exactly(sock, payload_len)
    return protocol.parse_body(body, request=False)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send what the broker may stop reading at any point (it hangs up on a bad frame)."""
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _until_hung_up(sock: socket.socket) -> bytes:
    """Everything the broker sends until it closes the connection (AssertionError if it doesn't)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:  # it closed with our unread bytes still queued
            return data
        except socket.timeout:
            raise AssertionError(f"the broker kept the connection open ({len(data)} bytes received)") from None
        if not chunk:
            return data
        data += chunk


def _frames(data: bytes) -> list[dict[str, Any]]:
    replies = []
    while data:
        json_len, payload_len = protocol.parse_head(data[: protocol.HEAD.size])
        end = protocol.HEAD.size + json_len
        replies.append(protocol.parse_body(data[protocol.HEAD.size : end], request=False))
        data = data[end + payload_len :]
    return replies


def _log() -> str:
    return (config.runtime_dir() / "broker.log").read_text(errors="replace")


def _wait_logged(text: str, count: int = 1) -> None:
    wait_until(lambda: _log().count(text) >= count, 10, f"the broker to log {text!r} ({count} times)")


def _internal_errors() -> list[str]:
    """Log lines at ERROR or worse: the broker met something it did not expect (a bug)."""
    return [line for line in _log().splitlines() if re.match(r"\S+ \S+ \d+ (ERROR|CRITICAL) ", line)]


def _bad_frame(reason: str) -> str:
    return f"client pid {os.getpid()} disconnected: bad frame: {reason}"


# -- item 6: garbage --------------------------------------------------------------------

#: Valid requests back to back, which the fuzz mutates byte by byte. Never "stop"; its own
#: channel, never STREAM (a receiver of STREAM would legitimately take the stream's objects).
FUZZ_IDENT = {"namespace": "fuzz", "dataset_name": "fz"}
FUZZ_CORPUS: list[tuple[dict[str, Any], bytes]] = [
    ({"op": "hello", "version": protocol.PROTOCOL_VERSION}, b""),
    ({"op": "create", **FUZZ_IDENT, "num_shards": 2, "max_queue_size": 3}, b""),
    ({"op": "slab", "size": 1 << 20, "need": 4096, "timeout": 0.2}, b""),
    ({"op": "unslab", "offsets": [0]}, b""),
    ({"op": "alloc", "sizes": [100]}, b""),
    ({"op": "free", "offsets": [0]}, b""),
    ({"op": "log"}, b""),
    ({"op": "open", **FUZZ_IDENT, "shard": 1}, b""),
    ({"op": "queue", **FUZZ_IDENT}, b""),
    ({"op": "put", "parts": [{"inline": [0, 4]}]}, b"data"),
    ({"op": "get", "key": "k"}, b""),
    ({"op": "release", "keys": ["k"]}, b""),
    ({"op": "contains", "key": "k"}, b""),
    ({"op": "delete", "key": "k"}, b""),
    ({"op": "cancel"}, b""),
    ({"op": "stats"}, b""),
    ({"op": "detach", **FUZZ_IDENT}, b""),
    ({"op": "detach", **FUZZ_IDENT, "claimer": 1, "receiver": 1, "shard": 1}, b""),
    ({"op": "close", **FUZZ_IDENT}, b""),
]
FUZZ_SEED = 20240605
FUZZ_CONNECTIONS = 200


def _fuzz_inputs() -> Iterator[bytes]:
    """Per connection 1-4 KiB: random bytes; a valid head before random bytes; or the corpus
    with 1-8 random bytes replaced (heads included) -- in turn."""
    rng = random.Random(FUZZ_SEED)
    corpus = b"".join(_frame(msg, payload) for msg, payload in FUZZ_CORPUS)
    for i in range(FUZZ_CONNECTIONS):
        size = rng.randint(1024, 4096)
        if i % 3 == 0:
            yield rng.randbytes(size)
        elif i % 3 == 1:
            yield _frame(rng.randbytes(size - protocol.HEAD.size))
        else:
            data = bytearray((corpus * (size // len(corpus) + 1))[:size])
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(size)] = rng.randrange(256)
            assert b'"stop"' not in data  # the one request that may legitimately end the broker
            yield bytes(data)


def test_random_bytes_never_hurt_the_broker(broker: int) -> None:
    """200 connections of seeded garbage (random bytes, random bodies behind a valid head,
    valid requests with random bytes replaced) each end with the broker hanging up once we
    stop sending; meanwhile another channel keeps streaming, no internal error is logged,
    and afterwards the broker has as many clients and open files as before."""
    with streaming(broker) as stream:
        files = open_files(broker)  # first: the status request of _clients() holds one while it runs
        clients = _clients()
        for i, data in enumerate(_fuzz_inputs()):
            with _raw() as sock:
                _send_quietly(sock, data)
                _until_hung_up(sock)
            if i % 25 == 24:
                stream.flowing(1)
        wait_until(lambda: _clients() == clients, 10, f"the client count to return to {clients}")
        wait_until(lambda: open_files(broker) == files, 10, f"the broker's open files to return to {files}")
    assert _log().count(_bad_frame("")) >= 2 * FUZZ_CONNECTIONS // 3
    assert not _internal_errors()


TRUNCATED = {
    "half-a-head": protocol.HEAD.pack(40, 0)[:3],
    "head-only": protocol.HEAD.pack(40, 0),
    "half-the-json": _frame({"op": "create", "namespace": "cut", "dataset_name": "c", "num_shards": 1,
                             "max_queue_size": 1})[:40],
    "json-without-payload": _frame({"op": "put", "parts": [{"inline": [0, 1 << 20]}]}, b"x" * (1 << 20))[:5000],
    "at-the-json-limit": protocol.HEAD.pack(protocol.MAX_JSON, 0) + b" " * 1000,
    "at-the-payload-limit": protocol.HEAD.pack(2, protocol.MAX_PAYLOAD) + b"{}" + b"x" * 1000,
}


def test_truncated_frames_are_dropped_with_their_sender(broker: int) -> None:
    """A frame cut short (in its head, its JSON or its payload), and a whole request followed
    by the start of another, then the end of the connection: the whole request is answered,
    the cut one never acted on, the connection closed; another channel keeps streaming."""
    with streaming(broker) as stream:
        clients = _clients()
        for name, data in TRUNCATED.items():
            with _raw() as sock:
                _send_quietly(sock, data)
                assert _until_hung_up(sock) == b"", name
        with _raw() as sock:
            create = {"op": "create", "namespace": "cut", "dataset_name": "whole", "num_shards": 1, "max_queue_size": 1}
            _send_quietly(sock, _frame({"op": "contains", "key": "k"}) + _frame(create)[:-1])
            assert _frames(_until_hung_up(sock)) == [{"ok": True, "found": False}]
        stream.flowing()
        assert [c["namespace"] for c in _status()["channels"]] == [STREAM["namespace"]]
        wait_until(lambda: _clients() == clients, 10, f"the client count to return to {clients}")


def test_lengths_at_the_limits_are_awaited(broker: int) -> None:
    """A head announcing exactly MAX_JSON of JSON and MAX_PAYLOAD of payload is not refused:
    the broker waits for the rest, and a whole MAX_JSON-sized request is answered."""
    with _raw(timeout=0.5) as sock:
        sock.sendall(protocol.HEAD.pack(2, protocol.MAX_PAYLOAD) + b"{}" + b"x" * 4096)
        with pytest.raises(socket.timeout):
            sock.recv(1)  # neither a reply nor a hang-up: it waits for the payload
    body = json.dumps({"op": "contains", "key": "k"}).encode()
    with _raw() as sock:
        sock.sendall(_frame(body + b" " * (protocol.MAX_JSON - len(body))))
        assert _reply(sock) == {"ok": True, "found": False}
    assert _status()["pid"] == broker


@pytest.mark.parametrize(
    ("json_len", "payload_len", "reason"),
    [
        (protocol.MAX_JSON + 1, 0, f"frame JSON length {protocol.MAX_JSON + 1} outside 1..{protocol.MAX_JSON}"),
        (0xFFFFFFFF, 0, f"frame JSON length {0xFFFFFFFF} outside 1..{protocol.MAX_JSON}"),
        (0, 0, f"frame JSON length 0 outside 1..{protocol.MAX_JSON}"),
        (2, protocol.MAX_PAYLOAD + 1, f"frame payload length {protocol.MAX_PAYLOAD + 1} above {protocol.MAX_PAYLOAD}"),
        (2, 0xFFFFFFFF, f"frame payload length {0xFFFFFFFF} above {protocol.MAX_PAYLOAD}"),
    ],
    ids=["json-above-limit", "json-4GiB", "json-empty", "payload-above-limit", "payload-4GiB"],
)
def test_impossible_lengths_disconnect_at_once(broker: int, json_len: int, payload_len: int, reason: str) -> None:
    """A head announcing a JSON length outside 1..MAX_JSON or a payload above MAX_PAYLOAD is
    enough: the broker hangs up without waiting for the body, logs why, and another channel
    keeps streaming."""
    with streaming(broker):
        with _raw() as sock:
            sock.sendall(protocol.HEAD.pack(json_len, payload_len))
            assert _until_hung_up(sock) == b""
        _wait_logged(_bad_frame(reason))


NOT_REQUESTS = [
    (b"[1, 2]", "frame body must be a JSON object"),
    (b'"status"', "frame body must be a JSON object"),
    (b"null", "frame body must be a JSON object"),
    (b"5", "frame body must be a JSON object"),
    (b'{"x": 1}', "request must have a string 'op'"),
    (b'{"op": 5}', "request must have a string 'op'"),
    (b'{"op": null}', "request must have a string 'op'"),
    (b'{"op": ["status"]}', "request must have a string 'op'"),
    (b"not json", "frame body is not JSON: "),
    (b'{"op": "status"', "frame body is not JSON: "),
    (b'\xff\xfe{"op": "status"}', "frame body is not JSON: "),
    (b'{"op": "contains", "key": ' + b"7" * 5000 + b"}", "frame body is not JSON: Exceeds the limit"),
    (b'{"op": "alloc", "sizes": [Infinity]}', "frame body is not JSON: Infinity is not a number"),
    (b'{"op": "free", "offsets": [-Infinity]}', "frame body is not JSON: -Infinity is not a number"),
    (b'{"op": "alloc", "sizes": [NaN]}', "frame body is not JSON: NaN is not a number"),
]


def test_frames_that_are_not_requests_disconnect_their_sender(broker: int) -> None:
    """Well-framed bodies that are not a JSON object with a string "op" (arrays, scalars,
    no "op", a non-string "op", broken JSON, bad UTF-8, a 5000-digit number) get no reply:
    the broker hangs up, ignores the valid request behind them, logs why, and another
    channel keeps streaming."""
    with streaming(broker) as stream:
        for body, reason in NOT_REQUESTS:
            before = _log().count(_bad_frame(reason))
            with _raw() as sock:
                _send_quietly(sock, _frame(body) + _frame({"op": "sync"}))
                assert _until_hung_up(sock) == b"", body[:40]
            _wait_logged(_bad_frame(reason), before + 1)
        stream.flowing()


def test_deeply_nested_json_disconnects_only_its_sender(broker: int) -> None:
    """A frame of 100,000 nested arrays (within MAX_JSON) ends its connection, not the
    broker; another channel keeps streaming."""
    with streaming(broker):
        for body in (b"[" * 100_000, b'{"a":' * 100_000):
            with _raw() as sock:
                _send_quietly(sock, _frame(body) + _frame({"op": "sync"}))
                assert _until_hung_up(sock) == b""


def test_deeply_nested_json_is_logged_as_a_bad_frame(broker: int) -> None:
    """Deeply nested JSON is a bad frame like any other: a warning naming it, no internal error."""
    with _raw() as sock:
        _send_quietly(sock, _frame(b"[" * 100_000))
        _until_hung_up(sock)
    # The broker logs why before it hangs up: no need to wait.
    assert not _internal_errors()
    assert _bad_frame("frame body is not JSON: ") in _log()


# Malformed requests, each a well-formed frame: (request, payload, error code, what the
# message names). TARGET is a channel with a sender and one object queued per shard, which
# none of them may disturb.
TARGET = {"namespace": "target", "dataset_name": "t"}
BAD_REQUESTS: list[tuple[dict[str, Any], bytes, str, str]] = [
    ({"op": "fly"}, b"", "invalid", "unknown operation 'fly'"),
    ({"op": ""}, b"", "invalid", "unknown operation ''"),
    ({"op": "Stop"}, b"", "invalid", "unknown operation 'Stop'"),
    ({"op": "_dispatch"}, b"", "invalid", "unknown operation '_dispatch'"),
    ({"op": "__init__"}, b"", "invalid", "unknown operation '__init__'"),
    ({"op": "hello", "version": "2"}, b"", "invalid", "client speaks protocol 2"),
    ({"op": "open", **TARGET, "shard": "x"}, b"", "invalid", "'shard'"),
    ({"op": "open", **TARGET, "shard": 1.5}, b"", "invalid", "'shard'"),
    ({"op": "open", **TARGET, "shard": True}, b"", "invalid", "'shard'"),
    ({"op": "open", **TARGET, "shard": 2}, b"", "invalid", "shard_id must be less than num_shards (2)"),
    ({"op": "queue", **TARGET, "shard": "0"}, b"", "invalid", "'shard'"),
    ({"op": "open", "namespace": 5, "dataset_name": "t", "shard": 0}, b"", "invalid", "'namespace'"),
    ({"op": "detach", **TARGET, "claimer": "x"}, b"", "invalid", "'claimer'"),
    ({"op": "slab", "size": "big"}, b"", "invalid", "'size'"),
    ({"op": "slab", "size": 100}, b"", "invalid", "positive multiples of 64"),
    ({"op": "slab", "size": 64, "need": 128}, b"", "invalid", "positive multiples of 64"),
    ({"op": "slab", "size": 1 << 40}, b"", "store_full", "the store holds"),
    ({"op": "unslab", "offsets": "no"}, b"", "invalid", "'offsets'"),
    ({"op": "create", "namespace": "n", "dataset_name": ["x"], "num_shards": 1, "max_queue_size": 1}, b"", "invalid",
     "'dataset_name'"),
    ({"op": "create", "namespace": "n", "dataset_name": "x", "num_shards": "x", "max_queue_size": 1}, b"", "invalid",
     "'num_shards'"),
    ({"op": "create", **TARGET, "num_shards": 2, "max_queue_size": 1}, b"", "name_in_use", "already used by a sender"),
    ({"op": "close", **TARGET}, b"", "endpoint_closed", "not the sender of channel target/t"),
    ({"op": "alloc", "sizes": 5}, b"", "invalid", "'sizes'"),
    ({"op": "alloc", "sizes": ["x"]}, b"", "invalid", "'sizes' must be an int >= 0, got 'x'"),
    ({"op": "alloc", "sizes": [-1]}, b"", "invalid", "'sizes' must be an int >= 0"),
    ({"op": "free", "offsets": "no"}, b"", "invalid", "'offsets'"),
    ({"op": "put", "parts": "no"}, b"", "invalid", "'parts'"),
    ({"op": "put", "parts": [5]}, b"", "invalid", "malformed 'put' request"),
    ({"op": "put", "parts": ["inline"]}, b"", "invalid", "malformed 'put' request"),
    ({"op": "put", "parts": [{"inline": "ab"}]}, b"abc", "invalid", "start and length must be an int >= 0"),
    ({"op": "put", "parts": [{"inline": [0, 9]}]}, b"abc", "invalid", "inline part outside the payload"),
    ({"op": "put", "parts": [{"inline": [2, -1]}]}, b"abc", "invalid", "start and length must be an int >= 0"),
    ({"op": "put", "parts": [{"size": -8, "offset": 0}]}, b"", "invalid", "size must be an int >= 0"),
    ({"op": "alloc", "sizes": [1.5]}, b"", "invalid", "'sizes' must be an int >= 0"),
    ({"op": "free", "offsets": ["12"]}, b"", "invalid", "'offsets' must be an int >= 0"),
    ({"op": "put", "parts": [{"size": 8, "offset": 0}]}, b"", "invalid", "offset 0 is not an allocation"),
    ({"op": "put", "parts": []}, b"", "invalid", "malformed 'put' request"),
    ({"op": "get", "key": 5}, b"", "invalid", "'key'"),
    ({"op": "contains", "key": None}, b"", "invalid", "'key'"),
    ({"op": "delete", "key": ["k"]}, b"", "invalid", "'key'"),
]
MALFORMED = [pytest.param(*case, id=f"{case[0]['op'] or 'no-op'}-{i}") for i, case in enumerate(BAD_REQUESTS)]

# One-way operations with bad fields: (request, the warning the broker logs, or None when
# the request is quietly without effect).
BAD_ONE_WAY: list[tuple[dict[str, Any], str | None]] = [
    ({"op": "release", "keys": 5}, "release failed: InvalidArgument(\"request field 'keys'"),
    ({"op": "release", "keys": [5, None, {"a": 1}, "no-such-key"]}, None),
    ({"op": "cancel", "junk": {"a": [1]}}, None),
]


@contextlib.contextmanager
def _target() -> Iterator[tuple[DataSender, str]]:
    """TARGET with two shards and one object queued in each; yields the sender and the key of shard 0's."""
    with DataSender(ADDRESS, num_shards=2, **TARGET) as sender:
        sender.send(np.arange(2 * ARENA_ROWS).reshape(2, -1))
        queue = sender.get_queue()
        yield sender, queue[0][0]
        assert sender.get_queue() == queue, "a malformed request changed another client's channel"
    with DataReceiver(ADDRESS, shard_id=1, **TARGET) as receiver:
        np.testing.assert_array_equal(receiver.recv(timeout=10), np.arange(ARENA_ROWS, 2 * ARENA_ROWS).reshape(1, -1))


@pytest.mark.parametrize(("request_", "payload", "code", "names"), MALFORMED)
def test_malformed_request_gets_an_error_reply(
    broker: int, request_: dict[str, Any], payload: bytes, code: str, names: str
) -> None:
    """A well-framed request with an unknown op, fields of the wrong type or range, or
    naming another client's channel, is answered with an error (code "invalid" for a bad
    field) naming what is wrong; the connection goes on working, the channel the request
    names is left as it was, and the broker logs no internal error."""
    with _target(), _raw() as sock:
        sock.sendall(_frame(request_, payload) + _frame({"op": "contains", "key": "k"}))
        reply = _reply(sock)
        assert (reply["ok"], reply.get("error")) == (False, code), reply
        assert names in reply["message"]
        assert _reply(sock) == {"ok": True, "found": False}
    assert _status()["pid"] == broker
    assert not _internal_errors()


@pytest.mark.parametrize(("request_", "warning"), [pytest.param(*c, id=f"{c[0]['op']}-{i}") for i, c in enumerate(BAD_ONE_WAY)])
def test_malformed_one_way_request_gets_no_reply(broker: int, request_: dict[str, Any], warning: str | None) -> None:
    """A one-way operation (release, hold, cancel) with bad fields, or
    naming another client's objects, gets no reply and has no effect: the next request's
    reply is the first to come, the named channel is unchanged, and the broker logs the
    failure where the fields were bad."""
    with _target() as (_, key), _raw() as sock:
        msg = json.loads(json.dumps(request_).replace("<queued>", key))
        sock.sendall(_frame(msg) + _frame({"op": "contains", "key": "k"}))
        assert _reply(sock) == {"ok": True, "found": False}
        if warning is not None:
            _wait_logged(f"client pid {os.getpid()}: {warning}")
    assert _status()["pid"] == broker
    assert not _internal_errors()


def _aimed_at_stream(msg: dict[str, Any]) -> dict[str, Any]:
    """``msg`` naming STREAM where it names TARGET (other fields, bad ones included, as they are)."""
    text = json.dumps(msg).replace('"target"', json.dumps(STREAM["namespace"]))
    return dict(json.loads(text.replace('"t"', json.dumps(STREAM["dataset_name"])).replace("<queued>", "no-such-key")))


def test_malformed_requests_naming_a_live_channel_do_not_disturb_it(broker: int) -> None:
    """Every malformed request above, aimed at the channel that streams and pipelined on one
    connection, gets one error reply per two-way request and none for the one-way ones; the
    stream keeps flowing, in order and complete."""
    two_way = [(msg, payload, True) for msg, payload, _, _ in BAD_REQUESTS]
    frames = [_frame(_aimed_at_stream(msg), payload) for msg, payload, _ in two_way]
    frames += [_frame(_aimed_at_stream(msg)) for msg, _ in BAD_ONE_WAY]
    with streaming(broker) as stream:
        for _ in range(5):
            with _raw() as sock:
                _send_quietly(sock, b"".join(frames))
                replies = _frames(_until_hung_up(sock))
            assert len(replies) == len(two_way)
            for (msg, _, refused), reply in zip(two_way, replies):
                assert reply["ok"] is False or not refused, (msg, reply)
            stream.flowing(1)


def test_silent_clients_do_not_hold_up_others(broker: int) -> None:
    """Clients that connect and never speak, or stop in the middle of a frame, are held open
    while everyone else is served: the stream flows, a DataSystem round trip works; once
    they leave, the client count is what it was."""
    with streaming(broker) as stream:
        clients = _clients()
        with contextlib.ExitStack() as silent:
            socks = [silent.enter_context(_raw()) for _ in range(7)]
            socks[5].sendall(protocol.HEAD.pack(40, 0)[:5])
            socks[6].sendall(protocol.HEAD.pack(40, 0) + b'{"op": ')
            wait_until(lambda: _clients() == clients + 7, 10, f"{clients + 7} clients")
            stream.flowing(20)
            with DataSystem(ADDRESS) as ds:
                key = ds.put(np.arange(1 << 17))
                np.testing.assert_array_equal(ds.get(key), np.arange(1 << 17))
                ds.delete(key)
            stream.flowing()
        wait_until(lambda: _clients() == clients, 10, f"the client count to return to {clients}")


def test_a_thousand_dropped_connections_leave_nothing(broker: int) -> None:
    """1,000 connections opened and dropped -- at once, after a hello whose reply is never
    read, in the middle of a head, and while waiting for a channel that never comes -- leave
    the client count and the broker's open files as they were; the stream flows meanwhile."""
    hello = _frame({"op": "hello", "version": protocol.PROTOCOL_VERSION})
    wait = _frame({"op": "open", "namespace": "never", "dataset_name": "n", "shard": 0, "timeout": None})
    sends = [b"", hello, hello[:5], wait]
    with streaming(broker) as stream:
        files = open_files(broker)
        clients = _clients()
        for i in range(1000):
            with _raw() as sock:
                if sends[i % 4]:
                    sock.sendall(sends[i % 4])
            if i % 100 == 99:
                stream.flowing(1)
        wait_until(lambda: _clients() == clients, 10, f"the client count to return to {clients}")
        wait_until(lambda: open_files(broker) == files, 10, f"the broker's open files to return to {files}")


# The broker's own checks of create: a malformed create must be refused before it changes
# anything, and must not be able to exhaust the broker's memory.
@pytest.mark.parametrize(
    ("field", "value"), [("num_shards", 0), ("num_shards", -1), ("num_shards", 2**40), ("max_queue_size", 0), ("max_queue_size", -1)]
)
def test_create_with_impossible_sizes_is_refused(broker: int, field: str, value: int) -> None:
    """A create with num_shards or max_queue_size below 1, or num_shards beyond any machine
    (2**40), gets an "invalid" error naming the field and leaves no channel behind."""
    if value == 2**40:
        # Without a fix this create allocates until the broker is out of memory: on this
        # machine it grew to 24 GB and was killed by the OOM killer. Cap the broker's
        # address space first, so that it meets a MemoryError instead.
        with open(f"/proc/{broker}/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        limit = size + (512 << 20)
        try:
            resource.prlimit(broker, resource.RLIMIT_AS, (limit, limit))
        except OSError as exc:
            pytest.skip(f"cannot cap the broker's memory ({exc}): this create could exhaust the machine's")
        assert resource.prlimit(broker, resource.RLIMIT_AS) == (limit, limit)
    with _raw(timeout=30) as sock:
        sock.sendall(_frame({"op": "create", "namespace": "bad", "dataset_name": "sizes", "num_shards": 1,
                             "max_queue_size": 1, field: value}))
        reply = _reply(sock)
        listed = [c["dataset_name"] for c in _status()["channels"]]
    assert _status()["pid"] == broker
    assert (reply["ok"], reply.get("error")) == (False, "invalid"), reply
    assert field in reply["message"]
    assert listed == []


# -- item 7: names ----------------------------------------------------------------------

#: Valid names ({m}: a marker unique to the test, to look for files named after them).
ODD_NAMES = {
    "unicode-path": "データ/ü{m}",
    "slashes": "a/b/{m}",
    "dot-dot-path": "../../{m}",
    "absolute-path": "/tmp/{m}",
    "dot-dot": "..",
    "dot": ".",
    "slash": "/",
    "at-limit-ascii": "{m}",  # padded to MAX_NAME characters
    "at-limit-3-byte": "データ{m}",  # padded with "デ": 3 bytes each in UTF-8
    "at-limit-4-byte": "🚀{m}",  # padded with "🚀": 4 bytes each in UTF-8
    "spaces": " {m} ",
    "control-chars": "\n\t\x01{m}\x7f",
    "format-chars": "%s%n{m}{{}}",
    "lone-surrogate": "\ud800{m}",
}
PADDING = {"at-limit-ascii": "x", "at-limit-3-byte": "デ", "at-limit-4-byte": "🚀"}


def _odd_name(case: str, marker: str) -> str:
    name = ODD_NAMES[case].format(m=marker)
    if case in PADDING:
        name += PADDING[case] * (MAX_NAME - len(name))
        assert len(name) == MAX_NAME
    return name


def _files_named(marker: str) -> list[str]:
    """Entries anywhere a name could have been turned into a path, containing ``marker``."""
    rt = config.runtime_dir()
    places = {rt, rt.parent, rt.parent.parent, Path("/"), Path("/tmp"), config.shm_dir(), config.shm_dir().parent,
              Path.cwd(), Path.cwd().parent}
    found = []
    for place in places:
        with contextlib.suppress(OSError):
            found += [str(place / e) for e in os.listdir(place) if marker in e]
    return found


def _runtime_entries() -> set[str]:
    rt = config.runtime_dir()
    return {str(p.relative_to(rt)) for p in rt.rglob("*")}


BROKER_FILES = {"broker.sock", "broker.lock", "broker.log"}


@pytest.mark.parametrize("param", ["namespace", "dataset_name"])
@pytest.mark.parametrize("case", sorted(ODD_NAMES))
def test_odd_names_work_end_to_end_and_stay_names(broker: int, case: str, param: str) -> None:
    """A namespace or dataset_name with unicode, "/", "..", control characters, a lone
    surrogate or exactly MAX_NAME characters (of 1, 3 or 4 bytes) carries data both ways
    (inline and through the arena), is listed by status() exactly, and creates no file:
    the runtime directory holds only the broker's socket, lock and log, /dev/shm only its
    arena, and nothing anywhere is named after it."""
    marker = f"shc{uuid.uuid4().hex[:10]}"
    name = _odd_name(case, marker)
    ident = {"namespace": "ns", "dataset_name": "ds", param: name}
    shm = config.our_shm_entries(broker)
    assert _runtime_entries() == BROKER_FILES
    with DataSender(ADDRESS, num_shards=2, **ident) as sender, DataReceiver(ADDRESS, shard_id=1, **ident) as receiver:
        sender.send(np.arange(2 * ARENA_ROWS).reshape(2, -1))
        sender.send([name, name[::-1]])
        listed = [(c["namespace"], c["dataset_name"]) for c in _status()["channels"]]
        assert listed == [(ident["namespace"], ident["dataset_name"])]
        np.testing.assert_array_equal(receiver.recv(timeout=10), np.arange(ARENA_ROWS, 2 * ARENA_ROWS).reshape(1, -1))
        assert receiver.recv(timeout=10) == [name[::-1]]
        assert (receiver.namespace, receiver.dataset_name) == (ident["namespace"], ident["dataset_name"])
    assert _runtime_entries() == BROKER_FILES
    assert config.our_shm_entries(broker) == shm
    assert _files_named(marker) == []


@pytest.mark.parametrize("endpoint", [DataSender, DataReceiver])
@pytest.mark.parametrize("param", ["namespace", "dataset_name"])
def test_name_limit_counts_characters_not_bytes(broker: int, endpoint: Any, param: str) -> None:
    """MAX_NAME counts characters: MAX_NAME four-byte characters are a valid name (the
    receiver finds the channel), one more -- or a name too large for a frame -- is refused
    with a ValueError naming the parameter, before the broker is asked."""
    at_limit = "🚀" * MAX_NAME
    ident = {"namespace": "ns", "dataset_name": "ds", param: at_limit}
    with DataSender(ADDRESS, **ident), DataReceiver(ADDRESS, **ident):
        pass
    for name in ("🚀" * (MAX_NAME + 1), "x" * (protocol.MAX_JSON + 1)):
        with pytest.raises(ValueError, match=f"^{param} must be 1 to {MAX_NAME} characters without NUL, got .* "
                                             f"\\(length {len(name)}\\)$"):
            endpoint(ADDRESS, **{"namespace": "ns", "dataset_name": "ds", param: name})
    assert _status()["channels"] == []
    assert _status()["pid"] == broker


def test_names_the_api_refuses_are_only_kept_in_memory(broker: int) -> None:
    """Names the API refuses (empty, with NUL, 100,000 characters, path-like), sent to the
    broker by a raw client, either get an error or are held as plain strings: status()
    lists them exactly, and no file is made for them."""
    marker = f"shc{uuid.uuid4().hex[:10]}"
    names = ["", f"a\x00{marker}", marker * (100_000 // len(marker)), f"../../../{marker}", f"/tmp/{marker}\x00x"]
    with _raw() as sock:
        for name in names:
            sock.sendall(_frame({"op": "create", "namespace": name, "dataset_name": name, "num_shards": 1,
                                 "max_queue_size": 1}))
            reply = _reply(sock)
            assert reply["ok"] or reply["error"] == "invalid", reply
        created = {(c["namespace"], c["dataset_name"]) for c in _status()["channels"]}
        assert created <= {(n, n) for n in names}
        assert _runtime_entries() == BROKER_FILES
        assert _files_named(marker) == []
    assert _status()["pid"] == broker


# -- item 8: only the broker's uid gets in ------------------------------------------------


def test_runtime_dir_socket_and_arena_are_private(broker: int) -> None:
    """The runtime directory is mode 0700, the socket 0600 and the arena (and any other
    entry of the broker in /dev/shm) 0600, all owned by the broker's uid."""
    rt = config.runtime_dir(create=False)
    shm = config.our_shm_entries(broker)
    assert config.shm_dir() / config.shm_name(broker, "arena") in shm
    for path, mode in ((rt, 0o700), (rt / "broker.sock", 0o600), *((entry, 0o600) for entry in shm)):
        info = path.stat()
        assert (oct(stat.S_IMODE(info.st_mode)), info.st_uid) == (oct(mode), os.getuid()), path
    assert stat.S_ISSOCK((rt / "broker.sock").stat().st_mode)


#: Run as another user: imports nothing of shmchannel (only the standard library).
CONNECT_SCRIPT = r"""
import errno, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
else:
    print("connected")
"""

HELLO_SCRIPT = r"""
import json, os, socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
body = json.dumps({"op": "hello", "version": int(sys.argv[2])}).encode()
try:
    sock.sendall(struct.pack("<II", len(body), 0) + body)
except (BrokenPipeError, ConnectionResetError):
    pass  # the broker may hang up before the hello is written: its reply is already here
data, end = b"", None
while end is None:
    try:
        chunk = sock.recv(65536)
    except ConnectionResetError:
        end = "closed"
    except socket.timeout:
        end = "still open"
    else:
        if chunk:
            data += chunk
        else:
            end = "closed"
json_len, payload_len = struct.unpack("<II", data[:8])
print(json.dumps({"reply": json.loads(data[8 : 8 + json_len]), "after": len(data) - 8 - json_len - payload_len,
                  "end": end, "pid": os.getpid()}))
"""


@pytest.fixture
def nobody() -> Iterator[tuple[list[str], int]]:
    """The command prefix that runs this Python as user nobody, and nobody's uid (skips
    unless root with setpriv)."""
    if os.geteuid() != 0:
        pytest.skip("running a client as another user needs root")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    try:
        uid, gid = pwd.getpwnam("nobody")[2:4]
    except KeyError:
        uid = gid = 65534
    prefix = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", sys.executable, "-I", "-c"]
    probe = subprocess.run([*prefix, "import os; print(os.getuid())"], capture_output=True, text=True, timeout=20, cwd="/")
    if probe.returncode != 0 or probe.stdout.strip() != str(uid):
        pytest.skip(f"user nobody cannot run {sys.executable}: {probe.stderr.strip()[-200:]}")
    yield prefix, uid


def _run_as(prefix: list[str], script: str, *args: str) -> str:
    done = subprocess.run([*prefix, script, *args], capture_output=True, text=True, timeout=20, cwd="/",
                          env={"PATH": os.defpath})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_other_user_is_stopped_by_the_runtime_directory(broker: int, nobody: tuple[list[str], int]) -> None:
    """Another user cannot even reach the socket: the runtime directory (0700) refuses the
    connect with EACCES, before the broker sees anything."""
    clients = _clients()
    assert _run_as(nobody[0], CONNECT_SCRIPT, str(config.socket_path())) == "EACCES"
    assert "refused pid" not in _log()
    assert _clients() == clients
    assert _status()["pid"] == broker


def test_other_user_is_refused_by_the_broker(broker: int, nobody: tuple[list[str], int]) -> None:
    """With the directory and socket opened to everyone, another user's hello gets exactly
    one error reply, code "permission", naming both uids, and the connection is closed; the
    broker logs the refusal, never counts it as a client, and goes on serving its own uid."""
    rt = config.runtime_dir()
    sock_path = rt / "broker.sock"
    clients = _clients()
    prefix, uid = nobody
    try:
        os.chmod(rt, 0o711)  # (config.runtime_dir() would set 0700 again: not called until restored)
        os.chmod(sock_path, 0o666)
        outcome = json.loads(_run_as(prefix, HELLO_SCRIPT, str(sock_path), str(protocol.PROTOCOL_VERSION)))
    finally:
        os.chmod(sock_path, 0o600)
        os.chmod(rt, 0o700)
    assert outcome["reply"] == {
        "ok": False, "error": "permission", "message": f"this broker belongs to uid {os.getuid()}, you are uid {uid}"
    }
    assert (outcome["after"], outcome["end"]) == (0, "closed")
    _wait_logged(f"refused pid {outcome['pid']} of uid {uid}: only uid {os.getuid()} may use this broker")
    assert _clients() == clients
    assert _status()["pid"] == broker
    assert (stat.S_IMODE(rt.stat().st_mode), stat.S_IMODE(sock_path.stat().st_mode)) == (0o700, 0o600)
