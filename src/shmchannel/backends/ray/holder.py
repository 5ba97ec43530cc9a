"""Holders: the owners of a channel's objects that must outlive the sender that made them.

A Ray object dies with the process that put it, and ``ray.put(_owner=...)`` was removed in
Ray 2.56 (ray-notes.md). So an object that must outlive its sender has to be put again by a
process that outlives it: one *holder* per node, a detached actor pinned to that node
(``NodeAffinitySchedulingStrategy(soft=False)``), named after the node, started by the first
channel actor that needs it and found by name afterwards. A channel actor asks it to
*adopt* the objects a sender of its node put and still owns (``ownership.py``: when they
have waited ``adopt_after`` seconds, or when their sender leaves): the holder reads each one
(zero-copy: it is in its own node's object store) and puts a copy that it owns, on the same
node. That second copy is the price of "data outlives the sender" in Ray; it is paid only
for objects that wait, and no byte leaves the node.

The holder keeps no reference of its own to what it adopted: the channel actor's queue and
the receivers are what keep each object alive, so killing a channel's actor frees that
channel's objects on every node (``shmchannel stop --ray``). A holder exits after
``SHMCHANNEL_RAY_HOLDER_IDLE`` seconds (60 by default; as the sender of the channel that
started it read it) without an adoption, none under way, once no channel it served queues
or lends an object it owns. The decision is taken in its own event loop, where ``adopt``
also runs: nothing is adopted by a holder that has decided to leave.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray

from .actors import actor_name
from .cluster import HOLDER, SHARED_NAMESPACE

CHECK = 1.0  # seconds between a holder's idle checks
#: Seconds a holder waits to read one object. Its owner must answer for it: an actor that
#: exits (``ray.actor.exit_actor``) does not while its atexit handlers run (measured), and
#: the adoption its sender's close then asks for would wait for ever.
READ_WAIT = 10.0


@ray.remote(num_cpus=0, max_restarts=0)
class Holder:
    """Puts, and so owns, copies of the objects its node's senders put."""

    def __init__(self, node: str, idle: float) -> None:
        self.node = node
        self.idle = idle
        self.channels: set[tuple[str, str]] = set()  # (namespace, dataset_name) served
        self.last = time.monotonic()
        self.adopted = 0
        self.adopting = 0  # adoptions under way: we do not leave under one
        self._watch: asyncio.Task[None] | None = None

    async def adopt(self, namespace: str, dataset_name: str, refs: list[Any]) -> list[Any]:
        """A reference we own to a copy of each of ``refs`` (a list: Ray passes the references
        themselves); None for one whose owner died before we could read it, "later" for one
        we could not read within ``READ_WAIT`` seconds or not put (our node's store full)."""
        self.adopting += 1
        self.channels.add((namespace, dataset_name))
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_idle())
        try:
            return [await self._copy(ref) for ref in refs]
        finally:
            self.adopting -= 1
            self.last = time.monotonic()

    async def _copy(self, ref: Any) -> Any:
        try:
            value = await asyncio.wait_for(asyncio.wrap_future(ref.future()), READ_WAIT)
        except ray.exceptions.ObjectLostError:  # (OwnerDiedError is one) nothing left to copy
            return None
        except (ray.exceptions.RayError, asyncio.TimeoutError):
            return "later"
        try:
            copy = ray.put(value)
        except ray.exceptions.RayError:  # ObjectStoreFullError: the sender's copy stays
            return "later"
        self.adopted += 1
        return copy

    async def stats(self) -> dict[str, Any]:
        return {"node": self.node, "adopted": self.adopted, "channels": sorted(self.channels)}

    async def _watch_idle(self) -> None:
        while True:
            await asyncio.sleep(CHECK)
            if self._in_use() or await self._holding() or self._in_use():  # (an adopt may come meanwhile)
                continue
            ray.kill(ray.get_runtime_context().current_actor)  # no await since the check
            return

    def _in_use(self) -> bool:
        return bool(self.adopting) or time.monotonic() - self.last < self.idle

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


def holder_of(node: str, idle: float) -> Any:
    """The holder of ``node``, started there if there is none (with ``idle``).

    A call to one that is leaving fails with RayActorError; the caller tries again later,
    when its name is free for the next one."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return Holder.options(  # type: ignore[attr-defined]
        name=HOLDER + node, namespace=SHARED_NAMESPACE, lifetime="detached", get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote(node, idle)
