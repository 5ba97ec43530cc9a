"""Holders: where a channel's large objects live -- on the node of the sender that made them.

A Ray object dies with the process that created it (``ray.put``), and ``ray.put(_owner=...)``
was removed in Ray 2.56 (ray-notes.md). So an object that must outlive its sender has to be
put by a process that outlives it: one *holder* per node, a detached actor pinned to that
node (``NodeAffinitySchedulingStrategy(soft=False)``), named after the node and found by
name by every sender there. A sender passes each large part to its node's holder
(``keep``): Ray carries the argument through the node's object store (the sender's put) and
the holder puts it again, as an object it owns, on the same node. That second copy is the
price of "data outlives the sender" in Ray; no byte leaves the node.

The holder then passes the sender's put on to the channel's actor itself, with the
references, and keeps none of its own: the channel actor's queue and the receivers are what
keep each object alive, and Ray counts them with the owner directly (had the references gone
back through the sender, Ray would count the channel actor's use through the sender, and a
sender exiting at the wrong moment made Ray free the objects: ReferenceCountingAssertionError
at the receiver, measured). So killing a channel's actor frees that channel's objects on
every node (``shmchannel stop --ray``).

A holder exits when no sender of its node is attached and no channel it served has an entry
it holds, for ``SHMCHANNEL_RAY_HOLDER_IDLE`` seconds (60 by default). Its exit is decided in
its own event loop, where ``attach`` also runs: a sender attaching as it leaves is told
so and attaches to the next one.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import ray

from .actors import actor_name
from .cluster import HOLDER, SHARED_NAMESPACE

#: Seconds a holder stays without senders and without live objects before it exits.
IDLE = float(os.environ.get("SHMCHANNEL_RAY_HOLDER_IDLE", 60))
CHECK = 1.0  # seconds between a holder's checks of its senders' leases
ATTACH_WAIT = 30.0  # seconds a sender tries to attach while holders of its node come and go


@ray.remote(num_cpus=0, max_restarts=0)
class Holder:
    """Puts, and so owns, the large parts the senders of its node send."""

    def __init__(self, node: str, idle: float) -> None:
        self.node = node
        self.idle = idle
        self.senders: dict[str, Any] = {}  # token -> the sender's Lease
        self.channels: set[tuple[str, str]] = set()  # (namespace, dataset_name) served
        self.last = time.monotonic()
        self.leaving = False
        self.kept = 0
        self._watch: asyncio.Task[None] | None = None

    async def attach(self, token: str, lease: Any, namespace: str, dataset_name: str) -> bool:
        """A sender of this node will send through us; False if we are leaving."""
        if self.leaving:
            return False
        self.senders[token] = lease
        self.channels.add((namespace, dataset_name))
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_idle())
        return True

    async def detach(self, token: str) -> None:
        self.senders.pop(token, None)
        self.last = time.monotonic()

    async def keep(self, channel: Any, token: str, seq: int, put: tuple[Any, ...], *wires: Any) -> Any:
        """Put each part (``wire.encode``'s form) as an object we own, and pass the sender's
        put on to its channel's actor with their references in place of the parts (``put``:
        the put without them, see ``ChannelActor.put``); its reply, or its error."""
        self.last = time.monotonic()
        self.kept += len(wires)
        refs = [ray.put(wire) for wire in wires]
        parts, timeout, asked, sizes, credited = put
        try:
            return await channel.put.remote(token, seq, [(parts, refs, timeout, asked, sizes, self.node, credited)])
        except ray.exceptions.RayError as exc:  # the channel's actor is gone
            return ("error", "broker_unavailable", f"the actor of the channel is gone: {exc}")

    async def stats(self) -> dict[str, Any]:
        return {"node": self.node, "senders": len(self.senders), "kept": self.kept, "channels": sorted(self.channels)}

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(CHECK)
            for token, lease in list(self.senders.items()):
                try:
                    await asyncio.wait_for(lease.ping.remote(), 10)
                except ray.exceptions.RayActorError:
                    self.senders.pop(token, None)  # its process died without detaching
                except asyncio.TimeoutError:
                    pass
            if self._in_use() or await self._holding() or self._in_use():  # (a sender may come meanwhile)
                continue
            self.leaving = True  # no await from here: nothing attaches in between
            ray.kill(ray.get_runtime_context().current_actor)
            return

    def _in_use(self) -> bool:
        return bool(self.senders) or time.monotonic() - self.last < self.idle

    async def _holding(self) -> bool:
        """Does a channel we served still queue or lend an object we own?"""
        for namespace, name in list(self.channels):
            try:
                actor = ray.get_actor(actor_name(name), namespace=namespace)
                held = await asyncio.wait_for(actor.held_by.remote(self.node), 10)
            except ValueError:  # the channel is gone, and its objects with it
                self.channels.discard((namespace, name))
                continue
            except (ray.exceptions.RayError, asyncio.TimeoutError):
                return True  # cannot tell: stay
            if held:
                self.last = time.monotonic()
                return True
        return False


def attach_here(ray_module: Any, token: str, lease: Any, namespace: str, dataset_name: str) -> tuple[Any, str]:
    """The holder of this process's node, made if there is none, with the sender ``token``
    attached; and the node's id.

    Raises:
        ray.exceptions.RayError: no holder would take the sender within ``ATTACH_WAIT`` s.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray_module.get_runtime_context().get_node_id()
    deadline = time.monotonic() + ATTACH_WAIT
    while True:
        holder = Holder.options(  # type: ignore[attr-defined]
            name=HOLDER + node, namespace=SHARED_NAMESPACE, lifetime="detached", get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        ).remote(node, IDLE)
        try:
            if ray_module.get(holder.attach.remote(token, lease, namespace, dataset_name)):
                return holder, node
        except ray_module.exceptions.RayActorError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise ray_module.exceptions.RayError(f"the holder of node {node} kept leaving for {ATTACH_WAIT} s")
        time.sleep(0.05)  # the leaving one's name is released shortly after it exits
