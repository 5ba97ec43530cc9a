"""The Ray backend: the same channel across the machines of a Ray cluster.

Addresses: ``"ray://host:port"`` (Ray client), ``"ray:auto"`` (the cluster this process runs
in, or ``ray.init(address="auto")``), ``"ray:local"`` (join a local cluster, or start one
in this process). The broker of a channel is a named, detached async actor
(``ray_actor.ChannelActor``) in the Ray namespace ``namespace``, named after
``dataset_name``; data lives in Ray's object store. We use Ray as it is and write no
transport of our own.

Ray carries each part in our layout, not as Ray pickles the object: our pickle stream and
the object's buffers under 2048 bytes in one blob (the layout of ``store/blob.py``, every
buffer at a 64-byte offset), and each larger buffer as a uint8 array of its own. Letting Ray
pickle the objects misaligned what the user got (issue 11): Ray's pickle-5 writer places a
buffer under 2048 bytes on an 8-byte boundary only (a small DataFrame, dict or list had
blocks at 8, 16, 32... mod 64), and arrays numpy pickles in-band (datetime64 blocks) came
back as copies where malloc put them (16 mod 64). Ray puts the first out-of-band buffer of
an object (our blob) and every one of 2048 bytes or more on a 64-byte boundary, in the
object store and in the in-process store alike (measured with Ray 2.60, 1 byte to 3 MiB),
so nothing is copied to be aligned; an array Ray put off the boundary all the same (it does
not promise it) is copied to one, read-only like the rest. Large buffers are not copied
into the blob: Ray copies them straight from the object, once, as it did before; receiving
stays zero-copy. (Rejected: the whole part as one blob -- an extra copy of all the data on
the sender: 147 ms for 64 MiB into fresh pages, measured here.)

Differences from the embedded backend, all Ray's: received arrays are read-only views of
Ray's memory (zero-copy on the receiving node); ``DataSystem.stats`` reports capacity
and object count only (Ray does not tell a client how much of its store is used).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import time
import uuid
from typing import Any

import numpy as np

from ..errors import BrokerUnavailable, ChannelError, ChannelNotFound, InvalidArgument, UnsupportedType, from_wire
from ..serialization import deserialize, serialize
from ..serialization.arrays import ALIGNMENT, Source, aligned_copy
from ..store.blob import plan_blob, read_blob, write_blob
from ..store.table import StoreStats

ADDRESS_FORMS = "'ray://host:port', 'ray:auto' or 'ray:local'"

#: Parts of at most this many bytes (``wire_size``) stay values in the channel actor and come
#: back inline with the reply to recv (one actor call); larger ones go to the object store.
INLINE_THRESHOLD = 64 * 1024
DATASYSTEM_NAMESPACE = "shmchannel"

#: Ray's pickle-5 writer puts an out-of-band buffer of at least this many bytes on a 64-byte
#: boundary, a shorter one on an 8-byte boundary (``kMajorBufferSize``, ``kMinorBufferAlign``).
RAY_ALIGNED = 2048

#: What travels for one part: which of the object's buffers travel apart; a blob (the layout
#: of ``store/blob.py``) of the pickle stream and the other buffers; the buffers apart.
Wire = tuple[tuple[bool, ...], np.ndarray, list[np.ndarray]]


def _bytes_of(source: Source) -> np.ndarray:
    """The bytes of a codec buffer as a uint8 array: a view of a contiguous one, else a copy."""
    if isinstance(source, memoryview):
        return np.frombuffer(source, np.uint8)
    if isinstance(source, np.ndarray):
        if not (source.flags.c_contiguous or source.flags.f_contiguous):
            source = np.ascontiguousarray(source)  # C order, as the codec rebuilds a non-contiguous one
        return source.ravel(order="K").view(np.uint8)  # memory order: what the codec rebuilds
    out = np.empty(source.nbytes, np.uint8)
    source.write_into(memoryview(out))  # type: ignore[arg-type]  # numpy exports a buffer
    return out


def encode(obj: Any) -> Wire:
    """``obj`` in the form Ray carries for us (see the module docstring).

    Raises:
        UnsupportedType (a TypeError): ``obj`` cannot be serialized (the embedded backend
            refuses the same objects; Ray's cloudpickle would have taken lambdas).
    """
    serialized = serialize(obj)
    apart = tuple(int(b.nbytes) >= RAY_ALIGNED for b in serialized.buffers)
    small = [b for b, away in zip(serialized.buffers, apart) if not away]
    plan = plan_blob(len(serialized.header), [int(b.nbytes) for b in small])
    blob = np.empty(plan.size, np.uint8)
    write_blob(memoryview(blob), plan, serialized.header, small)  # type: ignore[arg-type]  # numpy exports a buffer
    return apart, blob, [_bytes_of(b) for b, away in zip(serialized.buffers, apart) if away]


def wire_size(wire: Wire) -> int:
    """Bytes of data one part carries (for the inline threshold and status)."""
    return int(wire[1].nbytes) + sum(int(b.nbytes) for b in wire[2])


def _view(data: np.ndarray) -> memoryview:
    """A read-only view of ``data`` that starts on a 64-byte boundary: ``data`` itself if
    Ray put it on one, else a copy (read-only as Ray's memory: the same arrays either way)."""
    view = memoryview(data)  # type: ignore[arg-type]  # numpy exports a buffer
    return view if data.ctypes.data % ALIGNMENT == 0 else aligned_copy(view).toreadonly()


def decode(wire: Wire) -> Any:
    """The object of a part Ray handed us; its arrays are read-only views of Ray's memory."""
    apart, blob, buffers = wire
    header, small = read_blob(_view(blob))
    small_ones, apart_ones = iter(small), iter(buffers)
    views = [_view(next(apart_ones)) if away else next(small_ones) for away in apart]
    return deserialize(header, views)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InvalidArgument("the ray backend needs Ray: pip install 'shmchannel[ray]'") from None
    return ray


def connect(address: str) -> Any:
    """Initialize Ray for ``address`` in this process (once) and return the ``ray`` module.

    Raises:
        InvalidArgument: not a Ray address we know, or Ray is not installed.
        BrokerUnavailable: no Ray cluster answers there.
    """
    if not (address.startswith("ray://") or address in ("ray:auto", "ray:local")):
        raise InvalidArgument(f"a Ray address must be {ADDRESS_FORMS}, got {address!r}")
    ray = import_ray()
    if ray.is_initialized():
        return ray
    options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False}
    try:
        if address == "ray:local":
            try:
                ray.init(address="auto", **options)
            except ConnectionError:
                from .. import config

                ray.init(include_dashboard=False, object_store_memory=config.default_memory(), **options)
        else:
            ray.init(address="auto" if address == "ray:auto" else address, **options)
    except (ConnectionError, RuntimeError) as exc:
        raise BrokerUnavailable(f"cannot reach a Ray cluster at {address!r}: {exc}") from exc
    logging.getLogger("shmchannel").info("connected to the Ray cluster at %s", address)
    return ray


def _reply(value: Any) -> Any:
    """Unwrap an actor's ("ok", ...) reply or raise its ("error", code, message)."""
    if isinstance(value, tuple) and value and value[0] == "error":
        raise from_wire(value[1], value[2])
    return value


class _Calls:
    """Actor calls with Ray's failures translated once, here."""

    def __init__(self, ray: Any, actor: Any, label: str) -> None:
        self.ray = ray
        self.actor = actor
        self.label = label

    def call(self, method: str, *args: Any, on_interrupt: Any = None) -> Any:
        try:
            ref = getattr(self.actor, method).remote(*args)
        except TypeError as exc:  # Ray could not serialize an argument
            raise UnsupportedType(f"obj cannot be serialized: {exc}") from exc
        try:
            return _reply(self.ray.get(ref))
        except ChannelError:
            raise
        except self.ray.exceptions.RayActorError as exc:
            raise BrokerUnavailable(f"the actor of channel {self.label} is gone: {exc}") from exc
        except self.ray.exceptions.RayError as exc:
            raise BrokerUnavailable(f"{method} on channel {self.label} failed in Ray: {exc}") from exc
        except BaseException:
            if on_interrupt is not None:
                self._cancel(ref, on_interrupt)
            raise

    def _cancel(self, ref: Any, on_interrupt: Any) -> None:
        """After an interrupted wait: cancel the call; undo it if it completed anyway."""
        try:
            self.ray.cancel(ref)
            value = self.ray.get(ref, timeout=5)
        except Exception:
            return
        if isinstance(value, tuple) and value and value[0] == "ok":
            on_interrupt(value)

    def dispose(self, method: str, *args: Any) -> None:
        """Leave the channel; kill the actor if nothing is left for anyone."""
        try:
            if self.call(method, *args):
                self.ray.kill(self.actor)
        except ChannelError:
            pass


class RaySender:
    def __init__(self, ray: Any, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int) -> None:
        from .ray_actor import ChannelActor, actor_name

        self._token = uuid.uuid4().hex
        self._ray = ray
        self._data_system: RayDataSystem | None = None
        actor = ChannelActor.options(  # type: ignore[attr-defined]
            name=actor_name(dataset_name), namespace=namespace, lifetime="detached", get_if_exists=True
        ).remote(namespace, dataset_name)
        self._calls = _Calls(ray, actor, f"{namespace}/{dataset_name}")
        self._calls.call("attach_sender", self._token, num_shards, full_batch, max_queue_size)
        self._shared = full_batch and num_shards > 1
        self._pid = os.getpid()
        # A process that exits without close() leaves the channel (the stream goes on, the
        # name is free again). Registered after ray.init, so it runs before Ray's shutdown.
        self._at_exit = functools.partial(self._calls.dispose, "close", self._token, False)
        atexit.register(self._at_exit)

    def send(self, parts: list[Any], timeout: float | None) -> None:
        # Small parts the actor keeps and returns by value. Parts that several shards share
        # stay in the object store, where arrays are read-only.
        wires = [encode(part) for part in parts]  # the codec carries a block's own rows only
        sizes = [wire_size(wire) for wire in wires]
        inline = [n <= INLINE_THRESHOLD and not self._shared for n in sizes]
        self._calls.call("put", self._token, wires, inline, timeout, timeout, sizes)

    def empty(self, shape: tuple[int, ...], dtype: Any, order: str, timeout: float | None) -> Any:
        """An ordinary array: Ray's object store takes a send's bytes by ``ray.put``, a
        copy, whatever memory they come from (no loan to fill in place)."""
        return np.empty(shape, dtype, order="F" if order == "F" else "C")

    def borrow(self, key: str) -> tuple[Any, Any]:
        """The object under ``key`` from the Ray data system; a send of it copies it."""
        if self._data_system is None:
            self._data_system = RayDataSystem(self._ray)
        return self._data_system.get(key), lambda: None

    def queue(self, shard_id: int | None) -> Any:
        return self._calls.call("queue", shard_id)[1]

    def withdraw(self, thread: int | None) -> None:
        """Nothing: the actor's put cannot be withdrawn; it ends within its timeout (or at
        close), and is queued whole or not at all."""

    def close(self, end_of_stream: bool) -> None:
        if os.getpid() == self._pid:
            atexit.unregister(self._at_exit)
            self._calls.dispose("close", self._token, end_of_stream)


class RayReceiver:
    def __init__(self, ray: Any, namespace: str, dataset_name: str, shard_id: int, wait: float | None) -> None:
        from .ray_actor import ChannelActor, Lease, actor_name

        self._ray = ray
        self._token = uuid.uuid4().hex
        self._shard = shard_id
        self._lease = Lease.remote()  # type: ignore[attr-defined]  # owned here: dies with this process
        self._pid = os.getpid()
        self._last: str | None = None  # key of the object handed out last
        label = f"{namespace}/{dataset_name}"
        if wait == 0:
            try:
                actor = ray.get_actor(actor_name(dataset_name), namespace=namespace)
            except ValueError:
                raise ChannelNotFound(
                    f"no sender has created dataset_name {dataset_name!r} in namespace {namespace!r}"
                ) from None
        else:  # create it if need be: the sender's attach then wakes us, no polling
            actor = ChannelActor.options(  # type: ignore[attr-defined]
                name=actor_name(dataset_name), namespace=namespace, lifetime="detached", get_if_exists=True
            ).remote(namespace, dataset_name)
        self._calls = _Calls(ray, actor, label)
        try:
            info = self._calls.call("attach_receiver", self._token, shard_id, wait, self._lease)[1]
        except ChannelError:
            self._calls.dispose("detach", self._token)
            raise
        self.num_shards = int(info["num_shards"])

    def recv(self, timeout: float | None, peek: bool) -> Any:
        reply = self._calls.call(
            "get", self._token, self._shard, peek, timeout, timeout, on_interrupt=None if peek else self._put_back
        )
        _, key, small, payload = reply
        if not peek:
            self._last = key
        return decode(payload if small else self._ray.get(payload[0]))

    def buffered(self) -> bool:
        return False  # no prefetch on Ray: every recv is a call to the actor

    def withdraw(self, thread: int | None) -> None:
        """Nothing: an actor call cannot be withdrawn; ``close`` ends it."""

    def hand_out(self, note: bool = False) -> tuple[Any, Any]:
        raise AssertionError("a Ray receiver never has objects fetched ahead (buffered() is False)")

    def _put_back(self, reply: Any) -> None:
        self._calls.actor.requeue.remote(self._token, self._shard, reply[1])

    def queue(self, shard_id: int | None) -> Any:
        return self._calls.call("queue", shard_id)[1]

    def ack(self) -> None:
        self._calls.call("ack", self._token)

    def close(self, give_back_last: bool = False) -> None:
        if os.getpid() == self._pid:
            if give_back_last and self._last is not None:
                self._calls.actor.requeue.remote(self._token, self._shard, self._last)
            self._calls.dispose("detach", self._token)
            try:
                self._ray.kill(self._lease)
            except Exception:  # noqa: BLE001 -- Ray already gone: so is the lease
                pass


class RayDataSystem:
    def __init__(self, ray: Any) -> None:
        from .ray_actor import DATASYSTEM, DataSystemActor

        self._ray = ray
        actor = DataSystemActor.options(  # type: ignore[attr-defined]
            name=DATASYSTEM, namespace=DATASYSTEM_NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote()
        self._calls = _Calls(ray, actor, "data system")

    def put(self, obj: Any, timeout: float | None) -> str:
        return str(self._calls.call("put", encode(obj)))

    def get(self, key: str) -> Any:
        (ref,) = self._calls.call("get", key)[1]
        return decode(self._ray.get(ref))

    def delete(self, key: str) -> None:
        self._calls.call("delete", key)

    def contains(self, key: str) -> bool:
        return bool(self._calls.call("contains", key))

    def stats(self) -> StoreStats:
        capacity = int(self._ray.cluster_resources().get("object_store_memory", 0))
        return StoreStats(capacity, -1, -1, -1, int(self._calls.call("count")), 0)

    def close(self) -> None:
        pass


class RayBackend:
    """Channels on a Ray cluster; ``address`` is one of ``ADDRESS_FORMS``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._ray = connect(address)

    def create_sender(
        self, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int,
        made: list[Any],
    ) -> RaySender:
        made.append(RaySender(self._ray, namespace, dataset_name, num_shards, full_batch, max_queue_size))
        return made[-1]

    def open_receiver(
        self, namespace: str, dataset_name: str, shard_id: int, wait: float | None, prefetch: int, made: list[Any],
    ) -> RayReceiver:
        made.append(RayReceiver(self._ray, namespace, dataset_name, shard_id, wait))
        return made[-1]

    def data_system(self, made: list[Any]) -> RayDataSystem:
        made.append(RayDataSystem(self._ray))
        return made[-1]


def list_channels(address: str) -> list[dict[str, Any]]:
    """Status of every shmchannel channel actor on the cluster at ``address`` (the keys of
    ``shmchannel.status``'s channels); a channel that cannot answer has an ``error`` instead.

    Raises:
        BrokerUnavailable: the cluster cannot be reached (or stopped answering).
    """
    from .ray_actor import DATASYSTEM, PREFIX

    ray = connect(address)
    try:
        actors = ray.util.list_named_actors(all_namespaces=True)
    except (ray.exceptions.RayError, ConnectionError, RuntimeError) as exc:
        raise BrokerUnavailable(f"cannot list the actors of the Ray cluster at {address!r}: {exc}") from exc
    out = []
    for entry in actors:
        if not entry["name"].startswith(PREFIX) or entry["name"] == DATASYSTEM:
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            out.append(ray.get(actor.status.remote(), timeout=10))
        except Exception as exc:  # an actor dying as we look: report it, do not fail the listing
            out.append({"namespace": entry["namespace"], "dataset_name": entry["name"][len(PREFIX):], "error": repr(exc)})
    return out


def remove_channel(address: str, namespace: str, dataset_name: str) -> bool:
    """Kill the actor of a channel (its queued objects are freed); False if there was none."""
    from .ray_actor import actor_name

    ray = connect(address)
    try:
        actor = ray.get_actor(actor_name(dataset_name), namespace=namespace)
    except ValueError:
        return False
    ray.kill(actor)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the name is released shortly after the kill
        try:
            ray.get_actor(actor_name(dataset_name), namespace=namespace)
        except ValueError:
            break
        time.sleep(0.05)
    return True
