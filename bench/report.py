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
    """(shmchannel/peer, peer/memcpy): throughput ratios, or for "wake" the p50 latency ratio."""
    ref = by_key.get((s.workload, REFERENCE))
    lim = by_key.get((s.workload, LIMIT))
    if WORKLOADS[s.workload].latency_only:
        return (s.p50 / ref.p50 if ref else float("nan")), float("nan")
    vs_peer = ref.gb_per_s / s.gb_per_s if ref else float("nan")
    vs_limit = s.gb_per_s / lim.gb_per_s if lim else float("nan")
    return vs_peer, vs_limit


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
    table = [HEADER] + rows(summaries)
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = []
    for k, r in enumerate(table):
        lines.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(summaries: list[Summary]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADER) - 2)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(summaries)]
    return "\n".join(lines)


LEGEND = (
    "msgs/s and GB/s: objects (and their payload bytes) per second, timed on the receiving side from "
    "the start barrier to the last message checked; medians over the repetitions. p50/p99: receive time "
    "minus the send time carried in the message (under load for the throughput workloads, since queues "
    "hold up to 10 messages; an idle receiver for `wake`). shm/peer: shmchannel (embedded) throughput "
    "divided by the peer's (> 1: shmchannel is faster); for `wake` the peer's p50 latency divided by "
    "shmchannel's (> 1: shmchannel wakes faster). peer/memcpy: the peer's throughput as a fraction of "
    "one in-process memcpy of the same bytes. msgs x reps: messages per repetition (a slow peer stops "
    "sending after the time cap) x repetitions."
)


def _versions() -> str:
    names = ["shmchannel", "numpy", "pandas", "pyarrow", "ray", "pyzmq", "matplotlib"]
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


def write_markdown(path: Path, summaries: list[Summary], info: dict[str, Any], chart: str | None,
                   memory: dict[str, Any] | None = None) -> None:
    """Write RESULTS.md; with ``memory`` (a result or ``{"error": ...}``) also its "## Memory" section."""
    lines = ["# shmchannel benchmark results", "",
             f"Generated by `{info['command']}` on {info['date']} in {info['duration']:.0f} s "
             f"({'quick: 1 repetition, fewer messages' if info['quick'] else 'full run'}).", "",
             "## Machine", "", *machine(), "", "## Workloads", ""]
    for name in dict.fromkeys(s.workload for s in summaries):
        lines.append(f"- `{name}`: {WORKLOADS[name].description}")
    lines += ["", "Peers: `shmchannel` (embedded broker, isolated, 2 GiB store), `shmchannel-ray` (Ray backend, "
              "`ray:auto`), `mp.Queue` (multiprocessing.Queue, pickle through a pipe), `shm-handoff` (a new "
              "multiprocessing.shared_memory block per message, its name over a multiprocessing.Queue), `zmq` "
              "(pyzmq PUSH/PULL over ipc://, pickle-5 out-of-band frames, copy=False), `ray` (ray.put + "
              "ray.util.queue.Queue), `memcpy` (NumPy copy into a preallocated buffer, one process). Every queue "
              "holds at most 10 messages; every receiver checks shape, a sample checksum and the sequence numbers.",
              "", "## Results", "", markdown_table(summaries), "", LEGEND, ""]
    if chart:
        lines += [f"![throughput by workload and peer]({chart})", ""]
    if memory is not None:
        lines += memory_section(memory)
    path.write_text("\n".join(lines))


SHORT = {"small": "1 KiB arrays", "medium": "1 MiB arrays", "large": "64 MiB arrays",
         "df": "DataFrame 100k x 10", "shard4": "16 MiB over 4 receivers"}


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
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [4, 1.3]})
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
    if wake:
        ax.bar(range(len(wake)), [s.p50 * 1e6 for s in wake], color=[colors[s.peer] for s in wake])
        ax.set_xticks(range(len(wake)), [s.peer for s in wake], rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel("p50 latency, us (log scale; lower is better)")
    ax.set_title("wake: idle receiver, one send")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
