"""Every bad argument and misuse of DataSender / DataReceiver, and what a failed send leaves behind."""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
import pytest

from shmchannel import (
    ChannelError,
    ChannelNotFound,
    DataReceiver,
    DataSender,
    DataSystem,
    EndpointClosed,
    InvalidArgument,
    NameInUse,
    UnsupportedType,
)

from .conftest import ADDRESS

RAY_HINT = (
    "the embedded backend serves this machine only; remote machines are served by the Ray backend "
    "(a Ray address such as 'ray://head:10001')"
)
SUPPORTED = (
    "numpy.ndarray, list, pandas.DataFrame, pandas.Series, pyarrow.Table, pyarrow.RecordBatch, "
    "polars.DataFrame, torch.Tensor or dict of equal-length columns"
)
OTHERS = "other objects need num_shards=1 or full_batch=True"


def exact(message: str) -> str:
    """A ``match`` pattern for exactly ``message``."""
    return f"^{re.escape(message)}$"


def _recv_all(receiver: DataReceiver, count: int) -> list[Any]:
    return [receiver.recv(timeout=10) for _ in range(count)]


# -- DataSender constructor --------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_shards", "shown"),
    [(0, "0 (int)"), (-1, "-1 (int)"), (1.5, "1.5 (float)"), ("2", "'2' (str)"), (True, "True (bool)")],
)
def test_sender_rejects_bad_num_shards(num_shards: Any, shown: str) -> None:
    """num_shards that is not a positive int (bool included) raises InvalidArgument naming it."""
    with pytest.raises(InvalidArgument, match=exact(f"num_shards must be a positive int, got {shown}")) as info:
        DataSender(ADDRESS, num_shards=num_shards, dataset_name="bad")
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


@pytest.mark.parametrize(("size", "shown"), [(0, "0 (int)"), (-3, "-3 (int)"), (2.0, "2.0 (float)"), (False, "False (bool)")])
def test_sender_rejects_bad_max_queue_size(size: Any, shown: str) -> None:
    """max_queue_size that is not a positive int raises a ValueError naming it."""
    with pytest.raises(ValueError, match=exact(f"max_queue_size must be a positive int, got {shown}")):
        DataSender(ADDRESS, max_queue_size=size, dataset_name="bad")


@pytest.mark.parametrize(("full_batch", "shown"), [(1, "1 (int)"), ("yes", "'yes' (str)"), (None, "None (NoneType)")])
def test_sender_rejects_non_bool_full_batch(full_batch: Any, shown: str) -> None:
    """full_batch that is not a bool raises a ValueError naming it."""
    with pytest.raises(ValueError, match=exact(f"full_batch must be a bool, got {shown}")):
        DataSender(ADDRESS, full_batch=full_batch, dataset_name="bad")


# -- names (both constructors) -----------------------------------------------------------

BAD_NAMES = [
    (None, "must be a str, got None (NoneType)"),
    (7, "must be a str, got 7 (int)"),
    (b"ds", "must be a str, got b'ds' (bytes)"),
    ("", "must be 1 to 1024 characters without NUL, got '' (length 0)"),
    ("a\x00b", "must be 1 to 1024 characters without NUL, got 'a\\x00b' (length 3)"),
    ("x" * 1025, f"must be 1 to 1024 characters without NUL, got {'x' * 40!r} (length 1025)"),
]


@pytest.mark.parametrize("endpoint", [DataSender, DataReceiver])
@pytest.mark.parametrize("param", ["namespace", "dataset_name"])
@pytest.mark.parametrize(("value", "tail"), BAD_NAMES, ids=["None", "int", "bytes", "empty", "nul", "too-long"])
def test_endpoint_rejects_bad_name(endpoint: Any, param: str, value: Any, tail: str) -> None:
    """A namespace/dataset_name that is not a non-empty str without NUL is refused by sender and receiver."""
    kwargs = {"namespace": "ns", "dataset_name": "ds", param: value}
    with pytest.raises(ValueError, match=exact(f"{param} {tail}")):
        endpoint(ADDRESS, **kwargs)


# -- DataReceiver constructor ------------------------------------------------------------


