"""The memory target of issue 4: a long stream leaves memory flat.

    python bench/memory.py [messages]

Over ``messages`` messages (default 10,000) through one channel, the receiver's RSS and the
store's usage stay flat, and /dev/shm use never exceeds what ``max_queue_size`` allows plus
the arena's first reservation step. One producer process sends float32 arrays, every
``BIG_EVERY``-th one 256 KiB, the others 1 KiB; this process
receives them and samples its RSS, the store's figures and the arena's /dev/shm pages.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

STORE = "1G"               # the isolated broker's capacity: far above what the stream needs
MAX_QUEUE_SIZE = 10
SMALL = 1 << 10            # bytes
BIG = 256 << 10            # bytes
BIG_EVERY = 10
BLOB_SLACK = 4 << 10       # a blob's header and alignment, rounded up generously
EVERY = 1_000              # messages between samples (and one after the last message)
BASELINE = 2_000           # RSS growth is counted from this sample: warm-up (arena chunks
                           # populated, allocator pools filled) happens before it
RSS_SLACK = 4 << 20        # "flat": less RSS growth than this after the baseline
PAGE = os.sysconf("SC_PAGE_SIZE")


def _dataset(pid: int) -> str:
    return f"bench-memory-{pid}"


def elements(seq: int) -> int:
    """float32 elements of message ``seq``."""
    return (BIG if seq % BIG_EVERY == BIG_EVERY - 1 else SMALL) // 4


def payload(seq: int) -> np.ndarray:
    """Message ``seq``: a float32 array with the sequence number in element 0."""
    arr = np.ones(elements(seq), dtype=np.float32)
    arr[0] = seq  # exact in float32 up to 2**24
    return arr


def produce(dataset: str, messages: int) -> None:
    """Producer process: send ``messages`` arrays, then end the stream."""
    from shmchannel import DataSender

    with DataSender("127.0.0.1", dataset_name=dataset, max_queue_size=MAX_QUEUE_SIZE) as tx:
        for seq in range(messages):
            tx.send(payload(seq), timeout=60)


def rss() -> int:
    """This process's resident set in bytes (includes arena pages it has touched)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def shm_bytes(broker_pid: int) -> int:
    """Bytes the broker's /dev/shm entries really occupy (the arena file is sparse)."""
    from shmchannel.config import our_shm_entries

    total = 0
    for path in our_shm_entries(broker_pid):
        try:
            total += path.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def bound() -> dict[str, int]:
    """Store bytes a stream with ``MAX_QUEUE_SIZE`` can hold at once, and the reserve step:
    the sender's one slab, sized for the objects it can have in flight (store/slabs.py)."""
    from shmchannel.broker.journal import COMPACT_AT
    from shmchannel.store.arena import RESERVE_STEP
    from shmchannel.store.slabs import slab_size_for

    # queued + the one the receiver holds + the one being written, and slack (slab_size_for)
    in_flight = MAX_QUEUE_SIZE + 4
    return {"in_flight": in_flight, "blob": BIG + BLOB_SLACK, "bound": slab_size_for(BIG + BLOB_SLACK, MAX_QUEUE_SIZE),
            "reserve_step": RESERVE_STEP, "journal": 2 * COMPACT_AT}


