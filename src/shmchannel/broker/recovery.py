"""A broker's state as journal records and back (the format is in journal.py): a snapshot
of the live state is what a new or compacted journal starts from; ``restore`` carries on
with what a dead broker's journal says is in the arena taken over from it."""

from __future__ import annotations

from typing import Any, Iterator

from .journal import Recovered
from .state import BrokerState


def snapshot(state: BrokerState) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Records of where everything is: channels, claim logs, slabs (the queues and the
    objects are in the arena and need none)."""
    for record in state.records():
        yield record, b""


def restore(state: BrokerState, recovered: Recovered) -> int:
    """Take over a dead broker's channels, logs and slabs; the number of objects queued."""
    if recovered.empty:
        return 0
    state.adopt(recovered.channels, recovered.logs, recovered.slabs, recovered.loans, recovered.holds)
    return sum(c.depth(s) for c in state.channels.values() for s in range(c.num_shards))