@pytest.mark.parametrize(
    ("shard_id", "shown"), [(-1, "-1 (int)"), (0.0, "0.0 (float)"), ("0", "'0' (str)"), (True, "True (bool)"), (None, "None (NoneType)")]
)
def test_receiver_rejects_bad_shard_id(shard_id: Any, shown: str) -> None:
    """shard_id that is not an int >= 0 raises a ValueError naming it."""
    with pytest.raises(ValueError, match=exact(f"shard_id must be an int >= 0, got {shown}")):
        DataReceiver(ADDRESS, shard_id=shard_id, dataset_name="bad")


def test_receiver_rejects_shard_id_beyond_num_shards(address: str) -> None:
    """shard_id >= the channel's num_shards raises a ValueError when the receiver is created."""
    with DataSender(address, dataset_name="two", num_shards=2):
        with pytest.raises(
            InvalidArgument,
            match=exact("shard_id must be less than num_shards (2) of channel default/two, got 2"),
        ):
            DataReceiver(address, dataset_name="two", shard_id=2)


@pytest.mark.parametrize(("wait", "shown"), [(-1, "-1 (int)"), (math.nan, "nan (float)"), ("1", "'1' (str)")])
def test_receiver_rejects_bad_wait(wait: Any, shown: str) -> None:
    """wait that is not None or seconds >= 0 raises a ValueError naming it."""
    with pytest.raises(ValueError, match=exact(f"wait must be None or a number of seconds >= 0, got {shown}")):
        DataReceiver(ADDRESS, dataset_name="bad", wait=wait)


def test_receiver_for_missing_channel_raises_channel_not_found(address: str) -> None:
    """A receiver of a channel no sender created raises ChannelNotFound, a ValueError."""
    with pytest.raises(
        ChannelNotFound, match=exact("no sender has created dataset_name 'nope' in namespace 'default'")
    ) as info:
        DataReceiver(address, dataset_name="nope")
    assert isinstance(info.value, ValueError)


def test_receiver_wait_for_missing_channel_runs_out(address: str) -> None:
    """A receiver that waits for a channel that never appears raises ChannelNotFound naming the wait."""
    with pytest.raises(
        ChannelNotFound, match=exact("no sender has created dataset_name 'nope' in namespace 'ns' (waited 0.05 s)")
    ):
        DataReceiver(address, namespace="ns", dataset_name="nope", wait=0.05)


def test_second_sender_with_same_name_raises_name_in_use(address: str) -> None:
    """A second live sender of the same (namespace, dataset_name) raises NameInUse, a ValueError."""
    with DataSender(address, dataset_name="taken"):
        with pytest.raises(
            NameInUse, match=exact("dataset_name 'taken' is already used by a sender in namespace 'default'")
        ) as info:
            DataSender(address, dataset_name="taken")
        assert isinstance(info.value, ValueError)


# -- address (both constructors) ---------------------------------------------------------

ENDPOINTS = {
    "sender": lambda address: DataSender(address, dataset_name="addr"),
    "receiver": lambda address: DataReceiver(address, dataset_name="addr"),
}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize(("address", "shown"), [(2130706433, "2130706433 (int)"), (b"127.0.0.1", "b'127.0.0.1' (bytes)")])
def test_address_must_be_a_str(endpoint: str, address: Any, shown: str) -> None:
    """An address that is not a str raises InvalidArgument (ValueError and TypeError)."""
    with pytest.raises(
        InvalidArgument, match=exact(f"address must be a str (an IPv4 address of this machine), got {shown}")
    ):
        ENDPOINTS[endpoint](address)


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("address", ["localhost", "::1", "300.1.1.1", ""])
def test_address_must_be_ipv4(endpoint: str, address: str) -> None:
    """An address that is not an IPv4 address raises a ValueError that points to the Ray backend."""
    with pytest.raises(
        ValueError,
        match=exact(f"address must be an IPv4 address of this machine such as '127.0.0.1', got {address!r}; {RAY_HINT}"),
    ):
        ENDPOINTS[endpoint](address)


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_non_local_ipv4_address_points_to_ray_backend(endpoint: str) -> None:
    """An IPv4 address of another machine raises a ValueError that names the Ray backend."""
    with pytest.raises(
        ValueError, match=exact(f"address '203.0.113.7' is not an IPv4 address of this machine; {RAY_HINT}")
    ) as info:
        ENDPOINTS[endpoint]("203.0.113.7")
    assert "Ray backend" in str(info.value)


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("address", ["ray:", "ray:nowhere", "ray:/head:10001"])
def test_malformed_ray_address_raises_invalid_argument(endpoint: str, address: str) -> None:
    """A "ray:" address of no known form raises InvalidArgument naming the forms (before any Ray contact)."""
    with pytest.raises(
        InvalidArgument,
        match=exact(f"a Ray address must be 'ray://host:port', 'ray:auto' or 'ray:local', got {address!r}"),
    ):
        ENDPOINTS[endpoint](address)


