"""The channel rules both brokers apply -- the embedded one (state.py, accounts.py,
operations.py) and the Ray actor (backends/ray_actor.py) -- and the errors they answer
with, written once so the two backends refuse the same things with the same words.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import ChannelClosed, ChannelNotFound, ChannelTimeout, InvalidArgument, NameInUse, ObjectNotFound

#: Most shards a channel may have: a queue and a signal each, and a receiver process each
#: in practice; a bound so that one request cannot make a broker allocate without limit.
MAX_SHARDS = 4096

#: Most objects a channel may queue, ``num_shards * max_queue_size``: a queue listing
#: (``get_queue``, a journal snapshot) names each, and must fit one frame
#: (``protocol.MAX_REPLY_JSON``: 2^20 keys take about 26 MiB of JSON).
MAX_QUEUED = 1 << 20

#: Most shards of all a broker's channels together (so also most channels): each costs the
#: broker about 1 KiB (a queue, a signal, counters), and a status reply lists each one's
#: figures. A bound, so that creating channels cannot make a broker allocate without limit
#: (issue 13). The Ray backend has an actor per channel: its bound is the cluster's.
MAX_SHARDS_IN_ALL = 1 << 16


def check_shards_in_all(in_use: int, num_shards: int) -> None:
    """Raise InvalidArgument if a channel of ``num_shards`` shards, besides the ``in_use``
    shards of the other channels, would take the broker past MAX_SHARDS_IN_ALL."""
    if in_use + num_shards > MAX_SHARDS_IN_ALL:
        raise InvalidArgument(
            f"no room for a channel of num_shards={num_shards}: a broker holds at most {MAX_SHARDS_IN_ALL} "
            f"shards in all its channels (MAX_SHARDS_IN_ALL) and the others have {in_use}; close channels first"
        )


#: Longest namespace, dataset_name or DataSystem key, in characters: checked by the API and
#: by the broker (a raw client's name reaches every status reply, and the journal).
MAX_NAME = 1024


def valid_name(value: object) -> bool:
    """Whether ``value`` is a str of 1 to MAX_NAME characters without NUL."""
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME and "\x00" not in value


def check_name(param: str, value: object) -> str:
    """``value`` if it is a valid name (``valid_name``); else raises InvalidArgument naming
    ``param``."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{param} must be a str, got {value!r:.60} ({type(value).__name__})")
    if not valid_name(value):
        raise InvalidArgument(f"{param} must be 1 to {MAX_NAME} characters without NUL, got {value[:40]!r} (length {len(value)})")
    return value


#: Timeouts past this many seconds (threading.TIMEOUT_MAX, about 292 years) mean no limit, as
#: inf does: a lock cannot wait longer (it raises OverflowError), nor the event loop's timer.
MAX_TIMEOUT = threading.TIMEOUT_MAX


def no_limit(timeout: float) -> bool:
    """Whether a timeout of ``timeout`` seconds (a number >= 0) means waiting without limit."""
    return timeout > MAX_TIMEOUT


#: Largest ``prefetch`` a receiver accepts. Kept as the API's bound, though neither backend
#: fetches ahead now: the embedded receiver claims one object at a time from shared
#: memory, the Ray one asks its channel actor for each.
MAX_PREFETCH = 1024


def receivers_per_shard(shards: Iterable[int], num_shards: int) -> list[int]:
    """How many receivers read each shard, from the shard of each (status); a shard number a
    reshape of the channel left out of range counts nowhere."""
    counts = [0] * num_shards
    for shard in shards:
        if shard < num_shards:
            counts[shard] += 1
    return counts


