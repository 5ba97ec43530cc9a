"""Summaries of the runs: the printed table, bench/RESULTS.md and the PNG chart."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from harness import Rep
from workloads import WORKLOADS

REFERENCE = "shmchannel"   # the numerator of the ratio column
LIMIT = "memcpy"
LOAN, FILL = "shmchannel-loan", "fill"   # the in-place workloads' reference and limit (issue 15)


def references(workload: str) -> tuple[str, str]:
    """The peers a workload's ratio columns divide by: (reference, limit)."""
    return (LOAN, FILL) if WORKLOADS[workload].inplace else (REFERENCE, LIMIT)


@dataclass
class Summary:
    workload: str
    peer: str
    reps: int
    messages: int          # per repetition (median)
    msgs_per_s: float      # medians over the repetitions
    gb_per_s: float
    p50: float             # seconds; median over repetitions of each repetition's percentile
    p99: float
    error: str | None = None


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else float("nan")


def summarize(workload: str, peer: str, reps: list[Rep] | None, error: str | None = None) -> Summary:
    if not reps:
        nan = float("nan")
        return Summary(workload, peer, 0, 0, nan, nan, nan, nan, error)
    med = statistics.median
    return Summary(workload, peer, len(reps), int(med(r.messages for r in reps)), med(r.msgs_per_s for r in reps),
                   med(r.gb_per_s for r in reps), med(_pct(r.latencies, 0.5) for r in reps),
                   med(_pct(r.latencies, 0.99) for r in reps), error)


def _ratios(s: Summary, by_key: dict[tuple[str, str], Summary]) -> tuple[float, float]:
    """(shmchannel/peer, peer/memcpy): throughput ratios, or for "wake" the p50 latency ratio.
    In-place workloads: (shmchannel-loan/peer, peer/fill)."""
    reference, limit = references(s.workload)
    ref = by_key.get((s.workload, reference))
    lim = by_key.get((s.workload, limit))
    if WORKLOADS[s.workload].latency_only:
        return (s.p50 / ref.p50 if ref else float("nan")), float("nan")
    vs_peer = ref.gb_per_s / s.gb_per_s if ref else float("nan")
    vs_limit = s.gb_per_s / lim.gb_per_s if lim else float("nan")
    return vs_peer, vs_limit


@dataclass
class Target:
    """One of issue 14's (or 15's) targets, judged from the medians of this run."""

    name: str
    measured: str          # the medians it is computed from
    value: float           # the ratio (or, for the broker, us per object); nan: not measured
    goal: str              # e.g. ">= 1.5"
    ok: bool | None        # None: not measured (peer or measurement missing, failed or skipped)


