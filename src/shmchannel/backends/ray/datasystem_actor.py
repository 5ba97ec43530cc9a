"""The Ray backend's DataSystem actor: key -> an encoded object, each put (and so owned) by
this one named, detached actor, so an object outlives the process that stored it.

Imported only inside Ray (``ray`` is an optional extra); the client is ``datasystem.py``.
"""

from __future__ import annotations

import itertools
from typing import Any

import ray

from ...broker import rules
from .actors import error_reply


@ray.remote(num_cpus=0, max_restarts=0)
class DataSystemActor:
    """Key -> an encoded object, each stored (and owned) by this actor."""

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self._keys = (f"d{n:x}" for n in itertools.count(1))

    async def put(self, value: Any) -> str:
        key = next(self._keys)
        self.objects[key] = ray.put(value)
        return key

    async def get(self, key: str) -> Any:
        ref = self.objects.get(key)
        if ref is None:
            return error_reply(rules.no_such_key(key))
        return ("ok", [ref])

    async def delete(self, key: str) -> Any:
        if self.objects.pop(key, None) is None:
            return error_reply(rules.no_such_key(key))
        return ("ok",)

    async def contains(self, key: str) -> bool:
        return key in self.objects

    async def count(self) -> int:
        return len(self.objects)