# -- send --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "qualname"),
    [({1, 2}, "builtins.set"), ("abc", "builtins.str"), (3, "builtins.int"), ((1, 2), "builtins.tuple"), (None, "builtins.NoneType")],
    ids=["set", "str", "int", "tuple", "None"],
)
def test_send_unsplittable_type_to_shards_raises_type_error(broker: int, obj: Any, qualname: str) -> None:
    """send of an object of no splittable type to 2 shards raises UnsupportedType (TypeError) naming the
    splittable types and the way to send other objects."""
    with DataSender(ADDRESS, dataset_name="types", num_shards=2) as sender:
        with pytest.raises(
            UnsupportedType, match=exact(f"obj must be a {SUPPORTED} to be split into shards, got {qualname}; {OTHERS}")
        ) as info:
            sender.send(obj)
        assert isinstance(info.value, TypeError) and not isinstance(info.value, ValueError)


def test_send_zero_dim_array_to_shards_raises_type_error(broker: int) -> None:
    """send of a 0-d ndarray to 2 shards raises UnsupportedType (TypeError): it has no rows."""
    with DataSender(ADDRESS, dataset_name="types", num_shards=2) as sender:
        with pytest.raises(
            TypeError,
            match=exact(f"obj must have at least one dimension to be split into shards, got a 0-d numpy.ndarray; {OTHERS}"),
        ):
            sender.send(np.array(5.0))


def test_send_unpicklable_list_raises_unsupported_type(address: str) -> None:
    """send of a list holding an object pickle cannot carry (a lambda) raises UnsupportedType (TypeError)."""
    with DataSender(address, dataset_name="types") as sender:
        with pytest.raises(UnsupportedType, match=r"^obj cannot be serialized: .*<lambda>.*$") as info:
            sender.send([lambda x: x, 1])
        assert isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    "obj", [[], np.empty((0, 3)), np.array([], dtype=np.int64)], ids=["list", "2d-array", "1d-array"]
)
def test_send_empty_object_raises_value_error(broker: int, obj: Any) -> None:
    """send of an object with 0 rows raises a ValueError."""
    with DataSender(ADDRESS, dataset_name="empty") as sender:
        with pytest.raises(ValueError, match=exact("len(obj) must be positive, got 0")):
            sender.send(obj)


def test_send_empty_object_to_shards_raises_value_error(broker: int) -> None:
    """send of an object with 0 rows to a sharded channel raises a ValueError naming num_shards."""
    with DataSender(ADDRESS, dataset_name="empty", num_shards=2) as sender:
        with pytest.raises(ValueError, match=exact("len(obj) must be a positive multiple of num_shards (2), got 0")):
            sender.send([])


@pytest.mark.parametrize("rows", [1, 5, 7])
def test_send_length_not_divisible_by_num_shards_raises_value_error(broker: int, rows: int) -> None:
    """send of an object whose length is not a multiple of num_shards raises a ValueError."""
    with DataSender(ADDRESS, dataset_name="odd", num_shards=3) as sender:
        with pytest.raises(
            ValueError, match=exact(f"len(obj) must be a positive multiple of num_shards (3), got {rows}")
        ):
            sender.send(np.arange(rows))


@pytest.mark.parametrize(("timeout", "shown"), [(-1, "-1 (int)"), (-0.5, "-0.5 (float)"), (math.nan, "nan (float)"), ("1", "'1' (str)"), (True, "True (bool)")])
def test_send_bad_timeout_raises_value_error(broker: int, timeout: Any, shown: str) -> None:
    """send with a negative (or non-number) timeout raises a ValueError naming it."""
    with DataSender(ADDRESS, dataset_name="timeouts") as sender:
        with pytest.raises(ValueError, match=exact(f"timeout must be None or a number of seconds >= 0, got {shown}")):
            sender.send([1], timeout=timeout)
        assert sender.get_queue(0) == []