def targets(summaries: list[Summary], streams: dict[str, Any] | None,
            skipped: dict[str, str] | None = None) -> list[Target]:
    """Issue 14's and 15's targets, each from medians of this run (ratios of medians)."""
    by_key = {(s.workload, s.peer): s for s in summaries if not s.error and s.reps}
    skipped = skipped or {}
    out: list[Target] = []

    ran = {(s.workload, s.peer) for s in summaries}

    def missing(workload: str, *peers: str) -> str:
        why = []
        for p in peers:
            if p in skipped:
                why.append(f"{p} skipped")
            elif (workload, p) not in by_key:
                why.append(f"{workload}/{p} {'failed' if (workload, p) in ran else 'not run'}")
        return "not measured: " + ", ".join(why)

    def compare(name: str, workload: str, peer: str, what: str, goal: float, at_least: bool,
                reference: str = REFERENCE) -> None:
        ref, other = by_key.get((workload, reference)), by_key.get((workload, peer))
        sign = ">=" if at_least else "<="
        if ref is None or other is None:
            out.append(Target(name, missing(workload, reference, peer), float("nan"), f"{sign} {goal:g}", None))
            return
        if what == "msgs/s":
            a, b, shown = ref.msgs_per_s, other.msgs_per_s, f"{ref.msgs_per_s:,.0f} vs {other.msgs_per_s:,.0f} msgs/s"
        else:
            a, b = getattr(ref, what), getattr(other, what)
            shown = f"{a * 1e6:,.0f} vs {b * 1e6:,.0f} us"
        value = a / b
        out.append(Target(name, f"{reference} {shown} ({peer})", value, f"{sign} {goal:g}",
                          value >= goal if at_least else value <= goal))

    compare("small: msgs/s vs mp.Queue", "small", "mp.Queue", "msgs/s", 1.5, True)
    compare("small: msgs/s vs faster-fifo", "small", "faster-fifo", "msgs/s", 1.0, True)
    compare("small: unloaded p50 vs mp.Queue", "unloaded", "mp.Queue", "p50", 1.0, False)
    compare("wake: p50 vs mp.Queue", "wake", "mp.Queue", "p50", 1.0, False)
    compare("wake: p99 vs mp.Queue", "wake", "mp.Queue", "p99", 1.5, False)
    for w in ("medium", "df", "shard4"):
        compare(f"{w}: msgs/s vs zmq", w, "zmq", "msgs/s", 2.0, True)
    compare("large: msgs/s vs memcpy", "large", LIMIT, "msgs/s", 0.8, True)
    for w in ("large-inplace", "shard4-inplace"):  # issue 15: a loan's send against a copy's, and the fill alone
        compare(f"{w}: loan vs copy, msgs/s", w, REFERENCE, "msgs/s", 1.8, True, reference=LOAN)
        compare(f"{w}: loan vs fill, msgs/s", w, FILL, "msgs/s", 0.9, True, reference=LOAN)
    import streams as st  # here: report.py imports without it when there is no such section

    broker_name, scale_name = "broker CPU per object (1 channel)", f"scale: {st.SCALE_CHANNELS} channels vs 1"
    broker_goal, scale_goal = f"<= {st.BROKER_US_TARGET:g} us", f">= {st.SCALE_TARGET:g}"
    if streams is None or "error" in streams:
        why = "not measured" + (f": {streams['error']}" if streams else " (bench/streams.py did not run)")
        out.append(Target(broker_name, why, float("nan"), broker_goal, None))
        out.append(Target(scale_name, why, float("nan"), scale_goal, None))
        return out
    errors = streams.get("errors", {})

    def failed(*ns: int) -> str:
        return "not measured: " + ", ".join(f"{n} channel(s) failed: {st.first_line(errors[n])[:120]}"
                                             for n in ns if n in errors)

    one, many = streams["configs"].get(1), streams["configs"].get(st.SCALE_CHANNELS)
    if one:
        out.append(Target(broker_name, f"{one['messages']:,}-object small stream, utime+stime from /proc "
                          f"(schedstat: {one['broker_sched_us_per_obj']:.2f} us)",
                          streams["broker_us_per_obj"], broker_goal, streams["broker_ok"]))
    else:
        out.append(Target(broker_name, failed(1), float("nan"), broker_goal, None))
    if one and many:
        out.append(Target(scale_name, f"{many['msgs_per_s']:,.0f} vs {one['msgs_per_s']:,.0f} msgs/s (aggregate, 1 KiB)",
                          streams["scale_ratio"], scale_goal, streams["scale_ok"]))
    else:
        out.append(Target(scale_name, failed(1, st.SCALE_CHANNELS), float("nan"), scale_goal, None))
    return out


TARGET_HEADER = ["target", "measured (medians)", "value", "goal", "result"]


def target_rows(ts: list[Target]) -> list[list[str]]:
    return [[t.name, t.measured, _fmt(t.value, ".2f"), t.goal,
             "-" if t.ok is None else ("met" if t.ok else "MISSED")] for t in ts]


def _text(header: list[str], body: list[list[str]], left: int) -> str:
    table = [header] + body
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for k, r in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown(header: list[str], body: list[list[str]], left: int) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def targets_text(ts: list[Target]) -> str:
    return _text(TARGET_HEADER, target_rows(ts), 2)


def streams_text(streams: dict[str, Any]) -> str:
    import streams as st

    return _text(st.HEADER, st.rows(streams), 0)


