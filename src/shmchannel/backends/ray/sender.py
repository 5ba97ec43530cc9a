"""The Ray backend's sender: large parts into this node's object store, metadata to the channel actor.

A send encodes each part (``wire.encode``). Parts over ``INLINE_THRESHOLD`` bytes, and parts
the shards share (``full_batch``), are put into the object store of this node
(``ray.put``, one copy, owned by this process until the holder of this node adopts them:
``ownership.py``); the put naming their references goes to the channel actor,
with the others inline. The sender makes one call per object, or one per batch of small
ones, and goes on.

Backpressure by credit: the sender knows the room the channel had at its last reply and
how many of its puts are in flight since; while that leaves room, a send does not wait for
the actor at all (its put is *credited*). Otherwise it waits for its put's reply, which
the actor gives once there is room (or the timeout ran out, or the channel closed). The
puts are numbered and the actor queues them in that order.

A credited put that fails (the channel actor is gone) is reported by the sender's next
call -- send or close -- which raises the error naming it. ``close`` waits until every put
is queued, then up to ``SHMCHANNEL_RAY_ADOPT_AFTER`` seconds for receivers to take what
this process still owns, and until the holder adopted the rest.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import uuid
from collections import deque
from typing import Any

import numpy as np

from ... import config
from ...errors import BrokerUnavailable, ChannelError, ObjectLost, StoreFull
from .cluster import Calls
from .wire import encode, wire_size

#: Parts of at most this many bytes (``wire_size``) stay values in the channel actor and come
#: back inline with the reply to recv (one actor call); larger ones are put (``ray.put``).
INLINE_THRESHOLD = 64 * 1024
#: A sender with credit looks at its puts' replies once this many are in flight (a look at
#: them costs about 90 us, measured: not worth it on every send).
LOOK_EVERY = 32
#: At most this many small objects go in one call to the actor.
BATCH = 64


class RaySender:
    def __init__(self, ray: Any, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int) -> None:
        from .actors import channel_actor

        self._token = uuid.uuid4().hex
        self._ray = ray
        self._namespace, self._dataset_name = namespace, dataset_name
        self._data_system: Any = None
        adopt_after, holder_idle = config.ray_adopt_after(), config.ray_holder_idle()  # before the actor is made
        self._calls = Calls(ray, channel_actor(namespace, dataset_name), f"{namespace}/{dataset_name}")
        info = self._calls.call(
            "attach_sender", self._token, num_shards, full_batch, max_queue_size, adopt_after, holder_idle,
        )[1]
        self._room = int(info["room"])  # at the reply of the oldest put not in _flight
        # (first number, objects, reply ref) of calls not looked at
        self._flight: deque[tuple[int, int, Any]] = deque()
        self._in_flight = 0  # objects in _flight
        # Small objects sent while the actor has not answered our last call wait here (with
        # credit) and go in one call once it has: one actor call per object capped a stream
        # at about 2,000 objects/s, the actor's own rate (measured). The flusher thread
        # sends them when the answer comes; a send finding it came sends them itself.
        self._batch: list[tuple[Any, ...]] = []
        self._last_call: Any = None  # reply ref of our last call to the actor
        self._lock = threading.Lock()  # _batch, _flight, _seq, _last_call
        self._more = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None
        self._stopping = False
        self._seq = 0  # the number of the next put
        self._next_look = LOOK_EVERY  # objects in flight at which a send looks at replies again
        self._shared = full_batch and num_shards > 1
        self._sending = 0  # threads inside send: the replies are theirs to look at
        self._node = ray.get_runtime_context().get_node_id()
        self._pid = os.getpid()
        # A process that exits without close() leaves the channel (the stream goes on, the
        # name is free again). Registered after ray.init, so it runs before Ray's shutdown.
        atexit.register(self._leave_at_exit)

    def send(self, parts: list[Any], timeout: float | None) -> None:
        self._sending += 1
        try:
            self._send(parts, timeout)
        finally:
            self._sending -= 1

    def _send(self, parts: list[Any], timeout: float | None) -> None:
        credited = self._credited()
        if not credited or self._in_flight >= self._next_look:
            self._look(block=False)  # an earlier put's failure is this call's, before anything more goes
            credited = self._credited()
            while not credited and self._flight:  # the oldest reply may bring room: a sliding
                self._look(block=True, oldest=True)  # window, not a drain of every call
                credited = self._credited()
        wires = [encode(part) for part in parts]  # the codec carries a block's own rows only
        sizes = [wire_size(wire) for wire in wires]
        inline = [n <= INLINE_THRESHOLD and not self._shared for n in sizes]
        small = [w if small else None for w, small in zip(wires, inline)]
        if all(inline) and credited:
            self._add((small, [], None, timeout, sizes, None, True))
            return
        try:
            refs = [self._ray.put(wire) for wire, small in zip(wires, inline) if not small]
            with self._lock:
                self._flush()  # the small ones before go first
                put = (small, refs, None if credited else timeout, timeout, sizes, self._node, credited)
                self._sent(self._calls.actor.put.remote(self._token, self._seq, [put]), 1)
        except TypeError as exc:  # Ray could not serialize an argument (encode carried it: unexpected)
            raise ChannelError(f"send to {self._calls.label} could not be submitted to Ray: {exc}") from exc
        except self._ray.exceptions.ObjectStoreFullError as exc:
            raise StoreFull(f"send to {self._calls.label}: this node's Ray object store is full: {exc}") from exc
        except self._ray.exceptions.RayError as exc:  # ray.put: the object store refused
            raise BrokerUnavailable(f"send to {self._calls.label} could not put its object into Ray: {exc}") from exc
        if not credited:
            self._look(block=True, own=self._seq - 1)

    def _credited(self) -> bool:
        """Is there room for one more put, counting the puts not answered yet?"""
        return self._room - self._in_flight - len(self._batch) > 0

    def _add(self, put: tuple[Any, ...]) -> None:
        """A credited small put: to the actor now if it answered our last call, else with
        the next batch."""
        with self._lock:
            self._batch.append(put)
            last = self._last_call
            if last is None or len(self._batch) >= BATCH or self._ray.wait([last], timeout=0)[0]:
                self._flush()
                return
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_when_answered, name="shmchannel ray sender", daemon=True)
                self._flusher.start()
            self._more.notify()

    def _flush(self) -> None:
        """Send the batch, if any, in one call (the lock held)."""
        if self._batch:
            batch, self._batch = self._batch, []
            self._sent(self._calls.actor.put.remote(self._token, self._seq, batch), len(batch))

    def _sent(self, ref: Any, count: int) -> None:
        self._flight.append((self._seq, count, ref))
        self._in_flight += count
        self._seq += count
        self._last_call = ref

    def _flush_when_answered(self) -> None:
        """The flusher: waits for the answer to our last call while a batch waits, then sends it."""
        while True:
            with self._lock:
                while not self._batch and not self._stopping:
                    self._more.wait()
                if self._stopping:
                    return
                last = self._last_call
            try:
                self._ray.wait([last])
            except Exception:  # noqa: BLE001 -- Ray going away: the next send or close flushes
                with self._lock:
                    self._flusher = None  # a later batch starts another
                return
            with self._lock:
                if self._last_call is last:
                    self._flush()

    def _look(self, block: bool, own: int | None = None, oldest: bool = False) -> None:
        """Take the replies of calls in flight that came (all of them, waiting, if ``block``;
        the oldest only with ``oldest``); raise the failures among them (``own``: the number
        of the put this call made)."""
        with self._lock:
            if block:
                self._flush()
            calls = list(self._flight)[:1] if oldest else list(self._flight)
        done = len(calls)
        if done and not block:
            done = len(self._ray.wait([c[2] for c in calls], num_returns=len(calls), timeout=0)[0])
        self._next_look = self._in_flight + LOOK_EVERY
        failures: list[tuple[int, ChannelError]] = []
        for seq, count, ref in calls[:done]:  # the actor replies in order: the first ``done`` came
            try:  # an interrupt while waiting leaves the call in flight, looked at next time
                room = int(self._calls.result(ref, "put")[1])
            except ChannelError as exc:
                room = None
                failures.extend((seq + i, exc) for i in range(count))
            with self._lock:
                if not self._flight or self._flight[0][2] is not ref:
                    continue  # another thread looked at it
                self._flight.popleft()
                self._in_flight -= count
                if room is not None:
                    self._room = room
        self._next_look = self._in_flight + LOOK_EVERY
        if failures:
            raise self._failed(failures, own)

    def _failed(self, failures: list[tuple[int, ChannelError]], own: int | None) -> ChannelError:
        """The error to raise for puts that failed: this call's own as it is, else one
        naming every object lost."""
        seq, exc = failures[0]
        if len(failures) == 1 and seq == own:
            return exc
        which = ", ".join(str(seq) for seq, _ in failures)
        return type(exc)(
            f"{len(failures)} object(s) sent to {self._calls.label} before were not queued (number {which} "
            f"of this sender, counted from 0): {exc}"
        )

    def empty(self, shape: tuple[int, ...], dtype: Any, order: str, timeout: float | None) -> Any:
        """An ordinary array: Ray's object store takes a send's bytes by ``ray.put``, a
        copy, whatever memory they come from (no loan to fill in place)."""
        return np.empty(shape, dtype, order="F" if order == "F" else "C")

    def borrow(self, key: str) -> tuple[Any, Any]:
        """The object under ``key`` from the Ray data system; a send of it copies it."""
        if self._data_system is None:
            from .datasystem import RayDataSystem

            self._data_system = RayDataSystem(self._ray)
        return self._data_system.get(key), lambda: None

    def queue(self, shard_id: int | None) -> Any:
        with self._lock:
            self._flush()
            sent = self._seq
        return self._calls.call("queue", shard_id, self._token, sent)[1]  # once our puts are in

    def withdraw(self, thread: int | None) -> None:
        """Nothing: a put cannot be withdrawn; it ends within its timeout (or at close),
        and is queued whole or not at all."""

    def _leave(self, end_of_stream: bool) -> None:
        """Close on the actor, which waits until the puts in flight are queued and has the
        holder of this node adopt what we still own; then raise the first put that failed,
        or name what could not be adopted."""
        with self._lock:
            self._flush()
            self._stopping = True
            self._more.notify()
        unadopted = 0
        try:
            disposable, unadopted = self._calls.call("close", self._token, end_of_stream, self._seq)
            if disposable:
                self._ray.kill(self._calls.actor)
        except ChannelError:
            pass  # the actor is gone, and what it queued with it
        if not self._sending:  # else that thread's send reports them (its own: EndpointClosed)
            self._look(block=True)
        if unadopted:
            raise ObjectLost(
                f"{unadopted} object(s) sent to {self._calls.label} and not yet received could not be handed to "
                f"the holder of node {self._node}: they are lost when this process exits (README, Guarantees)"
            )

    def _leave_at_exit(self) -> None:
        try:
            self._leave(False)
        except ChannelError as exc:
            logging.getLogger("shmchannel").error("leaving channel %s at exit: %s", self._calls.label, exc)

    def close(self, end_of_stream: bool) -> None:
        if os.getpid() == self._pid:
            try:
                self._leave(end_of_stream)
            except ChannelError:  # left, with something to report
                atexit.unregister(self._leave_at_exit)
                raise
            # Only now: a close cut short (Ctrl-C while the holder adopts) leaves the exit
            # to leave again, which waits for the adoption the actor goes on with.
            atexit.unregister(self._leave_at_exit)  # (bound methods compare equal)

