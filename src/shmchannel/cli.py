"""The ``shmchannel`` command (also ``python -m shmchannel``): start | stop | status of this
user's broker, or of the channels of a Ray cluster (``--ray ADDRESS``).

``status`` draws a table with rich when it is installed (``pip install 'shmchannel[cli]'``)
and plain text otherwise or with ``--plain``; ``--json`` is for scripts, and ``--watch``
redraws (or, with ``--json``, prints one JSON object per line) every ``--interval`` seconds
until Ctrl-C. rich is imported only where it is used, so the plain command needs nothing
but the package. This is the only module of shmchannel that prints.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from typing import Any, Callable, ContextManager, Sequence

from . import config
from . import status as figures_at
from .broker import daemon
from .errors import BrokerUnavailable, ChannelError, InvalidArgument

NO_BROKER = "no broker running"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} m {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} m"


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _rich_console(plain: bool) -> Any:
    """A rich Console for stdout, or None to print plain text: asked for, rich not
    installed, or an output encoding that cannot carry the table's characters."""
    if plain or not _rich_available():
        return None
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.encoding.lower().replace("-", "").startswith("utf") else None


def _progress(message: str) -> ContextManager[Any]:
    """A spinner with ``message`` while a long operation runs, if stdout is a terminal and rich is there."""
    if not sys.stdout.isatty() or not _rich_available():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console().status(message)


# -- commands: start, stop ---------------------------------------------------------------


