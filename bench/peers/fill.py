"""The cost of producing an in-place workload's batch: the fill alone, in one process.

Each batch is the producer's own work in ``large-inplace`` and ``shard4-inplace`` -- every
byte written from the template into a preallocated, already-touched array
(``Workload.fill``), then the stamp -- with no channel: what a loan's send should cost
little more than (issue 15). msgs/s is fills per second; "latency" is the time of one fill
and stamp. The last batch is checked as a receiver would check it (shape, sample checksum,
sequence number), every shard's block of it.
"""

from __future__ import annotations

from typing import Callable

from harness import Config, Peer, Rep, split_rows, time_in_process
from workloads import Workload


class FillPeer(Peer):
    name = "fill"

    def runs(self, w: Workload) -> bool:
        return w.inplace

    def run(self, w: Workload, cfg: Config, progress: Callable[[str], None]) -> list[Rep]:
        template = w.template()
        dst = template.copy()   # preallocated and touched, as the "copy" producer's pool
        dst[:] = 0
        expected = w.expected()
        payload = w.payload_bytes(template)
        reps: list[Rep] = []

        def produce(seq: int, t: float) -> None:
            w.fill(dst, template)
            w.stamp(dst, seq, t)

        for rep in range(cfg.reps):
            reps.append(time_in_process(w, cfg, payload, produce))
            count = reps[-1].messages
            for part, exp in zip(split_rows(dst, w.consumers), expected):
                seq, _ = w.check(part, exp)
                if seq != count - 1:
                    raise AssertionError(f"fill: batch carries seq {seq}, expected {count - 1}")
            progress(f"rep {rep + 1}/{cfg.reps}: {reps[-1].messages} fills, {reps[-1].msgs_per_s:,.0f} fills/s, "
                     f"{reps[-1].gb_per_s:.2f} GB/s")
        return reps
