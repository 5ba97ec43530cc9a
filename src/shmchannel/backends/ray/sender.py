"""The Ray backend's sender: large parts to its node's holder, metadata to the channel actor.

A send encodes each part (``wire.encode``). Parts over ``INLINE_THRESHOLD`` bytes, and parts
the shards share (``full_batch``), go to the holder of this node (``holder.keep``), which
puts them as objects it owns and passes the put on to the channel actor with their
references; the others travel inline, in a put straight to the channel actor. Either way
the sender makes one call per object and goes on.

Backpressure by credit: the sender knows the room the channel had at its last reply and
how many of its puts are in flight since; while that leaves room, a send does not wait for
the actor at all (its put is *credited*). Otherwise it waits for its put's reply, which
the actor gives once there is room (or the timeout ran out, or the channel closed). The
puts are numbered and the actor queues them in that order.

A credited put that fails (its holder died with it; the channel actor is gone)
is reported by the sender's next call -- send or close -- which raises the error naming
it; the objects after it are unaffected. ``close`` waits until every put is queued.
"""

from __future__ import annotations

import atexit
import logging
import os
import uuid
from collections import deque
from typing import Any

import numpy as np

from ...errors import BrokerUnavailable, ChannelError, ObjectLost
from .cluster import Calls, reply
from .wire import encode, wire_size

#: Parts of at most this many bytes (``wire_size``) stay values in the channel actor and come
#: back inline with the reply to recv (one actor call); larger ones go to the holder.
INLINE_THRESHOLD = 64 * 1024
#: A sender with credit looks at its puts' replies once this many are in flight (a look at
#: them costs about 90 us, measured: not worth it on every send).
LOOK_EVERY = 32


