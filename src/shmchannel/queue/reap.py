"""The broker's part in the queues: give back what a receiver held when it left or died.

Claims go back in the order they were published (by position), into the shard's returned
list, which receivers claim from before the ring. The broker is that list's only writer.
The sources, for a claim log whose process is gone (``reap_log``) or one receiver that
detached (``return_claims``):

- entries CLAIMED in the log: taken, never acknowledged;
- slots still CLAIMED by the log's number (``reap_slots``): a process that died between
  its CAS on the slot and its log entry. A slot and an entry naming the same position are
  one object; it goes back once.

Acknowledged entries (ACKED, RELEASING) drop their block reference instead: the process
that viewed the memory is gone. (A claimer that died asleep leaves nothing to undo: at
most its announcement in the channel's event count, which costs the next publish one
spare wake-up.)

If a returned list is full, what did not fit stays where it was (CLAIMED in the dead log,
or in its slot) and ``Backlog`` keeps it for the next try; the shard's ``pending`` count
tells its receivers that more is coming, so that none of them takes the shard for drained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from . import layout as L
from .log import ACKED, CLAIMED, FREE, RELEASING, RETURNED, STATUS, ClaimLog
from .ring import Queues

@dataclass
class Item:
    pos: int
    offset: int
    size: int
    entry: int = -1  # log entry it came from (-1: only a slot)
    slot: int = -1  # slot still CLAIMED by the dead claimer (-1: none)


@dataclass
class Backlog:
    """Claims of one shard still to go back, in position order."""

    queues: Queues
    shard: int
    log: ClaimLog | None
    items: list[Item] = field(default_factory=list)


def collect(log: ClaimLog, queues: Queues, shard: int, receiver: int | None) -> Backlog:
    """What ``log`` holds CLAIMED of ``shard`` of the channel (only ``receiver``'s, if
    given), plus slots the log's claimer left CLAIMED there (only for a dead claimer:
    ``receiver`` None); sorted by position, each object once."""
    items: dict[int, Item] = {}
    for index, state in log.entries():
        if state & STATUS != CLAIMED:
            continue
        channel, s, r, pos, offset, size, _ = log.fields(index)
        if channel == queues.base and s == shard and (receiver is None or r == receiver):
            items[pos] = Item(pos, offset, size, entry=index)
    if receiver is None:
        region, lay, me = queues.region, queues.layout, log.claimer
        for slot_of in (lay.slot, lay.returned_slot):
            for i in range(lay.ring):
                at = queues.base + slot_of(shard, i)
                state = region.load(at)
                if L.code_of(state) == L.CLAIMED and L.claimer_of(state) == me:
                    offset, size, pos = L.read_slot(queues.view, at)
                    items.setdefault(pos, Item(pos, offset, size)).slot = at
    backlog = Backlog(queues, shard, log, sorted(items.values(), key=lambda item: item.pos))
    if backlog.items:
        queues.region.add(queues.base + queues.layout.shard(shard) + L.S_PENDING, len(backlog.items))
    return backlog


def give_back(backlog: Backlog) -> bool:
    """Move the backlog's claims into the returned list, oldest first, as far as there is
    room; True when all went. Each goes before its source is cleared: a broker that dies
    in between returns it twice (at-least-once), never loses it."""
    q, shard = backlog.queues, backlog.shard
    region, view, lay = q.region, q.view, q.layout
    sb = q.base + lay.shard(shard)
    moved = 0
    while backlog.items:
        item = backlog.items[0]
        rt = region.load(sb + L.S_RET_TAIL)
        at = q.base + lay.returned_slot(shard, rt)
        if region.load(at) != L.FREE:
            break  # full: receivers have yet to claim from it
        L.write_slot(view, at, item.offset, item.size, item.pos)
        region.store(at, L.ready(rt))
        region.store(sb + L.S_RET_TAIL, rt + 1)
        region.add(sb + L.S_RECV_BYTES, -item.size)
        if item.entry >= 0 and backlog.log is not None:
            backlog.log.mark_returned(item.entry)
        if item.slot >= 0:
            region.store(item.slot, L.FREE)
        backlog.items.pop(0)
        moved += 1
    if moved:
        region.add(sb + L.S_PENDING, -moved)
        q.wake_all()
    return not backlog.items


def release_acknowledged(log: ClaimLog) -> int:
    """Drop the block references of a dead process's acknowledged entries (its views died
    with it); the number of entries freed."""
    region, freed = log.region, 0
    for index, state in log.entries():
        if state & STATUS in (ACKED, RELEASING):
            region.store(log.state_at(index), RELEASING)
            freed += 1
        elif state & STATUS == RETURNED:
            region.store(log.state_at(index), FREE)
    log.finish_releasing()
    return freed
