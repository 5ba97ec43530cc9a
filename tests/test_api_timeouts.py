"""Every timeout the API accepts works end to end (issue 13, item 5): inf, and numbers too
large for a lock or a float, mean no limit, as None does; NaN is refused naming the
parameter. The broker takes a raw out-of-range timeout as no limit too, and answers a
malformed one with an error reply, never an internal error or a dropped connection."""

from __future__ import annotations

import math
import select
import socket

import numpy as np
import pytest

from shmchannel import DataReceiver, DataSender, DataSystem, InvalidArgument
from shmchannel.broker import protocol

from .conftest import ADDRESS
from .test_broker import _raw, _reply

#: Timeouts meaning no limit: inf, past threading.TIMEOUT_MAX, and past any float.
NO_LIMIT = [math.inf, 1e300, 10**400]


@pytest.mark.parametrize("timeout", NO_LIMIT, ids=["inf", "1e300", "10**400"])
def test_timeout_without_limit_works_end_to_end(address: str, timeout: float) -> None:
    """send, peek, recv and the receiver's wait with such a timeout deliver, and the end of
    stream that close() sends still comes."""
    with DataSender(address, dataset_name="forever") as sender:
        sender.send(np.arange(3), timeout=timeout)
        receiver = DataReceiver(address, dataset_name="forever", wait=timeout)
        with receiver:
            np.testing.assert_array_equal(receiver.peek(timeout=timeout), np.arange(3))
            np.testing.assert_array_equal(receiver.recv(timeout=timeout), np.arange(3))
            sender.close()
            assert list(receiver) == []


@pytest.mark.parametrize("timeout", NO_LIMIT, ids=["inf", "1e300", "10**400"])
def test_datasystem_put_with_a_timeout_without_limit_stores(address: str, timeout: float) -> None:
    """DataSystem.put with such a timeout stores the object."""
    with DataSystem(address) as ds:
        key = ds.put(np.arange(4), timeout=timeout)
        np.testing.assert_array_equal(ds.get(key), np.arange(4))
        ds.delete(key)


def test_nan_timeout_is_refused_naming_the_parameter(broker: int) -> None:
    """A NaN timeout raises InvalidArgument naming the parameter, and nothing is sent."""
    with DataSender(ADDRESS, dataset_name="nan") as sender:
        with pytest.raises(InvalidArgument, match=r"^timeout must be None or a number of seconds >= 0, got nan \(float\)$"):
            sender.send([1], timeout=math.nan)
        assert sender.get_queue(0) == []


def _raw_request(sock: socket.socket, body: bytes) -> None:
    sock.sendall(protocol.HEAD.pack(len(body), 0) + body)


def test_broker_takes_a_raw_timeout_past_any_float_as_no_limit(broker: int) -> None:
    """An open whose JSON timeout is 1e400 (inf once parsed) waits without limit, and is
    answered when the channel comes: the broker neither fails nor drops the client."""
    ident = b'"namespace": "default", "dataset_name": "raw"'
    with _raw() as sock:
        _raw_request(sock, b'{"op": "open", ' + ident + b', "shard": 0, "timeout": 1e400, "id": 7}')
        assert not select.select([sock], [], [], 0.2)[0], "answered before the channel was there"
        with DataSender(ADDRESS, dataset_name="raw"):
            reply = _reply(sock)
            assert (reply["ok"], reply["id"]) == (True, 7), reply


@pytest.mark.parametrize("value", [b'"soon"', b"true", b"[1]"])
def test_broker_answers_a_malformed_raw_timeout_with_an_error(broker: int, value: bytes) -> None:
    """A request that would wait (an open of a channel not there yet) whose timeout is no
    number gets an 'invalid' error reply naming the field, and the connection goes on."""
    ident = b'"namespace": "default", "dataset_name": "raw"'
    missing = b'"namespace": "default", "dataset_name": "not-yet"'
    with DataSender(ADDRESS, dataset_name="raw"), _raw() as sock:
        _raw_request(sock, b'{"op": "open", ' + missing + b', "shard": 0, "timeout": ' + value + b"}")
        reply = _reply(sock)
        assert (reply["ok"], reply["error"]) == (False, "invalid") and "'timeout'" in reply["message"]
        _raw_request(sock, b'{"op": "queue", ' + ident + b', "shard": 0}')
        assert _reply(sock)["queue"] == []
