"""Producer/consumer process scaffolding shared by every peer.

A peer implements ``Peer``: ``setup``/``teardown`` in the driver (per workload), and
``sender``/``receiver`` in the children (per repetition), whose objects have
``send(obj)``/``close()`` and ``recv(timeout) -> obj | END``/``release()``/``close()``.
``run_processes`` spawns one producer and ``workload.consumers`` consumers (multiprocessing
spawn), runs every repetition in them, and returns one ``Rep`` per repetition:

    per repetition:  open endpoints -> barrier -> producer sends, consumers receive and check
                     -> consumers report -> barrier (the producer outlives its data: Ray)

An ``inplace`` workload fills each object from the template before stamping it: in an
array of the producer's pool, or in the one the peer's ``batch`` lends (``shmchannel-loan``:
``DataSender.empty``); ``Peer.runs`` says which peers take part in which workloads.

A ``lockstep`` workload ("unloaded") keeps one message in flight: after each send the
producer waits on a semaphore that each consumer releases once it has checked the message
(outside the timed send -> receive span, so the ack's own cost is not in the latency).

Throughput is timed on the consumer side, from the start barrier to the last message
checked; latency is receive time minus the send time carried in each message.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from workloads import POOL, WAKE_GAP, Workload

END = "__end_of_stream__"
BARRIER_TIMEOUT = 120.0
RECV_TIMEOUT = float(os.environ.get("BENCH_RECV_TIMEOUT", 60))


@dataclass
class Config:
    reps: int
    quick: bool
    cap: float            # seconds: a producer stops sending after this long (slow peers)

    def count(self, w: Workload) -> int:
        return w.quick_count if self.quick else w.count


@dataclass
class Rep:
    elapsed: float        # seconds, start barrier -> last message checked (all consumers)
    messages: int         # objects sent (each split over the consumers)
    payload: int          # bytes of one object
    latencies: list[float] = field(default_factory=list)

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.elapsed

    @property
    def gb_per_s(self) -> float:
        return self.messages * self.payload / self.elapsed / 1e9


class PeerUnavailable(RuntimeError):
    """Raised by a peer's ``session`` when it cannot run here (e.g. its package is missing):
    the driver skips the peer with this message instead of failing the run."""


class Peer:
    """What a peer implements; ``run`` is the entry point the driver calls."""

    name = "peer"
    uses_ray = False
    wake_gap = WAKE_GAP   # seconds between the sends of "wake" (longer than the peer's latency)

    def session(self) -> Any:   # driver: a context manager around all runs of this peer
        return contextlib.nullcontext()

    def setup(self, w: Workload) -> Any:   # driver, once per workload; result goes to children
        return None

    def teardown(self, handles: Any) -> None:  # driver
        pass

    def child_init(self) -> None:   # in each child, once
        pass

    def runs(self, w: Workload) -> bool:   # driver: whether this peer takes part in ``w``
        return not w.inplace   # the in-place workloads compare shmchannel's own paths (and "fill")

    lends = False   # its sender lends the arrays to send (``batch``): the producer keeps no pool

    def batch(self, tx: Any, w: Workload, pool: list[Any], seq: int) -> Any:   # producer: the next object
        return pool[seq % len(pool)]

    def sender(self, handles: Any, w: Workload, rep: int) -> Any:
        raise NotImplementedError

    def receiver(self, handles: Any, w: Workload, rep: int, shard: int) -> Any:
        raise NotImplementedError

    def run(self, w: Workload, cfg: Config, progress: Callable[[str], None]) -> list[Rep]:
        return run_processes(self, w, cfg, progress)


MAX_IN_FLIGHT = 10  # every peer's queues hold at most this many messages


class RayPeer(Peer):
    """A peer that runs on the bench's one local Ray cluster."""

    uses_ray = True
    wake_gap = 0.02  # its p50 is a few ms: 5 ms would not leave the receiver idle

    def session(self) -> Any:
        import raycluster

        return raycluster.session()

    def child_init(self) -> None:
        import raycluster

        raycluster.connect()


