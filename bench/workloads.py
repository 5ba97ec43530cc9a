"""The workloads of the benchmark: what is sent, how it is stamped, how a receiver checks it.

Every message carries its sequence number and the ``time.perf_counter()`` of its send
(CLOCK_MONOTONIC, the same clock in every process of this machine). Arrays carry both in
the first 16 bytes of the first row of each shard's block; DataFrames in row 0 of two
columns. A receiver reads them back, checks the shape and the checksum of a sample of rows
that are never stamped (compared with the same sample of the template), and keeps the
sequence numbers so the run can verify that nothing was lost, duplicated or reordered.

The in-place workloads (``inplace``, issue 15) make each batch the way a producer would:
every byte written from the template (``fill``) just before the stamp and the send, so a
batch costs its production as well as its transport; they compare shmchannel's copying
send with a send of a ``DataSender.empty`` loan, and with the fill alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KIB, MIB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str                 # "array" or "df"
    shape: tuple[int, int]    # array: (rows, float32 columns); df: (rows, columns)
    consumers: int            # receivers; the producer splits each object row-wise over them
    count: int                # messages per repetition (full run)
    quick_count: int          # messages per repetition with --quick
    latency_only: bool = False  # "wake": an idle receiver, one send every GAP seconds
    lockstep: bool = False    # "unloaded": one message in flight, the next sent once the receiver
                              # has checked the previous one (no gap, no queueing); latency only
    inplace: bool = False     # "*-inplace" (issue 15): the producer fills each batch from the template
                              # before stamping it, into its own array ("copy") or a loan ("loan")
    description: str = ""

    # -- the data -------------------------------------------------------------------------

    def template(self) -> Any:
        """The object every message is a copy of (deterministic: every process builds the same)."""
        rng = np.random.default_rng(0)
        rows, cols = self.shape
        if self.kind == "array":
            return rng.random((rows, cols), dtype=np.float32)
        import pandas as pd

        data: dict[str, Any] = {f"f{j}": rng.random(rows) for j in range(5)}
        data.update({f"i{j}": rng.integers(0, 1 << 40, rows, dtype=np.int64) for j in range(4)})
        data["s"] = [f"user-{k % 9973:05d}" for k in range(rows)]
        return pd.DataFrame(data)

    def payload_bytes(self, obj: Any) -> int:
        if self.kind == "array":
            return int(obj.nbytes)
        return int(obj.memory_usage(index=False, deep=True).sum())

    def fill(self, obj: Any, template: Any) -> None:
        """Produce a batch of an in-place workload: all of ``template``'s bytes into ``obj``."""
        np.copyto(obj, template)

    def stamp(self, obj: Any, seq: int, ts: float) -> None:
        """Write (seq, ts) into ``obj`` in place, once per shard block."""
        if self.kind == "array":
            block = obj.shape[0] // self.consumers
            for k in range(self.consumers):
                obj[k * block, :4].view(np.float64)[:] = (seq, ts)
        else:
            obj.iloc[0, 0] = ts   # column f0
            obj.iloc[0, 1] = float(seq)  # column f1

    # -- the receiver side ----------------------------------------------------------------

    def part_shape(self) -> tuple[int, int]:
        return (self.shape[0] // self.consumers, self.shape[1])

    def sample(self, part: Any) -> Any:
        """A checksum of a sample of unstamped rows: touches the received data."""
        if self.kind == "array":
            step = max(1, part.shape[0] // 64)
            return float(part[1::step, ::16].sum(dtype=np.float64))
        return (float(part["f2"].to_numpy()[1::997].sum()), int(part["i2"].to_numpy()[1::997].sum()),
                str(part["s"].iat[-1]))

    def expected(self) -> list[Any]:
        """``sample`` of each shard's block of the template."""
        obj = self.template()
        block = self.shape[0] // self.consumers
        if self.kind == "array":
            return [self.sample(obj[k * block:(k + 1) * block]) for k in range(self.consumers)]
        return [self.sample(obj.iloc[k * block:(k + 1) * block]) for k in range(self.consumers)]

    def check(self, part: Any, expected: Any) -> tuple[int, float]:
        """Verify shape and sample of a received part; return its (seq, send time)."""
        if tuple(part.shape) != self.part_shape():
            raise AssertionError(f"{self.name}: got shape {tuple(part.shape)}, expected {self.part_shape()}")
        got = self.sample(part)
        if got != expected:
            raise AssertionError(f"{self.name}: sample checksum {got!r} != {expected!r}")
        if self.kind == "array":
            seq, ts = part[0, :4].view(np.float64)
        else:
            ts, seq = part["f0"].iat[0], part["f1"].iat[0]
        return int(seq), float(ts)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("small", "array", (4, 64), 1, 20_000, 2_000, description="1 KiB float32 arrays, 1->1"),
        Workload("medium", "array", (256, 1024), 1, 1_000, 200, description="1 MiB float32 arrays, 1->1"),
        Workload("large", "array", (16384, 1024), 1, 24, 8, description="64 MiB float32 arrays, 1->1"),
        Workload("df", "df", (100_000, 10), 1, 60, 15,
                 description="pandas DataFrame 100,000 rows x 10 columns (5 float64, 4 int64, 1 str), 1->1"),
        Workload("shard4", "array", (4096, 1024), 4, 96, 24,
                 description="16 MiB float32 arrays split row-wise over 4 receivers"),
        Workload("wake", "array", (4, 64), 1, 200, 50, latency_only=True,
                 description="idle receiver blocked in recv, then one 1 KiB send (every 5 ms; 20 ms for the Ray-based peers)"),
        Workload("unloaded", "array", (4, 64), 1, 2_000, 300, latency_only=True, lockstep=True,
                 description="1 KiB float32 arrays, 1->1, one in flight: the producer sends the next as soon as "
                             "the receiver has checked the previous one (unloaded latency: no queueing, no idle gap)"),
        Workload("large-inplace", "array", (16384, 1024), 1, 200, 24, inplace=True,
                 description="64 MiB float32 batches, 1->1, each filled from a fixed template before it is sent: "
                             "`shmchannel` fills its own reused array and sends it (a copy into shared memory), "
                             "`shmchannel-loan` fills a `sender.empty()` loan and sends it (no copy), `fill` only "
                             "fills (one process, no channel)"),
        Workload("shard4-inplace", "array", (16384, 1024), 4, 200, 24, inplace=True,
                 description="`large-inplace`'s 64 MiB batches with num_shards=4, split row-wise over 4 receivers "
                             "(16 MiB each)"),
    )
}

WAKE_GAP = 0.005  # seconds between the sends of "wake": the receiver is idle when each arrives
POOL = 12         # distinct objects the producer cycles through (> the 10 a bounded queue holds)