@pytest.mark.parametrize("method", ["recv", "peek"])
@pytest.mark.parametrize(("timeout", "shown"), [(-1, "-1 (int)"), (-0.001, "-0.001 (float)"), (math.nan, "nan (float)")])
def test_recv_bad_timeout_raises_value_error(broker: int, method: str, timeout: Any, shown: str) -> None:
    """recv/peek with a negative timeout raises a ValueError and consumes nothing."""
    with DataSender(ADDRESS, dataset_name="timeouts") as sender, DataReceiver(ADDRESS, dataset_name="timeouts") as receiver:
        sender.send([1])
        with pytest.raises(ValueError, match=exact(f"timeout must be None or a number of seconds >= 0, got {shown}")):
            getattr(receiver, method)(timeout=timeout)
        assert len(sender.get_queue(0)) == 1


# -- get_queue ---------------------------------------------------------------------------


@pytest.mark.parametrize(("shard_id", "message"), [(-1, "shard_id must be an int >= 0, got -1 (int)"), ("0", "shard_id must be an int >= 0, got '0' (str)"), (2, "shard_id must be less than num_shards (2), got 2")])
def test_sender_get_queue_rejects_bad_shard_id(broker: int, shard_id: Any, message: str) -> None:
    """DataSender.get_queue with a shard_id outside [0, num_shards) raises a ValueError."""
    with DataSender(ADDRESS, dataset_name="queues", num_shards=2) as sender:
        with pytest.raises(ValueError, match=exact(message)):
            sender.get_queue(shard_id)


@pytest.mark.parametrize(("shard_id", "message"), [(-1, "shard_id must be an int >= 0, got -1 (int)"), (2, "shard_id must be less than num_shards (2), got 2")])
def test_receiver_get_queue_rejects_bad_shard_id(address: str, shard_id: Any, message: str) -> None:
    """DataReceiver.get_queue with a shard_id outside [0, num_shards) raises a ValueError."""
    with DataSender(address, dataset_name="queues", num_shards=2), DataReceiver(address, dataset_name="queues") as receiver:
        with pytest.raises(ValueError, match=exact(message)):
            receiver.get_queue(shard_id)


# -- use after close ---------------------------------------------------------------------

SENDER_CALLS = {
    "send": lambda s: s.send([1]),
    "get_queue": lambda s: s.get_queue(),
    "get_queue-shard": lambda s: s.get_queue(0),
}
RECEIVER_CALLS = {
    "recv": lambda r: r.recv(timeout=0),
    "peek": lambda r: r.peek(timeout=0),
    "get_queue": lambda r: r.get_queue(),
    "iter": lambda r: next(iter(r)),
}


@pytest.mark.parametrize("call", sorted(SENDER_CALLS))
def test_sender_use_after_close_raises_endpoint_closed(address: str, call: str) -> None:
    """Any call on a closed sender raises EndpointClosed (a ValueError) naming the sender."""
    sender = DataSender(address, dataset_name="closed")
    sender.close()
    with pytest.raises(EndpointClosed, match=exact("<DataSender default/closed 1 shards closed> is closed")) as info:
        SENDER_CALLS[call](sender)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("call", sorted(RECEIVER_CALLS))
def test_receiver_use_after_close_raises_endpoint_closed(address: str, call: str) -> None:
    """Any call on a closed receiver raises EndpointClosed (a ValueError) naming the receiver."""
    with DataSender(address, dataset_name="closed", num_shards=2) as sender:
        sender.send([1, 2])
        receiver = DataReceiver(address, dataset_name="closed", shard_id=1)
        receiver.close()
        with pytest.raises(EndpointClosed, match=exact("<DataReceiver default/closed shard 1/2 closed> is closed")):
            RECEIVER_CALLS[call](receiver)
        assert len(sender.get_queue(1)) == 1


def test_close_is_idempotent(address: str) -> None:
    """Calling close() twice on a sender or receiver is not an error."""
    sender = DataSender(address, dataset_name="twice")
    receiver = DataReceiver(address, dataset_name="twice")
    receiver.close()
    receiver.close()
    sender.close()
    sender.close()
    assert sender.closed and receiver.closed


