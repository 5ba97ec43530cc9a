"""The broker's state as journal records and back (the format is in journal.py): a
snapshot of the live state is what a new or compacted journal starts from; ``restore``
takes over what dead brokers' journals say is still queued."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

from .journal import Recovered
from .records import Channel
from .state import BrokerState


def snapshot(state: BrokerState) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Records of the live state, lent objects first in each queue (they are not consumed
    until acknowledged)."""
    for channel in state.channels.values():
        ident = {"ns": channel.namespace, "name": channel.name}
        yield channel.record(), b""
        for shard in range(channel.num_shards):
            keys = state.queue(channel, shard, lent=True)
            for key in keys:
                obj = state.table.get(key)
                if obj is not None:
                    yield {"r": "object", **obj.describe()}, obj.inline or b""
            yield {"r": "queue", **ident, "shard": shard, "keys": keys}, b""
        if channel.closed:
            yield {"r": "close", **ident}, b""


def restore(state: BrokerState, recovered: Recovered) -> int:
    """Take over what dead brokers' journals say is queued; the number of objects. Objects
    in a dead broker's arena stay there (``state.foreign`` counts them per arena)."""
    counts: Counter[str] = Counter()
    for _, saved in recovered.live():
        for queue in saved["queues"]:
            counts.update(key for key in queue if key in recovered.objects)
    for key, refs in counts.items():
        entry = recovered.objects[key]
        if "inline" in entry:
            state.table.add(entry["size"], inline=entry["inline"], refs=refs, key=key)
        else:
            state.table.add(entry["size"], offset=entry["offset"], refs=refs, key=key, arena=entry["arena"])
            state.foreign[entry["arena"]] = state.foreign.get(entry["arena"], 0) + 1
    for (namespace, name), saved in recovered.live():
        channel = Channel(namespace, name, saved["shards"], saved["full"], saved["max"], closed=saved["closed"])
        for queue, keys in zip(channel.queues, saved["queues"]):
            queue.extend(key for key in keys if key in counts)
        if not channel.empty:  # its objects all unknown: nothing to keep it for (see Recovered.live)
            state.channels[(namespace, name)] = channel
    return len(counts)
