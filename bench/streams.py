"""shmchannel only: N channels streaming 1 KiB objects at once, and the broker's CPU meanwhile.

    python bench/streams.py [--channels 1 8] [--count 20000] [--reps 3]

Two of issue 14's targets:

- the broker is off the data path: its CPU time (utime + stime of its process, from
  /proc/<pid>/stat, in clock ticks) per object over a 20,000-object `small` stream through
  one channel is at most ``BROKER_US_TARGET`` us;
- scale: with 8 channels streaming at once (8 sender and 8 receiver processes, each pair its
  own dataset_name), the aggregate msgs/s is at least ``SCALE_TARGET`` x that of one channel.

Each configuration streams ``count`` objects in all (one channel: all of them; 8 channels:
count / 8 each), `small`'s 1 KiB float32 arrays, stamped and checked as bench/workloads.py
does, with max_queue_size=10, through an isolated broker. The processes are spawned once per
configuration and run every repetition:

    per repetition:  open endpoints -> barrier -> driver reads the broker's CPU -> barrier
                     -> stream, receivers check -> barrier -> driver reads the CPU again
                     -> barrier -> endpoints close

so the broker's CPU covers the stream (the senders' end-of-stream included), not the opening
and closing of the channels. msgs/s is timed on the receiving side as in bench/harness.py:
all objects / (last receiver's end - first receiver's start).
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import end_processes  # noqa: E402
from workloads import POOL, WORKLOADS  # noqa: E402

ADDRESS = "127.0.0.1"
MAX_IN_FLIGHT = 10
COUNT = 20_000            # objects per repetition, over all channels
CHANNELS = (1, 8)
STORE = "1G"
CAP = 60.0                # seconds: a safety stop for a sender (the target wants all 20,000)
BARRIER_TIMEOUT = 120.0
TIMEOUT = float(os.environ.get("BENCH_RECV_TIMEOUT", 60))  # seconds a send or recv may block
BROKER_US_TARGET = 2.0    # us of broker CPU per object, at most
SCALE_TARGET = 0.8        # 8 channels' aggregate msgs/s / one channel's, at least
SCALE_CHANNELS = 8
CLK_TCK = os.sysconf("SC_CLK_TCK")
W = WORKLOADS["small"]


# -- the broker's CPU ----------------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of process ``pid`` (all its threads), in clock ticks, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (state) on
    return int(fields[11]) + int(fields[12])        # fields 14 and 15: utime, stime


def sched_ns(pid: int) -> int:
    """The same, finer: nanoseconds on a CPU summed over the threads alive now
    (/proc/<pid>/task/*/schedstat); 0 if unreadable. Reported next to the ticks only."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


# -- children ------------------------------------------------------------------------------


def _dataset(channels: int, k: int, rep: int) -> str:
    return f"bench-streams-{channels}ch-{k}-{rep}"


def _producer(channels: int, k: int, count: int, reps: int, barrier: Any, out: Any) -> None:
    sent, rep = 0, 0
    try:
        from shmchannel import DataSender

        template = W.template()
        pool = [template.copy() for _ in range(POOL)]
        for rep in range(reps):
            tx = DataSender(ADDRESS, dataset_name=_dataset(channels, k, rep), max_queue_size=MAX_IN_FLIGHT)
            barrier.wait(BARRIER_TIMEOUT)   # every endpoint open
            barrier.wait(BARRIER_TIMEOUT)   # the driver has read the broker's CPU: go
            start, cpu = time.perf_counter(), time.process_time()
            sent = 0
            for seq in range(count):
                obj = pool[seq % POOL]
                W.stamp(obj, seq, time.perf_counter())
                tx.send(obj, timeout=TIMEOUT)
                sent += 1
                if time.perf_counter() - start > CAP:
                    break
            tx.close()                      # the end of the stream is part of it
            out.put((f"producer{k}", rep, (sent, time.process_time() - cpu), None))
            barrier.wait(BARRIER_TIMEOUT)   # every receiver has all
            barrier.wait(BARRIER_TIMEOUT)   # the driver has read the CPU again
        out.put((f"producer{k}", "done", os.getpid(), None))
    except BaseException:
        out.put((f"producer{k}", "error", os.getpid(), f"rep {rep}, after {sent} objects:\n{traceback.format_exc()}"))
        raise


def _consumer(channels: int, k: int, reps: int, barrier: Any, out: Any) -> None:
    got, rep = 0, 0
    try:
        from shmchannel import ChannelClosed, DataReceiver

        expected = W.expected()[0]
        for rep in range(reps):
            rx = DataReceiver(ADDRESS, dataset_name=_dataset(channels, k, rep), wait=60)
            barrier.wait(BARRIER_TIMEOUT)
            barrier.wait(BARRIER_TIMEOUT)
            start, cpu = time.perf_counter(), time.process_time()
            got, in_order = 0, True
            while True:
                try:
                    part = rx.recv(timeout=TIMEOUT)
                except ChannelClosed:
                    break
                seq, _ = W.check(part, expected)
                in_order &= seq == got
                got += 1
                del part
            end, cpu = time.perf_counter(), time.process_time() - cpu
            out.put((f"consumer{k}", rep, (start, end, got, in_order, cpu), None))
            barrier.wait(BARRIER_TIMEOUT)
            barrier.wait(BARRIER_TIMEOUT)
            rx.close()                      # after the driver's second reading
        out.put((f"consumer{k}", "done", os.getpid(), None))
    except BaseException:
        out.put((f"consumer{k}", "error", os.getpid(), f"rep {rep}, after {got} objects:\n{traceback.format_exc()}"))
        raise


# -- driver --------------------------------------------------------------------------------


class _Driver:
    """The driver's side of the barrier: it arrives only once every child waits there, and
    meanwhile reads the children's reports, so a child that failed (or died) ends the
    measurement at once with its traceback instead of leaving the others at the barrier."""

    def __init__(self, barrier: Any, out: Any, procs: list[Any]) -> None:
        self.barrier, self.out, self.procs = barrier, out, procs
        self.values: dict[tuple[str, int], Any] = {}

    def wait(self, what: str) -> None:
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while self.barrier.n_waiting < len(self.procs):
            self.poll(what, 0.02)
            if time.monotonic() > deadline:
                raise RuntimeError(f"streams: timed out at {what}")
        self.barrier.wait(BARRIER_TIMEOUT)

    def poll(self, what: str, timeout: float, dead_ok: bool = False) -> None:
        """Take one report (an error raises), waiting up to ``timeout`` s for it."""
        try:
            who, rep, value, error = self.out.get(timeout=timeout)
        except queue.Empty:
            dead = [p for p in self.procs if p.exitcode not in (None, 0)]
            if dead and not dead_ok:
                self.poll(what, 2.0, dead_ok=True)  # its traceback, if it sent one
                raise RuntimeError(f"streams: child {dead[0].pid} exited with {dead[0].exitcode} at {what}") from None
            return
        if rep == "error":
            raise RuntimeError(f"streams: {who} failed at {what}, {error}")
        if rep != "done":
            self.values[(who, rep)] = value


def run_config(broker_pid: int, channels: int, count: int, reps: int,
               progress: Any = print) -> list[dict[str, Any]]:
    """``channels`` sender/receiver pairs streaming ``count`` objects in all, ``reps`` times."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    per_channel = count // channels
    barrier, out = ctx.Barrier(2 * channels + 1), ctx.Queue()
    procs = [ctx.Process(target=_producer, args=(channels, k, per_channel, reps, barrier, out), daemon=True)
             for k in range(channels)]
    procs += [ctx.Process(target=_consumer, args=(channels, k, reps, barrier, out), daemon=True)
              for k in range(channels)]
    driver = _Driver(barrier, out, procs)
    results = []
    try:
        for p in procs:
            p.start()
        for rep in range(reps):
            driver.wait(f"rep {rep}: endpoints open")
            ticks0, ns0 = cpu_ticks(broker_pid), sched_ns(broker_pid)
            driver.wait(f"rep {rep}: start")
            driver.wait(f"rep {rep}: stream received")
            ticks1, ns1 = cpu_ticks(broker_pid), sched_ns(broker_pid)
            while any((f"{side}{k}", rep) not in driver.values for side in ("producer", "consumer")
                      for k in range(channels)):
                driver.poll(f"rep {rep}: reports", 0.1)
            values = {who: v for (who, r), v in driver.values.items() if r == rep}
            driver.wait(f"rep {rep}: readings taken")
            sent = sum(values[f"producer{k}"][0] for k in range(channels))
            endpoint_cpu = sum(values[f"producer{k}"][1] for k in range(channels))
            starts, ends = [], []
            for k in range(channels):
                start, end, got, in_order, cpu = values[f"consumer{k}"]
                endpoint_cpu += cpu
                if got != values[f"producer{k}"][0] or not in_order:
                    raise RuntimeError(f"streams: {channels} channels, rep {rep}: receiver {k} got {got} of "
                                       f"{values[f'producer{k}'][0]}{'' if in_order else ', out of order'}")
                starts.append(start)
                ends.append(end)
            elapsed = max(ends) - min(starts)
            cpu_s = (ticks1 - ticks0) / CLK_TCK
            results.append({"channels": channels, "messages": sent, "elapsed": elapsed,
                            "msgs_per_s": sent / elapsed, "broker_cpu_s": cpu_s,
                            "broker_us_per_obj": cpu_s / sent * 1e6,
                            "endpoint_us_per_obj": endpoint_cpu / sent * 1e6,
                            "broker_sched_us_per_obj": (ns1 - ns0) / 1e3 / sent if ns0 and ns1 else float("nan")})
            r = results[-1]
            progress(f"{channels} channel(s), rep {rep + 1}/{reps}: {sent:,} objects, {r['msgs_per_s']:,.0f} msgs/s, "
                     f"broker {ticks1 - ticks0} ticks = {r['broker_us_per_obj']:.2f} us/object "
                     f"(schedstat {r['broker_sched_us_per_obj']:.2f}), endpoints' CPU {r['endpoint_us_per_obj']:.1f} us/object")
        for p in procs:
            p.join(30)
        return results
    finally:
        end_processes(procs)
        out.close()


def measure(count: int = COUNT, reps: int = 3, channels: tuple[int, ...] = CHANNELS,
            progress: Any = print) -> dict[str, Any]:
    """Every configuration in ``channels`` through one isolated broker; medians and verdicts."""
    from shmchannel.testing import isolated_broker

    t0 = time.monotonic()
    configs: dict[int, list[dict[str, Any]]] = {}
    errors: dict[int, str] = {}  # a configuration that failed: the others are still reported
    with isolated_broker(memory=STORE) as broker_pid:
        for n in channels:
            try:
                configs[n] = run_config(broker_pid, n, count, reps, progress)
            except Exception as exc:
                errors[n] = str(exc)
                progress(f"{n} channel(s): FAILED: {exc}")
    med = statistics.median
    summary = {n: {"channels": n, "reps": len(rs), "messages": int(med(r["messages"] for r in rs)),
                   "msgs_per_s": med(r["msgs_per_s"] for r in rs),
                   "broker_us_per_obj": med(r["broker_us_per_obj"] for r in rs),
                   "endpoint_us_per_obj": med(r["endpoint_us_per_obj"] for r in rs),
                   "broker_sched_us_per_obj": med(r["broker_sched_us_per_obj"] for r in rs)}
               for n, rs in configs.items()}
    result: dict[str, Any] = {"count": count, "reps": reps, "seconds": time.monotonic() - t0,
                              "clk_tck": CLK_TCK, "configs": summary, "runs": configs, "errors": errors}
    if 1 in summary:
        result["broker_us_per_obj"] = summary[1]["broker_us_per_obj"]
        result["broker_ok"] = summary[1]["broker_us_per_obj"] <= BROKER_US_TARGET
    if 1 in summary and SCALE_CHANNELS in summary:
        result["scale_ratio"] = summary[SCALE_CHANNELS]["msgs_per_s"] / summary[1]["msgs_per_s"]
        result["scale_ok"] = result["scale_ratio"] >= SCALE_TARGET
        result["cpu_ratio"] = summary[SCALE_CHANNELS]["endpoint_us_per_obj"] / summary[1]["endpoint_us_per_obj"]
    return result


HEADER = ["channels", "msgs/s (all)", "msgs/s per channel", "broker us/object", "(schedstat)",
          "endpoints' CPU us/object", "objects x reps"]


def first_line(error: str) -> str:
    """An error's first line, plus the last line of the traceback it carries (the exception)."""
    lines = [line for line in error.splitlines() if line.strip()]
    if len(lines) <= 1:
        return error.strip()
    return f"{lines[0]} ... {lines[-1].strip()}"


def rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for n, s in result["configs"].items():
        out.append([str(n), f"{s['msgs_per_s']:,.0f}", f"{s['msgs_per_s'] / n:,.0f}",
                    f"{s['broker_us_per_obj']:.2f}", f"{s['broker_sched_us_per_obj']:.2f}",
                    f"{s['endpoint_us_per_obj']:.1f}", f"{s['messages']:,} x {s['reps']}"])
    for n, error in result.get("errors", {}).items():
        out.append([str(n), "FAILED", "", "", "", "", first_line(error)[:200]])
    return out


def summary(result: dict[str, Any]) -> list[str]:
    """One line per target of this measurement."""
    lines = []
    resolution = 1e6 / CLK_TCK / max(1, result["count"])
    if "broker_us_per_obj" in result:
        lines.append(f"broker CPU per object, 1 channel: {result['broker_us_per_obj']:.2f} us "
                     f"(target <= {BROKER_US_TARGET:g}: {'met' if result['broker_ok'] else 'MISSED'}; "
                     f"one clock tick = {resolution:.2f} us/object here)")
    if "scale_ratio" in result:
        lines.append(f"scale: {SCALE_CHANNELS} channels' aggregate msgs/s / one channel's = {result['scale_ratio']:.2f} "
                     f"(target >= {SCALE_TARGET:g}: {'met' if result['scale_ok'] else 'MISSED'}); the endpoints' "
                     f"CPU per object, {SCALE_CHANNELS} channels / one: {result['cpu_ratio']:.2f}")
    for n, error in result.get("errors", {}).items():
        lines.append(f"{n} channel(s): FAILED: {first_line(error)}")
    return lines


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=list(CHANNELS))
    parser.add_argument("--count", type=int, default=COUNT, help="objects per repetition, over all channels")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # so the isolated broker is stopped on kill too
    result = measure(args.count, args.reps, tuple(args.channels))
    table = [HEADER] + rows(result)
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    for r in table:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print(f"{result['seconds']:.0f} s")
    for line in summary(result):
        print(line)
    return 0 if result.get("broker_ok", True) and result.get("scale_ok", True) and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