# -- a failed send loses nothing ---------------------------------------------------------

FAILING_SENDS: dict[str, tuple[Any, type[BaseException]]] = {
    "unequal-dict": ({"a": np.arange(2), "b": np.arange(3)}, InvalidArgument),
    "scalar-dict": ({"a": np.arange(2), "b": 1}, UnsupportedType),
    "zero-dim": (np.array(1), UnsupportedType),
    "empty": (np.empty((0, 2)), InvalidArgument),
    "wrong-length": (np.arange(3), InvalidArgument),
    "lambda-small": ([lambda x: x, 1], UnsupportedType),
    "lambda-after-big-part": ([np.zeros(1_000_000), lambda x: x], UnsupportedType),
}


@pytest.mark.parametrize("case", sorted(FAILING_SENDS))
def test_failed_send_loses_nothing_already_sent(address: str, case: str) -> None:
    """A send that fails leaves what was queued before intact and in order, and later sends follow it."""
    bad, error = FAILING_SENDS[case]
    with DataSender(address, dataset_name="keep", num_shards=2) as sender, DataReceiver(
        address, dataset_name="keep", shard_id=0
    ) as rx0, DataReceiver(address, dataset_name="keep", shard_id=1) as rx1:
        sender.send([0, 1])
        sender.send(np.arange(2, 4))
        with pytest.raises(error):
            sender.send(bad)
        assert {k: len(v) for k, v in sender.get_queue().items()} == {0: 2, 1: 2}
        sender.send(np.arange(200_000).reshape(2, 100_000))  # a large one through the arena
        got0, got1 = _recv_all(rx0, 3), _recv_all(rx1, 3)
        assert got0[0] == [0] and got1[0] == [1]
        np.testing.assert_array_equal(got0[1], [2])
        np.testing.assert_array_equal(got1[1], [3])
        np.testing.assert_array_equal(got0[2], np.arange(100_000).reshape(1, 100_000))
        np.testing.assert_array_equal(got1[2], np.arange(100_000, 200_000).reshape(1, 100_000))
        assert sender.get_queue() == {0: [], 1: []}


@pytest.mark.parametrize("case", sorted(FAILING_SENDS))
def test_failed_send_leaves_no_memory_behind(broker: int, case: str) -> None:
    """A send that fails stores no object and keeps no arena memory allocated."""
    bad, error = FAILING_SENDS[case]
    with DataSystem(ADDRESS) as ds, DataSender(ADDRESS, dataset_name="leak", num_shards=2) as sender:
        sender.send(np.zeros((2, 100_000)))
        before = ds.stats()
        with pytest.raises(error):
            sender.send(bad)
        after = ds.stats()
        assert (after.used, after.objects, after.inline_bytes) == (before.used, before.objects, before.inline_bytes)


def test_channel_errors_share_one_root() -> None:
    """Every error raised on purpose is a ChannelError (so one except clause catches them all)."""
    for cls in (InvalidArgument, ChannelNotFound, NameInUse, UnsupportedType, EndpointClosed):
        assert issubclass(cls, ChannelError)


@pytest.mark.parametrize("value", ["abc", "-1", "10001", "nan"])
def test_a_bad_spin_setting_is_refused_at_import_naming_it(value: str) -> None:
    """``SHMCHANNEL_SPIN_US`` out of range or not a number: importing shmchannel fails with
    an error naming the variable, the range and the value (not a raw ValueError)."""
    import subprocess
    import sys

    env = {**os.environ, "SHMCHANNEL_SPIN_US": value}
    done = subprocess.run([sys.executable, "-c", "import shmchannel"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert f"InvalidArgument: SHMCHANNEL_SPIN_US must be microseconds from 0 to 10000, got {value!r}" in done.stderr


@pytest.mark.parametrize("value", ["0", "", "150.5"])
def test_a_good_spin_setting_is_taken(value: str) -> None:
    """0 turns polling off, empty means the default, fractions are fine."""
    import subprocess
    import sys

    env = {**os.environ, "SHMCHANNEL_SPIN_US": value}
    code = "from shmchannel.queue import events; print(events.SPIN)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == (float(value) if value else 20.0) / 1e6
