"""Benchmark shmchannel against the tools a user would otherwise pick (`make bench`).

    python bench/run.py [--quick] [--workloads small large ...] [--peers shmchannel zmq ...] [--reps N]

Moves the same data through every peer in one run on this machine, prints a table of
medians and ratios, and writes bench/RESULTS.md and bench/results.png. Peers, workloads
and the process scaffolding: bench/peers/, bench/workloads.py, bench/harness.py.

It uses its own shmchannel broker (isolated runtime directory) and its own local Ray
cluster, and removes both, plus anything left in /dev/shm by the hand-off peer, at the end,
also after an error or Ctrl-C.

With shmchannel among the peers it also runs bench/streams.py (the broker's CPU per object
over a 20,000-object stream, and 8 channels at once against one; --no-streams skips it) and
bench/memory.py (--no-memory skips it), and judges issue 14's and 15's targets from this
run's medians (the "Targets" table; report.targets).

Not every peer runs every workload (``Peer.runs``): `large-inplace` and `shard4-inplace`
(issue 15: each batch filled from a template, then sent) run `shmchannel` (its own array,
copied by the send), `shmchannel-loan` (a ``sender.empty`` loan, not copied) and `fill`
(the fill alone, no channel); the other workloads run the other peers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # spawned children inherit sys.path, so they find these modules too

import harness  # noqa: E402
import memory  # noqa: E402
import raycluster  # noqa: E402
import report  # noqa: E402
import streams  # noqa: E402
from peers import PEERS  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, fewer messages (about 2 minutes)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS), metavar="W",
                        help=f"among {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS), metavar="P",
                        help=f"among {', '.join(PEERS)} (default: all)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--cap", type=float, default=None,
                        help="seconds after which a producer stops sending (default 4; 1.5 with --quick)")
    parser.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md and results.png go")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory measurement (bench/memory.py; runs when shmchannel is among the peers)")
    parser.add_argument("--no-streams", action="store_true",
                        help="skip the broker-CPU and 8-channel measurement (bench/streams.py; runs when shmchannel "
                             "is among the peers)")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.cap = args.cap or (1.5 if args.quick else 4.0)
    return args


class Progress:
    """One line per step, prefixed with [done/total] and the elapsed time."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.current = ""

    def start(self, label: str) -> None:
        self.current = label
        self._print("...")

    def step(self, message: str) -> None:
        self._print(message)

    def finish(self) -> None:
        self.done += 1

    def _print(self, message: str) -> None:
        elapsed = time.monotonic() - self.t0
        print(f"[{self.done + 1:2d}/{self.total} {elapsed:5.0f}s] {self.current:<28} {message}", flush=True)


def run_memory(messages: int) -> dict[str, Any]:
    """bench/memory.py's measurement with a printed summary; ``{"error": ...}`` if it fails.

    A failure is reported, not raised: the peers' results are still worth writing.
    """
    print(f"\nmemory: {messages:,} messages through one channel (bench/memory.py) ...", flush=True)
    try:
        result: dict[str, Any] = memory.measure(messages)
    except Exception as exc:
        print(f"memory: FAILED: {exc!r}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}", "messages": messages}
    for line in memory.summary(result):
        print(f"memory: {line}", flush=True)
    return result