class QueueFanout:
    """Sender side of the queue-based peers: one bounded queue per receiver, None ends it."""

    def __init__(self, queues: list[Any]) -> None:
        self.queues = queues

    def send(self, obj: Any) -> None:
        for q, part in zip(self.queues, split_rows(obj, len(self.queues))):
            q.put(self.wrap(part), timeout=60)

    def wrap(self, part: Any) -> Any:
        return part

    def close(self) -> None:
        for q in self.queues:
            q.put(None, timeout=60)


class QueueReceiver:
    """Receiver side of the queue-based peers (``multiprocessing.Queue``, faster-fifo, whose
    ``get`` both raise ``queue.Empty`` on timeout): None ends the stream."""

    def __init__(self, q: Any, what: str) -> None:
        self.q, self.what = q, what

    def recv(self, timeout: float) -> Any:
        try:
            obj = self.q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.what}.get timed out") from None
        return END if obj is None else obj

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


def end_processes(procs: list[Any]) -> None:
    """Kill what is still running of ``procs`` (after an error: the normal way out joined them)."""
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)


def mp_queues(w: Workload) -> list[Any]:
    ctx = mp.get_context("spawn")
    return [ctx.Queue(maxsize=MAX_IN_FLIGHT) for _ in range(w.consumers)]


def close_mp_queues(queues: list[Any]) -> None:
    for q in queues:
        q.close()
        q.cancel_join_thread()


def split_rows(obj: Any, n: int) -> list[Any]:
    """Row-wise split into n equal contiguous blocks (views), as shmchannel's num_shards does."""
    if n == 1:
        return [obj]
    block = len(obj) // n
    if hasattr(obj, "iloc"):
        return [obj.iloc[k * block:(k + 1) * block] for k in range(n)]
    return [obj[k * block:(k + 1) * block] for k in range(n)]


def time_in_process(w: Workload, cfg: Config, payload: int, step: Callable[[int, float], None]) -> Rep:
    """One repetition of an in-process baseline (memcpy, fill): ``step(seq, t)`` per
    message, each timed as its latency, until the count or ``cfg.cap``; no channel."""
    lat: list[float] = []
    start = time.perf_counter()
    count = cfg.count(w)
    for seq in range(count):
        t = time.perf_counter()
        step(seq, t)
        lat.append(time.perf_counter() - t)
        if t - start > cfg.cap:
            count = seq + 1
            break
    return Rep(elapsed=time.perf_counter() - start, messages=count, payload=payload, latencies=lat)


# -- children ------------------------------------------------------------------------------


def _producer(peer: Peer, handles: Any, w: Workload, cfg: Config, barrier: Any, ack: Any, out: Any) -> None:
    try:
        peer.child_init()
        template = w.template()
        pool = [] if peer.lends else [template.copy() for _ in range(1 if w.latency_only else POOL)]
        count = cfg.count(w)
        for rep in range(cfg.reps):
            tx = peer.sender(handles, w, rep)
            barrier.wait(BARRIER_TIMEOUT)
            start = time.perf_counter()
            sent = 0
            for seq in range(count):
                obj = peer.batch(tx, w, pool, seq)
                if w.latency_only and not w.lockstep:
                    time.sleep(peer.wake_gap)
                if w.inplace:
                    w.fill(obj, template)
                w.stamp(obj, seq, time.perf_counter())
                tx.send(obj)
                sent += 1
                if w.lockstep:  # one in flight: wait until every consumer has checked it
                    for _ in range(w.consumers):
                        if not ack.acquire(timeout=RECV_TIMEOUT):
                            raise TimeoutError(f"no ack for message {seq} within {RECV_TIMEOUT} s")
                if time.perf_counter() - start > cfg.cap:
                    break
            obj = None  # a loan goes back once its receivers are done too
            tx.close()
            out.put(("producer", rep, sent, None))
            barrier.wait(BARRIER_TIMEOUT)
        out.put(("producer", "done", os.getpid(), None))
    except BaseException:
        out.put(("producer", "error", os.getpid(), traceback.format_exc()))
        raise


