"""The physical limit: one ``memcpy`` of the same bytes, in one process.

NumPy copies the object's payload (a uint8 buffer of the same size) into a preallocated,
already-touched buffer; no process boundary, no serialization. "Latency" is the time of
one copy. There is no wake-up to measure, so "wake" is skipped.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from harness import Config, Peer, Rep, time_in_process
from workloads import Workload


class MemcpyPeer(Peer):
    name = "memcpy"

    def runs(self, w: Workload) -> bool:
        return not (w.latency_only or w.inplace)   # the in-place workloads have "fill" (peers/fill.py)

    def run(self, w: Workload, cfg: Config, progress: Callable[[str], None]) -> list[Rep]:
        if w.latency_only:
            return []
        payload = w.payload_bytes(w.template())
        src = np.random.default_rng(0).integers(0, 255, payload, dtype=np.uint8)
        dst = np.ones(payload, np.uint8)
        np.copyto(dst, src)
        reps = []
        for rep in range(cfg.reps):
            reps.append(time_in_process(w, cfg, payload, lambda seq, t: np.copyto(dst, src)))
            if not np.array_equal(dst[::4099], src[::4099]):
                raise AssertionError("memcpy: copy differs")
            progress(f"rep {rep + 1}/{cfg.reps}: {reps[-1].gb_per_s:.2f} GB/s")
        return reps

