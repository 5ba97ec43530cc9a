"""Online learning over a shared-memory channel (``make example``).

Four processes, started here and cleaned up at the end:

    events     writes a click log as CSV chunks into a temporary directory, one every --interval s
    producer   reads each chunk as it lands, engineers features with pandas, sends batches
               through a 2-shard channel (first half of each batch to trainer 0, second to 1)
    trainer 0  trains a logistic-regression CTR model on shard 0 (shmchannel.torch.ChannelDataset)
    trainer 1  the same on shard 1

At the end it checks that every event written was trained on exactly once, by one of the
two trainers, and exits 1 if not. The local broker starts on first use; if this run
started it and nothing else uses it, it is stopped at the end.

Usage: python examples/online_learning/run.py [--chunks 40] [--rows-per-chunk 5000] [--interval 0.2]
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # events, producer, trainer, ...

import shmchannel  # noqa: E402
from schema import say  # noqa: E402

ADDRESS = "127.0.0.1"
NAMESPACE = "online-learning"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=40, help="CSV chunks the event stream writes (default 40)")
    parser.add_argument("--rows-per-chunk", type=int, default=5000, help="events per chunk (default 5000)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between chunks (default 0.2)")
    parser.add_argument("--batch-rows", type=int, default=2000, help="rows per batch sent, even (default 2000)")
    parser.add_argument("--lr", type=float, default=0.2, help="Adagrad learning rate (default 0.2)")
    parser.add_argument("--log-every", type=int, default=20, help="batches between progress lines (default 20)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    if args.chunks < 1 or args.rows_per_chunk < 1 or args.interval < 0 or args.log_every < 1:
        parser.error("--chunks, --rows-per-chunk and --log-every must be positive, --interval >= 0")
    if args.batch_rows < 2 or args.batch_rows % 2:
        parser.error(f"--batch-rows must be a positive even number (2 shards), got {args.batch_rows}")
    return args


def _child(module: str, function: str, conn: Connection, kwargs: dict[str, Any]) -> None:
    """Run ``module.function(**kwargs)`` in a child process and send back its result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for run.py, which stops us
    result = getattr(importlib.import_module(module), function)(**kwargs)
    conn.send(result)
    conn.close()


class Children:
    """The example's processes (spawned, so each imports only what it needs): started,
    awaited without polling, and killed if anything goes wrong."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[str, BaseProcess] = {}
        self.conns: dict[str, Connection] = {}

    def start(self, name: str, module: str, function: str, **kwargs: Any) -> None:
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(module, function, writer, kwargs), name=name)
        proc.start()
        writer.close()  # the child holds the other end: its exit makes ours readable (EOF)
        self.procs[name], self.conns[name] = proc, reader

    def results(self, timeout: float) -> dict[str, Any]:
        """Each child's return value; SystemExit naming the child that failed or hung."""
        results: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        waiting = dict(self.conns)
        while waiting:
            ready = wait(list(waiting.values()), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise SystemExit(f"run.py: still waiting for {', '.join(waiting)} after {timeout:.0f} s; stopped")
            for name, conn in list(waiting.items()):
                if conn in ready:
                    try:
                        results[name] = conn.recv()
                    except EOFError:
                        self.procs[name].join(5)
                        raise SystemExit(f"run.py: {name} failed (exit code {self.procs[name].exitcode})") from None
                    del waiting[name]
        for name, proc in self.procs.items():
            proc.join(10)
            if proc.exitcode != 0:
                raise SystemExit(f"run.py: {name} exited with {proc.exitcode}")
        return results

    def stop(self) -> None:
        """Kill whichever child is still running (after a failure) and reap them all."""
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
            proc.join(10)
        for conn in self.conns.values():
            conn.close()


def check(events: int, producer: dict[str, Any], trainers: list[dict[str, Any]]) -> bool:
    """Print whether each event written was trained on exactly once; True if so."""
    ids = np.concatenate([t["ids"] for t in trainers])
    times = np.bincount(ids, minlength=events) if len(ids) else np.zeros(events, np.int64)
    missing, repeated = int((times == 0).sum()), int((times > 1).sum())
    per_shard = ", ".join(f"shard {i}: {t['rows']:,}" for i, t in enumerate(trainers))
    if missing == producer["dropped"] and not repeated and len(times) == events:
        note = f" (+{missing} left over)" if missing else ""
        say(f"check: each of the {events - missing:,} events sent was trained on exactly once ({per_shard}){note}")
        return True
    say(f"check FAILED: {events:,} events, {missing:,} never trained, {repeated:,} more than once ({per_shard})")
    return False


def stop_broker_if_ours(was_running: bool, dataset: str) -> str:
    """Stop the broker if this run started it and no other channel is on it (ours may be
    left with objects queued if the run failed: they are of no use to anyone)."""
    if was_running:
        return "broker left running (it was running before)"
    status = shmchannel.status()
    if status is None:
        return "broker exited"
    channels = status.get("channels") or []
    if any((c["namespace"], c["dataset_name"]) != (NAMESPACE, dataset) for c in channels):
        return "broker left running (other channels use it)"
    shmchannel.stop_broker()
    return "broker stopped"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    was_running = shmchannel.status() is not None
    workdir = tempfile.mkdtemp(prefix="online-learning-")
    dataset = f"clicks-{os.getpid()}"
    say(
        f"online learning: {args.chunks} chunks x {args.rows_per_chunk:,} events, one every {args.interval} s,"
        f" into {workdir}"
        f"\n  -> producer -> channel {NAMESPACE}/{dataset} (2 shards) -> trainers 0 and 1"
    )
    children = Children()
    channel = {"address": ADDRESS, "namespace": NAMESPACE, "dataset_name": dataset}
    try:
        for shard in (0, 1):  # they wait for the producer to create the channel
            children.start(f"trainer {shard}", "trainer", "train", shard=shard, lr=args.lr, log_every=args.log_every,
                           **channel)
        children.start("producer", "producer", "produce", directory=workdir, batch_rows=args.batch_rows,
                       max_queue_size=8, **channel)
        children.start("events", "events", "generate", directory=workdir, chunks=args.chunks,
                       rows_per_chunk=args.rows_per_chunk, interval=args.interval, seed=args.seed)
        results = children.results(args.timeout)
    finally:
        children.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        broker = stop_broker_if_ours(was_running, dataset)
    ok = check(results["events"]["events"], results["producer"], [results["trainer 0"], results["trainer 1"]])
    say(f"finished in {time.monotonic() - began:.1f} s: all 4 processes exited, {broker}, temp dir removed")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # main's finally has stopped the children and cleaned up
        print("run.py: interrupted; stopped its processes and removed its temp dir", file=sys.stderr)
        sys.exit(130)