def _consumer(peer: Peer, handles: Any, w: Workload, cfg: Config, shard: int, barrier: Any, ack: Any,
              out: Any) -> None:
    try:
        peer.child_init()
        expected = w.expected()[shard]
        for rep in range(cfg.reps):
            rx = peer.receiver(handles, w, rep, shard)
            barrier.wait(BARRIER_TIMEOUT)
            start = time.perf_counter()
            seqs: list[int] = []
            lat: list[float] = []
            while True:
                part = rx.recv(RECV_TIMEOUT)
                if isinstance(part, str) and part == END:
                    break
                seq, ts = w.check(part, expected)
                lat.append(time.perf_counter() - ts)
                seqs.append(seq)
                del part
                rx.release()
                if w.lockstep:
                    ack.release()
            end = time.perf_counter()
            rx.close()
            ok = seqs == list(range(len(seqs)))
            out.put((f"consumer{shard}", rep, (start, end, len(seqs), ok, lat), None))
            barrier.wait(BARRIER_TIMEOUT)
        out.put((f"consumer{shard}", "done", os.getpid(), None))
    except BaseException:
        out.put((f"consumer{shard}", "error", os.getpid(), traceback.format_exc()))
        raise


# -- driver --------------------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


def run_processes(peer: Peer, w: Workload, cfg: Config, progress: Callable[[str], None]) -> list[Rep]:
    ctx = mp.get_context("spawn")
    n = w.consumers
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    ack = ctx.Semaphore(0)  # lockstep workloads only
    handles = peer.setup(w)
    procs = []
    try:
        procs.append(ctx.Process(target=_producer, args=(peer, handles, w, cfg, barrier, ack, out), daemon=True))
        procs += [ctx.Process(target=_consumer, args=(peer, handles, w, cfg, k, barrier, ack, out), daemon=True)
                  for k in range(n)]
        for p in procs:
            p.start()
        payload = w.payload_bytes(w.template()) if w.kind == "df" else w.shape[0] * w.shape[1] * 4
        reports: dict[int, dict[str, Any]] = {}
        done = 0
        deadline = time.monotonic() + 90 + cfg.reps * (cfg.cap + 30)
        reps: list[Rep] = []
        while done < n + 1:
            try:
                who, rep, value, error = out.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise BenchError(f"{peer.name}/{w.name}: child {dead[0].pid} exited with {dead[0].exitcode}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{peer.name}/{w.name}: timed out")
                continue
            if rep == "error":
                raise BenchError(f"{peer.name}/{w.name}: {who} failed:\n{error}")
            if rep == "done":
                done += 1
                continue
            reports.setdefault(rep, {})[who] = value
            if len(reports[rep]) == n + 1:
                reps.append(_combine(peer, w, rep, reports.pop(rep), payload))
                r = reps[-1]
                progress(f"rep {rep + 1}/{cfg.reps}: {r.messages} msgs, {r.msgs_per_s:,.0f} msg/s, "
                         f"{r.gb_per_s:.3f} GB/s")
        for p in procs:
            p.join(30)
        return reps
    finally:
        end_processes(procs)
        peer.teardown(handles)
        out.close()


def _combine(peer: Peer, w: Workload, rep: int, values: dict[str, Any], payload: int) -> Rep:
    sent = values["producer"]
    starts, ends, lat = [], [], []
    for k in range(w.consumers):
        start, end, got, ok, latencies = values[f"consumer{k}"]
        if got != sent or not ok:
            raise BenchError(f"{peer.name}/{w.name} rep {rep}: consumer {k} got {got} of {sent} "
                             f"messages{'' if ok else ', out of order or duplicated'}")
        starts.append(start)
        ends.append(end)
        lat += latencies
    return Rep(elapsed=max(ends) - min(starts), messages=sent, payload=payload, latencies=lat)
