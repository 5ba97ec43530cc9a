"""Peer: Ray, the way a Ray user hands data over: ``ray.put`` + ``ray.util.queue.Queue``.

The object reference travels in a list (a top-level ObjectRef argument would make Ray
resolve it and ship the data to the queue actor); the receiver ``ray.get``s it, which gives
read-only zero-copy arrays from the object store.
"""

from __future__ import annotations

from typing import Any

from harness import END, MAX_IN_FLIGHT, QueueFanout, RayPeer
from workloads import Workload
NS = "shmchannel-bench"


class _Sender(QueueFanout):
    def wrap(self, part: Any) -> Any:
        import ray

        return [ray.put(part)]


class _Receiver:
    def __init__(self, q: Any) -> None:
        self.q = q

    def recv(self, timeout: float) -> Any:
        import ray
        from ray.util.queue import Empty

        try:
            item = self.q.get(timeout=timeout)
        except Empty:
            raise TimeoutError("ray.util.queue.Queue.get timed out") from None
        return END if item is None else ray.get(item[0], timeout=timeout)

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class RayQueuePeer(RayPeer):
    name = "ray"

    # The queues are named actors: children look them up by name once they joined the
    # cluster (an actor handle cannot be unpickled before ray.init).

    def setup(self, w: Workload) -> Any:
        from ray.util.queue import Queue

        names = [f"bench-{w.name}-{k}" for k in range(w.consumers)]
        self._queues = [Queue(maxsize=MAX_IN_FLIGHT, actor_options={"num_cpus": 0, "name": n, "namespace": NS})
                        for n in names]
        return names

    def teardown(self, handles: Any) -> None:
        for q in getattr(self, "_queues", []):
            q.shutdown()
        self._queues = []

    def sender(self, handles: Any, w: Workload, rep: int) -> Any:
        return _Sender([_lookup(n) for n in handles])

    def receiver(self, handles: Any, w: Workload, rep: int, shard: int) -> Any:
        return _Receiver(_lookup(handles[shard]))

    def __getstate__(self) -> dict[str, Any]:
        return {}


def _lookup(name: str) -> Any:
    import ray
    from ray.util.queue import Queue

    q = Queue.__new__(Queue)
    q.maxsize = MAX_IN_FLIGHT
    q.actor = ray.get_actor(name, namespace=NS)
    return q