def _start(args: argparse.Namespace) -> int:
    memory = config.parse_size(args.memory, name="--memory") if args.memory else None
    with open(config.runtime_dir() / "broker.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = daemon.status()
        if current is not None:
            print(f"broker already running (pid {current['pid']}, socket {config.socket_path()})")
            return 0
        with _progress("starting the broker"):
            pid = daemon.spawn(memory, args.idle_timeout)
    print(f"broker started (pid {pid}, socket {config.socket_path()})")
    return 0


def _stop(args: argparse.Namespace) -> int:
    if args.ray:
        if not args.channel or "/" not in args.channel:
            raise InvalidArgument(f"--ray needs --channel NAMESPACE/NAME, got {args.channel!r}")
        from .backends.ray import remove_channel

        namespace, name = args.channel.split("/", 1)
        with _progress(f"removing channel {args.channel}"):
            removed = remove_channel(args.ray, namespace, name)
        print(f"channel {args.channel} removed" if removed else f"no channel {args.channel} on {args.ray}")
        return 0 if removed else 1
    with _progress("waiting for the broker to exit"):
        pid = daemon.stop(timeout=args.timeout)
    print(NO_BROKER if pid is None else f"broker {pid} stopped")
    return 0


# -- what a channel row shows, for both renderers ----------------------------------------


def _amount(objects: int, nbytes: int | None) -> str:
    return str(objects) if nbytes is None else f"{objects} ({_size(nbytes)})"


def _rate(rates: dict[str, float] | None, kind: str) -> str:
    """``kind`` ("sent" or "received") objects and bytes per second, "-" if not reported."""
    if not rates:
        return "-"
    objects, nbytes = rates.get(f"{kind}_objects", 0.0), rates.get(f"{kind}_bytes")
    text = f"{objects:.1f}/s"
    return text if nbytes is None else f"{text} ({_size(nbytes)}/s)"


def _per_shard(values: Sequence[int], limit: int | None = None) -> str:
    """``1 0 3``; with ``limit``, at most that many values, then the number left out."""
    if limit is None or len(values) <= limit:
        return " ".join(map(str, values))
    return " ".join(map(str, values[:limit])) + f" +{len(values) - limit} shards"


def _channel_cells(c: dict[str, Any], shard_limit: int | None = None) -> dict[str, str]:
    """A channel's figures as display strings (an ``error`` entry has the error as its state)."""
    cells = {"namespace": c["namespace"], "name": c["dataset_name"]}
    if "error" in c:
        return {**cells, "state": c["error"][:80]}
    received_bytes = c.get("received_bytes")
    receivers = c.get("shard_receivers") if c["num_shards"] > 1 else None
    return {
        **cells,
        "shards": f"{c['num_shards']}{' full' if c['full_batch'] else ''}",
        "depths": _per_shard(c["depths"], shard_limit),
        "max": str(c["max_queue_size"]),
        "sent": _amount(c["sent_objects"], c.get("sent_bytes")),
        "received": _amount(sum(c["received_objects"]), None if received_bytes is None else sum(received_bytes)),
        "sent_rate": _rate(c.get("rates"), "sent"),
        "received_rate": _rate(c.get("rates"), "received"),
        "sender": "yes" if c["sender"] else "no",
        "receivers": _per_shard(receivers, shard_limit) if receivers else str(c["receivers"]),
        "state": "closed" if c["closed"] else "open",
    }


# -- plain text --------------------------------------------------------------------------


def format_status(status: dict[str, Any] | None) -> str:
    """Plain-text status: a header, then one row per channel (what ``status --plain`` prints)."""
    if status is None:
        return NO_BROKER
    if status.get("backend") == "ray":
        if "error" in status:
            return f"Ray cluster at {status['address']}: {status['error']}"
        if not status["channels"]:
            return f"no shmchannel channels on the Ray cluster at {status['address']}"
        return _channel_table(status["channels"])
    store = status["store"]
    lines = [
        f"broker pid {status['pid']}, up {status['uptime']:.0f} s, {status['clients']} clients, "
        f"socket {config.socket_path()}",
        f"store: {_size(store['used'])} used of {_size(store['capacity'])} "
        f"({_size(store['reserved'])} reserved in /dev/shm), {store['objects']} objects, "
        f"{_size(store['inline_bytes'])} inline",
    ]
    lines.append(_channel_table(status["channels"]) if status["channels"] else "no channels")
    return "\n".join(lines)


_PLAIN_COLUMNS = ("channel", "shards", "queued", "sent", "received", "sent/s", "received/s", "sender",
                  "receivers", "state")


def _channel_table(channels: list[dict[str, Any]]) -> str:
    rows: list[Sequence[str]] = [_PLAIN_COLUMNS]
    for c in channels:
        cells = _channel_cells(c)
        label = f"{cells['namespace']}/{cells['name']}"
        if "error" in c:
            rows.append((label, *["?"] * (len(_PLAIN_COLUMNS) - 2), cells["state"]))
            continue
        rows.append((label, cells["shards"], f"{cells['depths']} (max {cells['max']})", cells["sent"],
                     cells["received"], cells["sent_rate"], cells["received_rate"], cells["sender"],
                     cells["receivers"], cells["state"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(_PLAIN_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# -- rich --------------------------------------------------------------------------------


def render_rich(status: dict[str, Any] | None) -> Any:
    """The status as a rich renderable: a header (broker, store bar) and the channel table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if status is None:
        return Text(NO_BROKER, style="bold yellow")
    parts: list[Any] = []
    if status.get("backend") == "ray":
        if "error" in status:
            return Text(f"Ray cluster at {status['address']}: {status['error']}", style="bold red")
        parts.append(Text.assemble(("Ray cluster ", "bold"), status["address"],
                                   f" · {len(status['channels'])} channels"))
    else:
        store = status["store"]
        header = Table.grid(padding=(0, 1))
        header.add_row(Text("broker", style="bold"), Text(
            f"pid {status['pid']} · up {_duration(status['uptime'])} · {status['clients']} clients · "
            f"{config.socket_path()}"))
        share = store["used"] / store["capacity"] if store["capacity"] else 0.0
        header.add_row(Text("store", style="bold"), Text.assemble(
            *_bar(share),
            f" {_size(store['used'])} of {_size(store['capacity'])} ({share:.0%}) · {store['objects']} objects · "
            f"{_size(store['inline_bytes'])} inline · {_size(store['reserved'])} in /dev/shm"))
        parts.append(header)
    if not status["channels"]:
        parts.append(Text("no channels", style="dim"))
        return Group(*parts)
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    for column, justify in (("namespace", "left"), ("name", "left"), ("shards", "right"),
                            ("depth / max", "right"), ("sent", "right"), ("received", "right"),
                            ("sent/s", "right"), ("received/s", "right"), ("sender", "center"),
                            ("receivers", "right"), ("state", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for c in status["channels"]:
        cells = _channel_cells(c, shard_limit=8)
        if "error" in c:
            table.add_row(Text(cells["namespace"]), Text(cells["name"]), *[""] * 8,
                          Text(cells["state"], style="red"))
            continue
        full = any(d >= c["max_queue_size"] for d in c["depths"])
        state_style = "dim" if c["closed"] else "green"
        table.add_row(
            Text(cells["namespace"]), Text(cells["name"], style="bold"), cells["shards"],
            Text(f"{cells['depths']} / {cells['max']}", style="yellow" if full else ""),
            cells["sent"], cells["received"], cells["sent_rate"], cells["received_rate"], cells["sender"],
            cells["receivers"], Text(cells["state"], style=state_style),
        )
    parts.append(table)
    return Group(*parts)


def _bar(share: float, width: int = 24) -> tuple[tuple[str, str], tuple[str, str]]:
    """A usage bar as (text, style) pieces, drawn with characters so it shows without colours too."""
    filled = min(width, round(share * width))
    if share > 0 and not filled:
        filled = 1  # some use is never drawn as none
    style = "red" if share >= 0.9 else "yellow" if share >= 0.7 else "green"
    return ("█" * filled, style), ("░" * (width - filled), "dim")


# -- status ------------------------------------------------------------------------------


def _fetch(address: str | None, watching: bool) -> dict[str, Any] | None:
    """The figures at ``address``; while watching, a broker or cluster that is gone is
    reported (None, or a Ray error entry) instead of ending the watch."""
    try:
        return figures_at(address)
    except BrokerUnavailable as exc:
        if not watching:
            raise
        if address is None:
            return None  # it died while answering: as good as not running
        return {"backend": "ray", "address": address, "error": str(exc)}


def _status(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise InvalidArgument(f"--interval must be a positive number of seconds, got {args.interval}")
    address: str | None = args.ray
    if address is not None and not address.startswith("ray:"):
        from .backends.ray import ADDRESS_FORMS

        raise InvalidArgument(f"--ray must be a Ray address, {ADDRESS_FORMS}, got {address!r}")
    if not args.watch:
        status = _fetch(address, watching=False)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _show(status, plain=args.plain)
        return 0 if status is not None else 1
    try:
        _watch(lambda: _fetch(address, watching=True), args.interval, as_json=args.json, plain=args.plain)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends
    return 0


def _show(status: dict[str, Any] | None, plain: bool) -> None:
    console = _rich_console(plain)
    if console is None:
        print(format_status(status))
    else:
        console.print(render_rich(status))


def _ticks(interval: float) -> Callable[[], None]:
    """A wait for the next refresh, ``interval`` seconds after the previous one started."""
    due = time.monotonic()

    def wait() -> None:
        nonlocal due
        due = max(due + interval, time.monotonic())
        time.sleep(max(0.0, due - time.monotonic()))

    return wait


def _watch(fetch: Callable[[], dict[str, Any] | None], interval: float, as_json: bool, plain: bool) -> None:
    """Refresh until Ctrl-C (KeyboardInterrupt): JSON lines, a live rich view, or plain frames."""
    wait = _ticks(interval)
    if as_json:
        while True:
            print(json.dumps(fetch()), flush=True)
            wait()
    console = _rich_console(plain)
    if console is None:
        clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
        while True:
            print(f"{clear}{format_status(fetch())}\n", flush=True)
            wait()
    from rich.live import Live

    if not console.is_terminal:  # a file or pipe: one frame after the other, like top -b
        while True:
            console.print(render_rich(fetch()))
            console.print()
            sys.stdout.flush()
            wait()
    with Live(render_rich(fetch()), console=console, auto_refresh=False) as live:
        while True:
            wait()
            live.update(render_rich(fetch()), refresh=True)


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
    status = sub.add_parser("status", help="channels, shards, queue depths, counts, rates and store usage")
    status.add_argument("--json", action="store_true", help="print machine-readable JSON (with --watch: one line per refresh)")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="seconds between refreshes (default 1)")
    status.add_argument("--plain", action="store_true", help="plain text even when rich is installed")
    status.add_argument("--ray", metavar="ADDRESS", help="show the channels of the Ray cluster at ADDRESS instead")
    status.set_defaults(run=_status)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.run(args))
    except (ChannelError, BrokerUnavailable, OSError) as exc:
        if isinstance(exc, BrokenPipeError):  # the reader went away (| head): nothing to say to it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        print(f"shmchannel {args.command}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
