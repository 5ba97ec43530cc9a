"""The Ray backend's DataSystem: key -> an encoded object, each stored (and owned) by one
named, detached actor (``DataSystemActor``), so an object outlives the process that put it.

Unlike a channel's objects, these are passed to the actor by value and stored on its node.
"""

from __future__ import annotations

from typing import Any

from ...store.table import StoreStats
from .cluster import DATASYSTEM, SHARED_NAMESPACE, Calls
from .wire import decode, encode


class RayDataSystem:
    def __init__(self, ray: Any) -> None:
        self._ray = ray
        from .datasystem_actor import DataSystemActor

        actor = DataSystemActor.options(  # type: ignore[attr-defined]
            name=DATASYSTEM, namespace=SHARED_NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote()
        self._calls = Calls(ray, actor, "data system")

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