TARGETS_NOTE = (
    "value: shmchannel's median divided by the peer's (throughput: > 1 is faster; latency: < 1 is lower), "
    "or the broker's CPU in us per object; for the -inplace rows (issue 15) shmchannel-loan's median (each batch "
    "filled in a `sender.empty` loan and sent without a copy) divided by shmchannel's (\"copy\": filled in the "
    "producer's own array, copied by the send) or by fill's (the fill alone, one process, no channel). All from "
    "this run's medians. `unloaded`: one message in flight "
    "(the next sent once the receiver checked the previous one), so no queueing; `small`'s own p50 is under "
    "load (queues full). The broker's CPU: utime+stime of the broker process (/proc/<pid>/stat, clock ticks) "
    "across a 20,000-object 1 KiB stream through one channel, endpoints opened before and closed after the "
    "readings; the schedstat figure (ns on CPU summed over its threads) is the same, finer. scale: 8 sender and "
    "8 receiver processes, each pair its own dataset_name, 20,000 objects in all, against one pair streaming "
    "20,000, same broker, same run (bench/streams.py)."
)


def _fmt(x: float, spec: str) -> str:
    return "-" if x != x else format(x, spec)


def _us(x: float) -> str:
    if x != x:
        return "-"
    return f"{x * 1e6:.0f}" if x < 0.1 else f"{x * 1e3:.0f}ms"


HEADER = ["workload", "peer", "msgs/s", "GB/s", "p50 us", "p99 us", "shm/peer", "peer/memcpy", "msgs x reps"]


def rows(summaries: list[Summary]) -> list[list[str]]:
    by_key = {(s.workload, s.peer): s for s in summaries}
    out = []
    for s in summaries:
        if s.error:
            out.append([s.workload, s.peer, "FAILED", "", "", "", "", "", s.error.splitlines()[0][:60]])
            continue
        vs_peer, vs_limit = _ratios(s, by_key)
        latency_only = WORKLOADS[s.workload].latency_only
        out.append([s.workload, s.peer, "-" if latency_only else _fmt(s.msgs_per_s, ",.0f"),
                    "-" if latency_only else _fmt(s.gb_per_s, ".3f"), _us(s.p50), _us(s.p99),
                    _fmt(vs_peer, ".2f"), _fmt(vs_limit, ".3f"), f"{s.messages} x {s.reps}"])
    return out


def text_table(summaries: list[Summary]) -> str:
    return _text(HEADER, rows(summaries), 2)


def markdown_table(summaries: list[Summary]) -> str:
    return _markdown(HEADER, rows(summaries), 2)


LEGEND = (
    "msgs/s and GB/s: objects (and their payload bytes) per second, timed on the receiving side from "
    "the start barrier to the last message checked; medians over the repetitions. p50/p99: receive time "
    "minus the send time carried in the message (under load for the throughput workloads, since queues "
    "hold up to 10 messages; an idle receiver for `wake`; one message in flight for `unloaded`). shm/peer: shmchannel (embedded) throughput "
    "divided by the peer's (> 1: shmchannel is faster); for `wake` and `unloaded` the peer's p50 latency "
    "divided by shmchannel's (> 1: shmchannel is quicker). peer/memcpy: the peer's throughput as a fraction of "
    "one in-process memcpy of the same bytes. For `large-inplace` and `shard4-inplace` the two ratio columns are "
    "shmchannel-loan's throughput divided by the peer's, and the peer's as a fraction of `fill` (fills per "
    "second of the same batch in one process, the cost of producing it). msgs x reps: messages per repetition (a slow peer stops "
    "sending after the time cap) x repetitions."
)