def measure(messages: int = 10_000) -> dict[str, Any]:
    """Stream ``messages`` messages through an isolated broker; samples, figures and verdicts."""
    from shmchannel import ChannelClosed, DataReceiver, DataSystem
    from shmchannel.testing import isolated_broker, join_ok, start_process

    limits = bound()
    samples: list[dict[str, int]] = []
    t0 = time.monotonic()
    with isolated_broker(memory=STORE) as broker_pid:
        dataset = _dataset(os.getpid())
        proc = start_process(produce, dataset, messages)
        try:
            with DataReceiver("127.0.0.1", dataset_name=dataset, wait=30) as rx, DataSystem("127.0.0.1") as ds:
                for seq in range(messages):
                    arr = rx.recv(timeout=30)
                    expected = elements(seq)
                    if arr.size != expected or arr[0] != seq:
                        raise AssertionError(f"message {seq}: got {arr.size} elements starting {arr[0]}, "
                                             f"expected {expected} starting {seq}")
                    del arr  # hand the arena block back before sampling
                    if (seq + 1) % EVERY == 0 or seq + 1 == messages:
                        st = ds.stats()
                        samples.append({"messages": seq + 1, "rss": rss(), "used": st.used,
                                        "objects": st.objects, "inline_bytes": st.inline_bytes,
                                        "reserved": st.reserved, "shm": shm_bytes(broker_pid)})
                try:
                    extra = rx.recv(timeout=30)
                except ChannelClosed:
                    pass
                else:
                    raise AssertionError(f"got a message past the {messages} sent: {extra!r:.80}")
        except BaseException:
            proc.kill()  # the receive failed: don't wait for a producer stuck on a full queue
            proc.join(5)
            raise
        join_ok(proc, 60)
    elapsed = time.monotonic() - t0
    # A short run (--quick: 2,000) has nothing after the BASELINE sample: count from the first.
    base = next((s for s in samples[:-1] if s["messages"] >= BASELINE), samples[0] if samples else None)
    growth = samples[-1]["rss"] - base["rss"] if base else 0
    max_used = max((s["used"] for s in samples), default=0)
    max_shm = max((s["shm"] for s in samples), default=0)
    return {
        "messages": messages, "seconds": elapsed, "broker_pid": broker_pid, "samples": samples,
        "baseline_messages": base["messages"] if base else 0, "rss_growth": growth,
        "max_used": max_used, "max_shm": max_shm, **limits,
        "rss_flat": growth < RSS_SLACK,
        "store_flat": max_used <= limits["bound"],
        "shm_within_bound": max_shm <= max(limits["bound"], limits["reserve_step"]) + limits["journal"],
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def summary(result: dict[str, Any]) -> list[str]:
    """One line per target: met/missed and the numbers behind it."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    shm_limit = max(result["bound"], result["reserve_step"]) + result["journal"]
    return [
        f"receiver RSS flat: {verdict(result['rss_flat'])} (grew {result['rss_growth'] / 2**20:+.2f} MiB from "
        f"message {result['baseline_messages']:,} to {result['messages']:,}; limit {_mib(RSS_SLACK)})",
        f"store usage flat: {verdict(result['store_flat'])} (max used {result['max_used'] / 1024:.0f} KiB <= bound "
        f"{result['bound'] / 1024:.0f} KiB = the sender's slab, for {result['in_flight']} objects in flight of "
        f"{result['blob'] / 1024:.0f} KiB, at least 8 MiB)",
        f"/dev/shm within bound: {verdict(result['shm_within_bound'])} (max {_mib(result['max_shm'])} <= "
        f"max(bound, arena reserve step {_mib(result['reserve_step'])}) + journal {_mib(result['journal'])} "
        f"= {_mib(shm_limit)})",
    ]


def sample_rows(result: dict[str, Any]) -> list[list[str]]:
    """The samples as table cells: messages, RSS MiB, store used KiB, objects, /dev/shm MiB."""
    return [[f"{s['messages']:,}", f"{s['rss'] / 2**20:.1f}", f"{s['used'] / 1024:.0f}", str(s["objects"]),
             f"{s['shm'] / 2**20:.1f}"] for s in result["samples"]]


SAMPLE_HEADER = ["messages", "receiver RSS MiB", "store used KiB", "objects", "/dev/shm MiB"]


def main(argv: list[str]) -> int:
    result = measure(int(argv[0]) if argv else 10_000)
    widths = [max(len(h), 10) for h in SAMPLE_HEADER]
    print("  ".join(h.rjust(w) for h, w in zip(SAMPLE_HEADER, widths)))
    for row in sample_rows(result):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print(f"{result['messages']:,} messages in {result['seconds']:.1f} s")
    for line in summary(result):
        print(line)
    return 0 if result["rss_flat"] and result["store_flat"] and result["shm_within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
