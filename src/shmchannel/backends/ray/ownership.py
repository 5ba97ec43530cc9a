"""Who owns the bytes of a Ray channel's objects, and when that changes: *adoption*.

Ray: an object dies with the process that put it, and ``ray.put(_owner=)`` is gone since
Ray 2.56 (ray-notes.md). The sender puts a large part itself, one copy, and owns it. An
entry that has waited in its queue ``adopt_after`` seconds (``SHMCHANNEL_RAY_ADOPT_AFTER``,
1 by default) since it was queued, lent to a receiver or not, is *adopted*: the holder of the part's node (``holder.py``) reads it, puts a
copy that it owns on the same node, and the entry takes that reference instead; the
sender's copy is freed once no receiver holds it. A closing or exiting sender gives its
receivers up to ``adopt_after`` seconds to take what is left, then has the rest adopted,
queued and lent (a receiver that finds a lent entry's sender gone asks for the adopted
reference: ``current``).

So an object taken sooner -- the usual case while receivers keep up -- is never copied
twice, and one that waits because receivers are behind is copied while the sender has
time to spare. Holding every object by the holder from the start cost a second copy on
the send path: 0.15-0.6x of plain Ray on ``make bench`` large, medium and df, against
0.97-1.44x this way (measured in one session, DESIGN.md). The price: what a SIGKILLed
sender had sent less than ``adopt_after`` seconds before, and no receiver had in hand, is
lost with it; those recvs raise ``ObjectLost`` (README, Guarantees).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Iterator

import ray

#: Seconds a holder may take to adopt a batch of objects (it may first have to start).
ADOPT_WAIT = 30.0
#: Seconds before adoption is tried again after a holder failed (it is being replaced).
ADOPT_RETRY = 1.0
#: Tries a closing sender's adoption gets (its process exits once we answer).
ADOPT_TRIES = 3

log = logging.getLogger("shmchannel")


class Entry:
    """One object's part in a queue. The same entry sits in every shard's queue of a
    ``full_batch`` channel, and moves to ``lent`` and back: adopting it once updates all."""

    __slots__ = ("key", "payload", "size", "node", "owner", "since")

    def __init__(self, key: str, inline: bool, payload: Any, size: int, node: str | None) -> None:
        self.key = key
        self.payload = payload  # the encoded part (inline), else an ObjectRef to it
        self.size = size  # bytes of data, as the sender measured them (status)
        self.node = node  # the node whose object store holds ``payload`` (None: inline)
        self.owner = "inline" if inline else "sender"  # then "holder" once adopted, "gone" if it never can be
        self.since = time.monotonic()  # queued at

    @property
    def inline(self) -> bool:
        return self.owner == "inline"

    def public(self) -> tuple[str, bool, Any, str | None, str]:
        return self.key, self.inline, self.payload, self.node, self.owner


class Adoption:
    """The channel actor's part that has its objects adopted (``actors.ChannelActor``)."""

    queues: list[deque[Entry]]
    lent: dict[str, list[tuple[int, Entry]]]
    namespace: str
    name: str
    adopt_after: float  # seconds an entry waits in its queue before its holder adopts it
    holder_idle: float  # the idle time of holders we start (holder.py)
    _adopter: asyncio.Task[None] | None
    _adopting: asyncio.Lock

    cond: asyncio.Condition

    def _entries(self) -> Iterator[Entry]:
        """The entries queued or lent (a ``full_batch`` one once per shard)."""
        for queue in self.queues:
            yield from queue
        for lent in self.lent.values():
            yield from (entry for _, entry in lent)

    def _unadopted(self) -> list[Entry]:
        """Entries whose sender still owns their object, queued or lent (a receiver's
        reference does not keep an object alive once its owner died: Ray)."""
        return list({id(e): e for e in self._entries() if e.owner == "sender"}.values())

    def _present(self) -> set[int]:
        """The ids of the entries queued or lent."""
        return {id(e) for e in self._entries()}

    def _adopt_soon(self) -> None:
        """Start the adoption loop unless it runs (it ends by itself when nothing waits):
        after a large object is queued."""
        if self._adopter is None:
            self._adopter = asyncio.ensure_future(self._adopt_when_due())

    async def _adopt_when_due(self) -> None:
        """While there are entries whose sender owns their object, have each adopted once
        it has waited ``adopt_after`` seconds since it was queued, lent or not."""
        try:
            while True:
                waiting = self._unadopted()
                if not waiting:
                    return
                now = time.monotonic()
                due = [e for e in waiting if now - e.since >= self.adopt_after]
                if not due:
                    await asyncio.sleep(min(e.since for e in waiting) + self.adopt_after - now)
                elif await self._adopt(due):
                    await asyncio.sleep(ADOPT_RETRY)  # a holder failed: it is being replaced
        finally:
            self._adopter = None

    async def _adopt_for_close(self) -> int:
        """Have everything the sender still owns adopted, trying again while a holder fails
        (one that is leaving as we call it: the next one takes them); how many of those
        still queued or lent were not."""
        mine = self._unadopted()
        for attempt in range(ADOPT_TRIES):
            if attempt:
                await asyncio.sleep(ADOPT_RETRY)
            present = self._present()
            left = [e for e in mine if e.owner == "sender" and id(e) in present]
            if not left or not await self._adopt(left):
                break
        present = self._present()
        return sum(e.owner != "holder" and id(e) in present for e in mine)

    async def _adopt(self, entries: list[Entry]) -> int:
        """Have the holders of their nodes adopt ``entries``; how many were not (the holder
        failed, or could not read the object: "gone" if its owner died)."""
        from .holder import holder_of

        failed = 0
        async with self._adopting:  # one batch at a time: the close's waits for the loop's
            nodes: dict[str, list[Entry]] = {}
            for entry in entries:
                if entry.owner == "sender":  # (adopted meanwhile, or its sender died)
                    nodes.setdefault(str(entry.node), []).append(entry)
            for node, group in nodes.items():
                try:
                    holder = holder_of(node, self.holder_idle)
                    refs = await asyncio.wait_for(
                        holder.adopt.remote(self.namespace, self.name, [e.payload for e in group]), ADOPT_WAIT)
                except Exception as exc:  # noqa: BLE001 -- whatever it is, the objects stay the sender's
                    failed += len(group)
                    log.warning("the holder of node %s did not adopt %d object(s) of channel %s/%s: %r",
                                node, len(group), self.namespace, self.name, exc)
                    continue
                for entry, ref in zip(group, refs):
                    if ref is None:  # its owner died before the holder could read it
                        entry.owner = "gone"
                        failed += 1
                    elif isinstance(ref, str):  # "later": it could not read or put it now
                        failed += 1
                    else:
                        entry.payload, entry.owner = ref, "holder"
        async with self.cond:
            self.cond.notify_all()  # a closing sender waits for its objects to be adopted
        return failed

    async def held_by(self, node: str) -> int:
        """Entries queued or lent whose bytes the holder of ``node`` owns (its idle check)."""
        return sum(e.node == node and e.owner == "holder" for e in self._entries())