class RaySender:
    def __init__(self, ray: Any, namespace: str, dataset_name: str, num_shards: int, full_batch: bool, max_queue_size: int) -> None:
        from .actors import ChannelActor, actor_name

        self._token = uuid.uuid4().hex
        self._ray = ray
        self._namespace, self._dataset_name = namespace, dataset_name
        self._data_system: Any = None
        actor = ChannelActor.options(  # type: ignore[attr-defined]
            name=actor_name(dataset_name), namespace=namespace, lifetime="detached", get_if_exists=True
        ).remote(namespace, dataset_name)
        self._calls = Calls(ray, actor, f"{namespace}/{dataset_name}")
        info = self._calls.call("attach_sender", self._token, num_shards, full_batch, max_queue_size)[1]
        self._room = int(info["room"])  # at the reply of the oldest put not in _flight
        self._flight: deque[tuple[int, Any, bool]] = deque()  # (seq, reply ref, through the holder) of puts not looked at
        self._seq = 0  # the number of the next put
        self._next_look = LOOK_EVERY  # flight at which a send looks at replies again
        self._shared = full_batch and num_shards > 1
        self._lease: Any = None  # made with the first holder: it dies with this process
        self._holder: Any = None
        self._sending = 0  # threads inside send: the replies are theirs to look at
        self._last_large: Any = None  # the reply to the put of the last large part, until looked at
        self._node: str | None = None
        self._pid = os.getpid()
        # A process that exits without close() leaves the channel (the stream goes on, the
        # name is free again). Registered after ray.init, so it runs before Ray's shutdown.
        atexit.register(self._leave_at_exit)

    def _holder_here(self) -> Any:
        if self._holder is None:
            from .actors import Lease
            from .holder import attach_here

            if self._lease is None:
                self._lease = Lease.remote()  # type: ignore[attr-defined]
            try:
                self._holder, self._node = attach_here(self._ray, self._token, self._lease, self._namespace, self._dataset_name)
            except self._ray.exceptions.RayError as exc:
                raise BrokerUnavailable(f"no holder on this node takes the objects of {self._calls.label}: {exc}") from exc
        return self._holder

    def send(self, parts: list[Any], timeout: float | None) -> None:
        self._sending += 1
        try:
            self._send(parts, timeout)
        finally:
            self._sending -= 1

    def _send(self, parts: list[Any], timeout: float | None) -> None:
        credited = self._room - len(self._flight) > 0
        if not credited or len(self._flight) >= self._next_look:
            self._look(block=False)  # an earlier put's failure is this call's, before anything more goes
            credited = self._room - len(self._flight) > 0
        wires = [encode(part) for part in parts]  # the codec carries a block's own rows only
        sizes = [wire_size(wire) for wire in wires]
        inline = [n <= INLINE_THRESHOLD and not self._shared for n in sizes]
        small = [w if small else None for w, small in zip(wires, inline)]
        try:
            if all(inline):
                # One argument: Ray serializes each argument of a call on its own (measured:
                # 9 of them cost a third of a send).
                ref = self._calls.actor.put.remote(
                    self._token, self._seq, (small, [], None if credited else timeout, timeout, sizes, None, credited))
            else:  # the holder puts the large parts and passes the put on: see holder.py
                self._check_holder()
                held = [wire for wire, small in zip(wires, inline) if not small]
                ref = self._holder_here().keep.remote(
                    self._calls.actor, self._token, self._seq, (small, None if credited else timeout, timeout, sizes, credited),
                    *held)
                self._last_large = ref
        except TypeError as exc:  # Ray could not serialize an argument (encode carried it: unexpected)
            raise ChannelError(f"send to {self._calls.label} could not be submitted to Ray: {exc}") from exc
        self._flight.append((self._seq, ref, not all(inline)))
        self._seq += 1
        if not credited:
            self._look(block=True, own=self._seq - 1)

    def _check_holder(self) -> None:
        """If the put of the last large part came back, look at it now: had its holder died,
        the error names the objects lost with it before this call's object goes (to the
        node's next holder), instead of losing every large part until the next look.

        (``keep`` returns the put's reply: no reference to the object comes back to us.)"""
        last = self._last_large
        if last is not None and self._ray.wait([last], timeout=0)[0]:
            self._last_large = None
            self._look(block=False)

    def _look(self, block: bool, own: int | None = None) -> None:
        """Take the replies of puts in flight that came (all of them, waiting, if ``block``);
        raise the failures among them (``own``: the number of the put this call made)."""
        done = len(self._flight)
        if done and not block:
            refs = [ref for _, ref, _ in self._flight]
            done = len(self._ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        self._next_look = len(self._flight) - done + LOOK_EVERY
        failures: list[tuple[int, ChannelError]] = []
        for _ in range(done):  # the actor replies in order: the first ``done`` came
            seq, ref, held = self._flight[0]
            try:  # an interrupt while waiting leaves the put in flight, looked at next time
                self._room = self._room_after(seq, ref, held)
            except ChannelError as exc:
                failures.append((seq, exc))
            self._flight.popleft()
        if failures:
            raise self._failed(failures, own)

    def _room_after(self, seq: int, ref: Any, held: bool) -> int:
        """The room the reply to put ``seq`` reports, or its error. A holder that died before
        passing the put on leaves a gap in the numbers, which we close (``skip``); one that
        died after left the object queued, and lost: its receivers are told (ObjectLost)."""
        if held:
            try:
                return int(reply(self._ray.get(ref))[1])
            except self._ray.exceptions.RayActorError as exc:
                if self._calls.call("skip", self._token, seq):
                    return self._room  # it had passed the put on (its receivers learn of the loss)
                raise ObjectLost(f"the holder of node {self._node} died with object {seq} of this sender: {exc}") from None
            except self._ray.exceptions.RayError as exc:
                raise BrokerUnavailable(f"put on channel {self._calls.label} failed in Ray: {exc}") from exc
        return int(self._calls.result(ref, "put")[1])

    def _failed(self, failures: list[tuple[int, ChannelError]], own: int | None) -> ChannelError:
        """The error to raise for puts that failed: this call's own as it is, else one
        naming every object lost."""
        if any(isinstance(exc, ObjectLost) for _, exc in failures):
            self._holder = None  # it died: the next large part goes to the node's next holder
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
        return self._calls.call("queue", shard_id, self._token, self._seq)[1]  # once our puts are in

    def withdraw(self, thread: int | None) -> None:
        """Nothing: a put cannot be withdrawn; it ends within its timeout (or at close),
        and is queued whole or not at all."""

    def _leave(self, end_of_stream: bool) -> None:
        """Close on the actor, which waits until the puts in flight are queued; then raise
        the first of them that failed."""
        try:
            self._calls.dispose("close", self._token, end_of_stream, self._seq)
        finally:
            holder, lease, self._holder, self._lease = self._holder, self._lease, None, None
            try:
                if holder is not None:
                    holder.detach.remote(self._token)
                if lease is not None:
                    self._ray.kill(lease)
            except Exception:  # noqa: BLE001 -- Ray already gone: so are they
                pass
        if not self._sending:  # else that thread's send reports them (its own: EndpointClosed)
            self._look(block=True)

    def _leave_at_exit(self) -> None:
        try:
            self._leave(False)
        except ChannelError as exc:
            logging.getLogger("shmchannel").error("leaving channel %s at exit: %s", self._calls.label, exc)

    def close(self, end_of_stream: bool) -> None:
        if os.getpid() == self._pid:
            atexit.unregister(self._leave_at_exit)  # (bound methods compare equal)
            self._leave(end_of_stream)