def _versions() -> str:
    names = ["shmchannel", "numpy", "pandas", "pyarrow", "ray", "pyzmq", "faster-fifo", "matplotlib"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            out.append(f"{n} (not installed)")
    return ", ".join(out)


def machine() -> list[str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
        shm = os.statvfs("/dev/shm")
        shm_gb = shm.f_blocks * shm.f_frsize / 1e9
    except OSError:
        mem, shm_gb = float("nan"), float("nan")
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores",
        f"- Memory: {mem:.1f} GiB; /dev/shm: {shm_gb:.1f} GB tmpfs",
        f"- OS: {platform.platform()}",
        f"- Python {sys.version.split()[0]}; {_versions()}",
    ]


def memory_section(memory: dict[str, Any]) -> list[str]:
    """RESULTS.md's "## Memory" lines: the samples and one line per target (see bench/memory.py).

    ``memory`` is ``memory.measure()``'s result, or ``{"error": text}`` if it failed.
    """
    import memory as mem  # here, so report.py imports without it when there is no section

    count = f"{memory['messages']:,}" if "messages" in memory else "N"
    lines = ["## Memory", "",
             f"Issue 4's target: over {count} messages the receiver's RSS and the store's usage stay flat, "
             "and /dev/shm use never exceeds what max_queue_size allows plus the arena. One producer sends float32 "
             f"arrays (every {mem.BIG_EVERY}th {mem.BIG >> 10} KiB, through the arena; the others {mem.SMALL >> 10} KiB, "
             f"inline) with max_queue_size={mem.MAX_QUEUE_SIZE} through an isolated broker ({mem.STORE} store); the "
             f"receiver samples every {mem.EVERY:,} messages. `python bench/memory.py` runs it alone.", ""]
    if "error" in memory:
        return lines + [f"FAILED: {memory['error']}", ""]
    lines += ["| " + " | ".join(mem.SAMPLE_HEADER) + " |", "|" + "|".join(["---:"] * len(mem.SAMPLE_HEADER)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in mem.sample_rows(memory)]
    lines += ["", *(f"- {line}" for line in mem.summary(memory)), ""]
    return lines


def streams_section(streams: dict[str, Any]) -> list[str]:
    """RESULTS.md's "## Streams" lines: bench/streams.py's table, or its failure."""
    import streams as st

    lines = ["## Streams: the broker's CPU and 8 channels at once (shmchannel only)", "",
             f"bench/streams.py: 1 KiB float32 arrays (`small`'s), max_queue_size={st.MAX_IN_FLIGHT}, through an "
             f"isolated broker; {streams.get('count', st.COUNT):,} objects per repetition in all (8 channels: "
             f"{streams.get('count', st.COUNT) // st.SCALE_CHANNELS:,} each), medians of {streams.get('reps', '?')} "
             "repetition(s). msgs/s timed on the receiving side (first receiver's start to last receiver's end). "
             "`python bench/streams.py` runs it alone.", ""]
    if "error" in streams:
        return lines + [f"FAILED: {streams['error']}", ""]
    lines += [_markdown(st.HEADER, st.rows(streams), 0), ""]
    lines += [f"- {line}" for line in st.summary(streams)]
    return lines + [""]


PEERS_TEXT = (
    "Peers: `shmchannel` (embedded broker, isolated, 2 GiB store), `shmchannel-ray` (Ray backend, "
    "`ray:auto`), `mp.Queue` (multiprocessing.Queue, pickle through a pipe), `faster-fifo` (faster_fifo.Queue: "
    "pickle into a shared-memory circular buffer under a process-shared mutex; single put/get, not "
    "put_many/get_many), `shm-handoff` (a new multiprocessing.shared_memory block per message, its name over a "
    "multiprocessing.Queue), `zmq` (pyzmq PUSH/PULL over ipc://, pickle-5 out-of-band frames, copy=False), `ray` "
    "(ray.put + ray.util.queue.Queue), `memcpy` (NumPy copy into a preallocated buffer, one process). Every "
    "queue holds at most 10 messages; every receiver checks shape, a sample checksum and the sequence numbers. "
    "The in-place workloads (issue 15) run three: `shmchannel` (\"copy\": each batch filled from a template into "
    "one of the producer's preallocated arrays, then sent, which copies it into shared memory), `shmchannel-loan` "
    "(\"loan\": each batch a new `sender.empty()` array, one broker round trip, filled the same way and sent "
    "without a copy) and `fill` (the same fill and stamp into a preallocated array, one process, no channel)."
)


def write_markdown(path: Path, summaries: list[Summary], info: dict[str, Any], chart: str | None,
                   memory: dict[str, Any] | None = None, target_list: list[Target] | None = None,
                   streams: dict[str, Any] | None = None, skipped: dict[str, str] | None = None) -> None:
    """Write RESULTS.md; with ``memory`` (a result or ``{"error": ...}``) also its "## Memory" section,
    with ``target_list`` a "## Targets" section, with ``streams`` bench/streams.py's section."""
    lines = ["# shmchannel benchmark results", "",
             f"Generated by `{info['command']}` on {info['date']} in {info['duration']:.0f} s "
             f"({'quick: 1 repetition, fewer messages' if info['quick'] else 'full run'}).", "",
             "## Machine", "", *machine(), "", "## Workloads", ""]
    for name in dict.fromkeys(s.workload for s in summaries):
        lines.append(f"- `{name}`: {WORKLOADS[name].description}")
    lines += ["", PEERS_TEXT, ""]
    for peer, why in (skipped or {}).items():
        lines += [f"Skipped: `{peer}`: {why}", ""]
    if target_list:
        lines += ["## Targets (issues 14 and 15)", "", _markdown(TARGET_HEADER, target_rows(target_list), 2), "",
                  TARGETS_NOTE, ""]
    lines += ["## Results", "", markdown_table(summaries), "", LEGEND, ""]
    if chart:
        lines += [f"![throughput by workload and peer]({chart})", ""]
    if streams is not None:
        lines += streams_section(streams)
    if memory is not None:
        lines += memory_section(memory)
    path.write_text("\n".join(lines))


SHORT = {"small": "1 KiB arrays", "medium": "1 MiB arrays", "large": "64 MiB arrays",
         "df": "DataFrame 100k x 10", "shard4": "16 MiB over 4 receivers",
         "large-inplace": "64 MiB, filled", "shard4-inplace": "64 MiB filled, 4 receivers"}


def write_chart(path: Path, summaries: list[Summary]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [s for s in summaries if not s.error and s.reps]
    peers = list(dict.fromkeys(s.peer for s in ok))
    tput = [w for w in dict.fromkeys(s.workload for s in ok) if not WORKLOADS[w].latency_only]
    wake = [s for s in ok if WORKLOADS[s.workload].latency_only]
    by_key = {(s.workload, s.peer): s for s in ok}
    colors = {p: plt.get_cmap("tab10")(i) for i, p in enumerate(peers)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [4, 2]})
    ax = axes[0]
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        xs = [k + (i - (len(peers) - 1) / 2) * width for k, w in enumerate(tput) if (w, peer) in by_key]
        ys = [by_key[(w, peer)].gb_per_s for w in tput if (w, peer) in by_key]
        ax.bar(xs, ys, width, label=peer, color=colors[peer])
    ax.set_yscale("log")
    ax.set_xticks(range(len(tput)), [f"{w}\n{SHORT.get(w, '')}" for w in tput], fontsize=9)
    ax.set_ylabel("throughput, GB/s (log scale; higher is better)")
    ax.set_title("Throughput by workload and peer (median)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax = axes[1]
    lat_workloads = list(dict.fromkeys(s.workload for s in wake))
    for i, peer in enumerate(peers):
        xs = [k + (i - (len(peers) - 1) / 2) * width for k, w in enumerate(lat_workloads) if (w, peer) in by_key]
        ys = [by_key[(w, peer)].p50 * 1e6 for w in lat_workloads if (w, peer) in by_key]
        if xs:
            ax.bar(xs, ys, width, color=colors[peer])
    if wake:
        ax.set_xticks(range(len(lat_workloads)), lat_workloads, fontsize=9)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("p50 latency, us (log scale; lower is better)")
    ax.set_title("wake: idle receiver; unloaded: one in flight", fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
