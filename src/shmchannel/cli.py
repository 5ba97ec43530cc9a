"""The ``shmchannel`` command: start | stop | status of this user's broker."""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
from typing import Any, Sequence

from . import config
from .broker import daemon
from .errors import BrokerUnavailable, ChannelError, InvalidArgument


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _start(args: argparse.Namespace) -> int:
    memory = config.parse_size(args.memory, name="--memory") if args.memory else None
    with open(config.runtime_dir() / "broker.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = daemon.status()
        if current is not None:
            print(f"broker already running (pid {current['pid']}, socket {config.socket_path()})")
            return 0
        pid = daemon.spawn(memory, args.idle_timeout)
    print(f"broker started (pid {pid}, socket {config.socket_path()})")
    return 0


def _stop(args: argparse.Namespace) -> int:
    if args.ray:
        if not args.channel or "/" not in args.channel:
            raise InvalidArgument(f"--ray needs --channel NAMESPACE/NAME, got {args.channel!r}")
        from .backends.ray import remove_channel

        namespace, name = args.channel.split("/", 1)
        removed = remove_channel(args.ray, namespace, name)
        print(f"channel {args.channel} removed" if removed else f"no channel {args.channel} on {args.ray}")
        return 0 if removed else 1
    pid = daemon.stop(timeout=args.timeout)
    print("no broker running" if pid is None else f"broker {pid} stopped")
    return 0


def format_status(status: dict[str, Any]) -> str:
    store = status["store"]
    lines = [
        f"broker pid {status['pid']}, up {status['uptime']:.0f} s, {status['clients']} clients, "
        f"socket {config.socket_path()}",
        f"store: {_size(store['used'])} used of {_size(store['capacity'])} "
        f"({_size(store['reserved'])} reserved in /dev/shm), {store['objects']} objects, "
        f"{_size(store['inline_bytes'])} inline",
    ]
    channels = status["channels"]
    if not channels:
        lines.append("no channels")
        return "\n".join(lines)
    lines.append(_channel_table(channels))
    return "\n".join(lines)


def _channel_table(channels: list[dict[str, Any]]) -> str:
    """One row per channel; byte counts where the backend reports them (embedded)."""

    def amount(objects: int, nbytes: int | None) -> str:
        return str(objects) if nbytes is None else f"{objects} ({_size(nbytes)})"

    rows = [("channel", "shards", "queued", "sent", "received", "sender", "receivers", "state")]
    for c in channels:
        label = f"{c['namespace']}/{c['dataset_name']}"
        if "error" in c:
            rows.append((label, "?", "?", "?", "?", "?", "?", c["error"][:60]))
            continue
        received = c.get("received_bytes")
        rows.append(
            (
                label,
                f"{c['num_shards']}{' full' if c['full_batch'] else ''}",
                " ".join(str(d) for d in c["depths"]) + f" (max {c['max_queue_size']})",
                amount(c["sent_objects"], c.get("sent_bytes")),
                amount(sum(c["received_objects"]), None if received is None else sum(received)),
                "yes" if c["sender"] else "no",
                str(c["receivers"]),
                "closed" if c["closed"] else "open",
            )
        )
    return _table(rows)


def format_ray_channels(address: str, channels: list[dict[str, Any]]) -> str:
    if not channels:
        return f"no shmchannel channels on the Ray cluster at {address}"
    return _channel_table(channels)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _status(args: argparse.Namespace) -> int:
    if args.ray:
        from .backends.ray import list_channels

        channels = list_channels(args.ray)
        print(json.dumps(channels, indent=2) if args.json else format_ray_channels(args.ray, channels))
        return 0
    status = daemon.status()
    if args.json:
        print(json.dumps(status, indent=2))
    elif status is None:
        print("no broker running")
    else:
        print(format_status(status))
    return 0 if status is not None else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shmchannel", description="Manage this user's shmchannel broker.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start the broker if none runs")
    start.add_argument("--memory", help="store capacity, e.g. 512M or 4G (default: SHMCHANNEL_MEMORY or 2G)")
    start.add_argument("--idle-timeout", type=float, default=None, help="seconds idle before the broker exits")
    start.set_defaults(run=_start)
    stop = sub.add_parser("stop", help="stop the broker and remove its shared memory")
    stop.add_argument("--timeout", type=float, default=10.0, help="seconds to wait before killing it")
    stop.add_argument("--ray", metavar="ADDRESS", help="remove a channel of the Ray cluster at ADDRESS instead")
    stop.add_argument("--channel", metavar="NAMESPACE/NAME", help="with --ray: the channel to remove")
    stop.set_defaults(run=_stop)
    status = sub.add_parser("status", help="channels, shards, queue depths and store usage")
    status.add_argument("--json", action="store_true", help="print machine-readable JSON")
    status.add_argument("--ray", metavar="ADDRESS", help="list the channels of the Ray cluster at ADDRESS instead")
    status.set_defaults(run=_status)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.run(args))
    except (ChannelError, BrokerUnavailable, OSError) as exc:
        print(f"shmchannel {args.command}: {exc}", file=sys.stderr)
        sys.exit(1)
