"""DataSystem: the key-value store whose values live in shared memory."""

from __future__ import annotations

from typing import Any

from ..backends import backend_for
from ..broker import rules
from ..store.table import StoreStats
from .checks import check_int, check_name, check_timeout
from .endpoint import Endpoint, close_endpoint


class DataSystem(Endpoint):
    """A key-value store whose values live in shared memory, owned by the broker.

    Example::

        with DataSystem(address="127.0.0.1") as ds:
            key = ds.put(np.arange(10))
            view = ds.get(key)       # read-only view of shared memory
            ds.delete(key)
    """

    def __init__(self, address: str | None = None, *, inline_threshold: int | None = None) -> None:
        self._endpoint: Any = None
        if inline_threshold is not None:
            check_int("inline_threshold", inline_threshold, 0)
        backend = backend_for(address, inline_threshold=inline_threshold)
        self._open(backend.data_system, close_endpoint, "DataSystem")

    def put(self, obj: Any, *, timeout: float | None = None) -> str:
        """Store any picklable object; return its key. The object stays until ``delete``.

        Raises:
            StoreFull / StoreFullTimeout: no room (within ``timeout`` seconds).

        Example::

            key = ds.put({"weights": np.zeros((1024, 1024)), "step": 10})
        """
        # No call after the endpoint's: an interrupt at its check point would drop the key
        # of an object stored (the endpoint undoes only what it has not returned).
        key: str = self._live().put(obj, check_timeout("timeout", timeout))
        return key

    def get(self, key: str) -> Any:
        """The object under ``key``; its arrays are read-only views of shared memory.

        Raises:
            KeyError (``ObjectNotFound``): no object under ``key``.

        Example::

            weights = ds.get(key)["weights"]   # a read-only view: no copy
        """
        return self._live().get(check_name("key", key))

    def delete(self, key: str) -> None:
        """Remove ``key``; views already handed out stay valid until dropped.

        Raises:
            KeyError (``ObjectNotFound``): no object under ``key``.

        Example::

            ds.delete(key)
        """
        self._live().delete(check_name("key", key))

    def __contains__(self, key: object) -> bool:
        """Whether an object is stored under ``key`` (``if key in ds: ...``)."""
        return rules.valid_name(key) and bool(self._live().contains(key))  # no other key can be stored

    def stats(self) -> StoreStats:
        """Capacity, bytes used and object count of the store.

        Example::

            print(f"{ds.stats().free >> 20} MiB free")
        """
        stats: StoreStats = self._live().stats()
        return stats

    def close(self) -> None:
        """Disconnect; stored objects stay until deleted. Idempotent.

        Example::

            ds = DataSystem()
            key = ds.put(table)
            ds.close()           # the object stays under key for other processes
        """
        endpoint = self._begin_close()
        if endpoint is not None:
            endpoint.close()
            self._end_close()

    def __repr__(self) -> str:
        return f"<DataSystem {'closed' if self._endpoint is None else 'open'}>"
