"""Peer: Ray, the way a Ray user hands data over: ``ray.put`` + ``ray.util.queue.Queue``.

The object reference travels in a list (a top-level ObjectRef argument would make Ray
resolve it and ship the data to the queue actor); the receiver ``ray.get``s it, which gives
read-only zero-copy arrays from the object store.
"""

from __future__ import annotations

from typing import Any

from harness import END, Peer, split_rows
from workloads import Workload

MAX_IN_FLIGHT = 10
NS = "shmchannel-bench"


class _Sender:
    def __init__(self, queues: list[Any]) -> None:
        self.queues = queues

    def send(self, obj: Any) -> None:
        import ray

        for q, part in zip(self.queues, split_rows(obj, len(self.queues))):
            q.put([ray.put(part)], timeout=60)

    def close(self) -> None:
        for q in self.queues:
            q.put(None, timeout=60)


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


class RayQueuePeer(Peer):
    name = "ray"
    uses_ray = True
    wake_gap = 0.02  # its p50 is a few ms: 5 ms would not leave the receiver idle

    def session(self) -> Any:
        import raycluster

        return raycluster.session()

    def child_init(self) -> None:
        import raycluster

        raycluster.connect()

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