def check_channel_shape(num_shards: object, max_queue_size: object) -> None:
    """num_shards in 1..MAX_SHARDS, max_queue_size >= 1, both ints, and their product at
    most MAX_QUEUED; raises naming the field."""
    for field, value, top in (("num_shards", num_shards, MAX_SHARDS), ("max_queue_size", max_queue_size, None)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (top is not None and value > top):
            bound = f"an int from 1 to {top}" if top is not None else "an int >= 1"
            raise InvalidArgument(f"{field} must be {bound}, got {value!r}")
    assert isinstance(num_shards, int) and isinstance(max_queue_size, int)
    if num_shards * max_queue_size > MAX_QUEUED:
        raise InvalidArgument(
            f"max_queue_size must be at most {MAX_QUEUED // num_shards} with num_shards={num_shards} "
            f"(a channel queues at most {MAX_QUEUED} objects in all), got {max_queue_size}"
        )


@dataclass(frozen=True)
class Shape:
    """What a channel's sender fixes and its receivers and queues are built on."""

    num_shards: int
    full_batch: bool
    max_queue_size: int

    def __str__(self) -> str:
        return f"num_shards={self.num_shards}, full_batch={self.full_batch}, max_queue_size={self.max_queue_size}"


@dataclass(frozen=True)
class ReceiverUse:
    """An attached receiver of a channel, for the error that names who keeps its shape."""

    shard: int
    holds: int  # objects it received (or prefetched) and has not acknowledged
    who: str = ""  # "pid 4242" where the broker knows it


#: Most receivers a refusal names one by one (a channel may have thousands).
MAX_NAMED = 4


def check_new_sender(
    namespace: str, name: str, *, attached: bool, closed: bool, current: Shape, wanted: Shape,
    queued: int, receivers: Sequence[ReceiverUse],
) -> None:
    """May a new sender take over an existing channel? Raises why not.

    A channel keeps its shape while anything built on it remains: objects queued (split
    for its shards), receivers attached to its shards, objects they hold and will give
    back or acknowledge. A new sender must then use the same shape; a channel with none of
    these is collected, and its name is free for any shape (issue 13).
    """
    if attached:
        raise NameInUse(f"dataset_name {name!r} is already used by a sender in namespace {namespace!r}")
    if closed:
        raise NameInUse(f"dataset_name {name!r} in namespace {namespace!r} was closed and is still being drained")
    if current == wanted or not (queued or receivers):
        return
    uses = [f"{_objects(queued)} queued"] if queued else []
    ordered = sorted(receivers, key=lambda r: (-r.holds, r.shard))  # holders first
    for receiver in ordered[:MAX_NAMED]:
        held = f"{_objects(receiver.holds)} not acknowledged" if receiver.holds else "nothing"
        uses.append(f"receiver {receiver.who + ' ' if receiver.who else ''}of shard {receiver.shard} holds {held}")
    if len(ordered) > MAX_NAMED:
        uses.append(f"{len(ordered) - MAX_NAMED} more receivers")
    raise InvalidArgument(
        f"channel {namespace}/{name} is in use with {current}: {', '.join(uses)}; a new sender must use "
        f"the same until its objects are consumed and its receivers have left, got {wanted}"
    )


def _objects(count: int) -> str:
    return f"{count} object{'s' if count != 1 else ''}"


def check_shard(shard: int, num_shards: int, label: str | None = None) -> None:
    """Raise InvalidArgument unless ``0 <= shard < num_shards`` (``label``: name the channel)."""
    if not 0 <= shard < num_shards:
        where = f" of channel {label}" if label else ""
        raise InvalidArgument(f"shard_id must be less than num_shards ({num_shards}){where}, got {shard}")


def not_found(namespace: str, name: str, waited: object = None) -> ChannelNotFound:
    return ChannelNotFound(
        f"no sender has created dataset_name {name!r} in namespace {namespace!r}"
        + (f" (waited {waited} s)" if waited else "")
    )


def send_timeout(asked: object, label: str, max_queue_size: int) -> ChannelTimeout:
    return ChannelTimeout(
        f"send timed out after {asked} s: a queue of {label} stayed full "
        f"(max_queue_size={max_queue_size}); nothing was enqueued"
    )


def recv_timeout(peek: bool, asked: object, shard: int, label: str) -> ChannelTimeout:
    return ChannelTimeout(
        f"{'peek' if peek else 'recv'} timed out after {asked} s: shard {shard} of {label} stayed empty"
    )


def drained(label: str, shard: int) -> ChannelClosed:
    return ChannelClosed(f"channel {label} was closed by its sender and shard {shard} is drained")


def no_such_key(key: str) -> ObjectNotFound:
    return ObjectNotFound(f"no object with key {key!r} in the data system")