def run_streams(reps: int) -> dict[str, Any]:
    """bench/streams.py's measurement (1 and 8 channels); ``{"error": ...}`` if it fails."""
    print(f"\nstreams: {streams.COUNT:,} 1 KiB objects through 1 channel, then through "
          f"{streams.SCALE_CHANNELS} at once, {reps} repetition(s) (bench/streams.py) ...", flush=True)
    try:
        result: dict[str, Any] = streams.measure(streams.COUNT, reps, progress=lambda m: print(f"streams: {m}", flush=True))
    except Exception as exc:
        print(f"streams: FAILED: {exc}", flush=True)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "count": streams.COUNT, "reps": reps}
    for line in streams.summary(result):
        print(f"streams: {line}", flush=True)
    return result


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # so the finally below cleans up on kill too
    cfg = harness.Config(reps=args.reps, quick=args.quick, cap=args.cap)
    peers = [p for name, p in PEERS.items() if name in args.peers]  # registry order: Ray peers last
    workloads = [w for name, w in WORKLOADS.items() if name in args.workloads]
    progress = Progress(sum(p.runs(w) for p in peers for w in workloads))
    summaries: dict[tuple[str, str], report.Summary] = {}
    mem_result: dict[str, Any] | None = None
    streams_result: dict[str, Any] | None = None
    skipped: dict[str, str] = {}
    t0 = time.monotonic()
    print(f"shmchannel bench: {len(peers)} peers x {len(workloads)} workloads, {cfg.reps} repetition(s), "
          f"time cap {cfg.cap} s per repetition", flush=True)
    try:
        for peer in peers:
            mine = [w for w in workloads if peer.runs(w)]  # e.g. "fill": the in-place workloads only
            if not mine:
                continue  # no session either (the Ray cluster starts only for a Ray peer that runs)
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(peer.session())
                except harness.PeerUnavailable as exc:  # e.g. its package is missing: skip, not a failure
                    skipped[peer.name] = str(exc)
                    progress.done += len(mine)
                    print(f"{peer.name}: SKIPPED: {exc}", flush=True)
                    continue
                except Exception as exc:  # e.g. Ray will not start: report, go on with the others
                    for w in mine:
                        summaries[(w.name, peer.name)] = report.summarize(w.name, peer.name, None, f"session: {exc}")
                        progress.finish()
                    print(f"{peer.name}: could not start: {exc}", flush=True)
                    continue
                for w in mine:
                    progress.start(f"{peer.name} / {w.name}")
                    try:
                        reps = peer.run(w, cfg, progress.step)
                        summaries[(w.name, peer.name)] = report.summarize(w.name, peer.name, reps)
                    except Exception as exc:
                        progress.step(f"FAILED: {exc}")
                        summaries[(w.name, peer.name)] = report.summarize(w.name, peer.name, None, str(exc))
                    progress.finish()
            if peer.name == "shmchannel" and not args.no_streams:  # before the Ray cluster starts (last peers)
                streams_result = run_streams(cfg.reps)
        if "shmchannel" in args.peers and not args.no_memory:
            mem_result = run_memory(2_000 if args.quick else 10_000)
    finally:
        raycluster.shutdown()
        for path in glob.glob("/dev/shm/shb_*"):
            os.unlink(path)
    duration = time.monotonic() - t0
    ordered = [summaries[(w.name, p.name)] for w in workloads for p in peers if (w.name, p.name) in summaries]
    print()
    print(report.text_table(ordered))
    print()
    print(report.LEGEND)
    if streams_result is not None and "error" not in streams_result and streams_result["configs"]:
        print()
        print(report.streams_text(streams_result))
    target_list = report.targets(ordered, streams_result, skipped) if "shmchannel" in args.peers else []
    if target_list:
        print(f"\nTargets (issues 14 and 15), from this run's medians ({cfg.reps} repetition(s)):\n")
        print(report.targets_text(target_list))
        print()
        print(report.TARGETS_NOTE)
    for name, why in skipped.items():
        print(f"\nskipped: {name}: {why}")
    args.out.mkdir(parents=True, exist_ok=True)
    chart = args.out / "results.png"
    report.write_chart(chart, ordered)
    info = {"command": " ".join(["python bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "duration": duration, "quick": args.quick}
    report.write_markdown(args.out / "RESULTS.md", ordered, info, chart.name, mem_result, target_list,
                          streams_result, skipped)
    print(f"\n{duration:.0f} s; wrote {args.out / 'RESULTS.md'} and {chart}")
    failed = (any(s.error for s in ordered) or any(r is not None and "error" in r for r in (mem_result, streams_result))
              or bool(streams_result and streams_result.get("errors")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
