"""Status you can watch (issue 6, items 3 and 4): ``shmchannel status`` as JSON, rich and
plain text, ``--watch``, progress in a terminal, ``shmchannel.status()``, and the rates, on
the embedded broker (the Ray backend's: test_status_ray.py).
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import pty
import queue
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest

import shmchannel
from shmchannel import ChannelClosed, DataReceiver, DataSender, InvalidArgument, cli
from shmchannel.broker import daemon, protocol, rules, system
from shmchannel._native import Region
from shmchannel.broker.records import Channel
from shmchannel.queue import layout
from shmchannel.queue.ring import Queues
from shmchannel.broker.rates import WINDOW, Rates
from shmchannel.testing import join_ok, start_process, wait_until

from .conftest import ADDRESS

PART = 16_384  # float64 per shard and object: 128 KiB, so every part goes through the arena
PART_BYTES = PART * 8
HEADER_SLACK = 4096  # most bytes a blob adds to its array's data
MAX_QUEUE = 8
RATE_KEYS = {"sent_objects", "sent_bytes", "received_objects", "received_bytes"}


# -- children (module level: spawn imports them by name) ----------------------------------


def _stream(name: str, pause: Any, finish: Any) -> None:
    """Send 2-shard objects as fast as the slowest shard takes them until ``pause``; close at ``finish``."""
    with DataSender(ADDRESS, dataset_name=name, num_shards=2, max_queue_size=MAX_QUEUE) as sender:
        while not pause.is_set():
            sender.send(np.zeros((2, PART)), timeout=60)
        assert finish.wait(120), "the test never said finish"


def _receive(name: str, shard: int, delay: float, results: Any) -> None:
    """Receive ``shard`` until the end of stream, ``delay`` seconds per object; report the count."""
    count = 0
    with DataReceiver(ADDRESS, dataset_name=name, shard_id=shard, wait=60) as receiver:
        while True:
            try:
                part = receiver.recv(timeout=60)
            except ChannelClosed:
                break
            assert part.shape == (1, PART)
            del part
            count += 1
            time.sleep(delay)  # a slow consumer: the queue of this shard fills up
    results.put((shard, count))


# -- helpers ------------------------------------------------------------------------------


def _cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "shmchannel", *args]


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI; children inherit SHMCHANNEL_RUNTIME_DIR, so it finds this test's broker."""
    return subprocess.run(_cli_args(*args), env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def _channel(status: Any, name: str) -> dict[str, Any]:
    assert status is not None, "no broker runs"
    (channel,) = [c for c in status["channels"] if c["dataset_name"] == name]
    return channel


def _live(name: str) -> dict[str, Any] | None:
    status = shmchannel.status()
    found = [c for c in (status or {}).get("channels", []) if c["dataset_name"] == name]
    return found[0] if found else None


class _Lines:
    """The stdout lines of a child, read by a thread, taken with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        out = proc.stdout
        threading.Thread(target=lambda: [self._lines.put(line) for line in out], daemon=True).start()

    def json_until(self, predicate: Callable[[Any], bool], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.01, left))
            except queue.Empty:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; got {self.seen[-3:]}") from None
            self.seen.append(line)
            value = json.loads(line)
            if predicate(value):
                return value


def _interrupt(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Ctrl-C for a child: SIGINT, then its remaining output (killed if it does not end)."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the watch did not end within 30 s of SIGINT") from None


def _in_terminal(args: list[str], until: Callable[[str], bool], interrupt: bool, timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal (200 columns) as its stdout; once ``until(output)``,
    SIGINT it if ``interrupt``; its exit code and all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200"}
    proc = subprocess.Popen(_cli_args(*args), stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    output, signalled = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not signalled and interrupt and until(output.decode(errors="replace")):
                proc.send_signal(signal.SIGINT)
                signalled = True
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"{args} did not finish within {timeout} s: {output[-500:]!r}")
        return proc.wait(30), output.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)


# -- the live stream ----------------------------------------------------------------------


def test_status_json_reports_a_live_stream_and_its_rates(broker: int) -> None:
    """While a child streams to two receivers (shard 0 slow), `status --json` reports depths,
    counts, bytes and rates in line with what moved; once the stream stops, the rates fall
    to 0 within the rate window."""
    import multiprocessing

    name = f"live-{os.getpid()}"
    ctx = multiprocessing.get_context("spawn")
    pause, finish, results = ctx.Event(), ctx.Event(), ctx.Queue()
    children = [start_process(_receive, name, 0, 0.04, results), start_process(_receive, name, 1, 0.0, results),
                start_process(_stream, name, pause, finish)]
    try:
        wait_until(lambda: (_live(name) or {}).get("sent_objects", 0) >= 20, 60, "20 objects sent")
        before, t0 = _live(name), time.monotonic()
        result = _cli("status", "--json")
        wait_until(lambda: (_live(name) or {})["sent_objects"] >= before["sent_objects"] + 25, 60, "25 more sent")
        after, t1 = _live(name), time.monotonic()
        assert result.returncode == 0, result.stderr
        c = _channel(json.loads(result.stdout), name)

        assert (c["num_shards"], c["max_queue_size"], c["sender"], c["closed"]) == (2, MAX_QUEUE, True, False)
        assert c["receivers"] == 2 and c["shard_receivers"] == [1, 1]
        assert all(0 <= d <= MAX_QUEUE for d in c["depths"]), c["depths"]
        assert c["depths"][0] >= 2, f"the slow shard should hold the backlog: {c['depths']}"
        sent = c["sent_objects"]
        for shard in (0, 1):  # not yet received = queued, which the depth counts (with prefetched ones)
            assert 0 <= sent - c["received_objects"][shard] <= c["depths"][shard], c
            received = c["received_objects"][shard]
            assert received * PART_BYTES <= c["received_bytes"][shard] <= received * (PART_BYTES + HEADER_SLACK)
        assert 2 * sent * PART_BYTES <= c["sent_bytes"] <= 2 * sent * (PART_BYTES + HEADER_SLACK)

        rates, moved = c["rates"], (after["sent_objects"] - before["sent_objects"]) / (t1 - t0)
        assert set(rates) == RATE_KEYS and c["rate_window"] == WINDOW
        assert moved / 4 <= rates["sent_objects"] <= moved * 4, f"sent {rates['sent_objects']:.1f}/s, measured {moved:.1f}/s"
        assert rates["received_objects"] > 0
        assert 2 * PART_BYTES <= rates["sent_bytes"] / rates["sent_objects"] <= 2 * (PART_BYTES + HEADER_SLACK)
        assert PART_BYTES <= rates["received_bytes"] / rates["received_objects"] <= PART_BYTES + HEADER_SLACK

        pause.set()
        drained = wait_until(lambda: (lambda c: c if c["received_objects"] == [c["sent_objects"]] * 2 else None)(
            _live(name)), 60, "both shards to be drained")
        stopped = time.monotonic()
        wait_until(lambda: not any(_live(name)["rates"].values()), WINDOW + 10, "the rates to fall to 0")
        assert time.monotonic() - stopped <= WINDOW + 2, "rates stayed above 0 longer than the window"
        final = _cli("status", "--json")
        c = _channel(json.loads(final.stdout), name)
        assert c["rates"] == dict.fromkeys(RATE_KEYS, 0.0)
        assert c["depths"] == [0, 0] and c["sent_objects"] == drained["sent_objects"]
        finish.set()
        counts = dict(results.get(timeout=60) for _ in range(2))
        assert counts == {0: drained["sent_objects"], 1: drained["sent_objects"]}
    finally:
        pause.set()
        finish.set()
        for child in children:
            join_ok(child, 60)


# -- --watch -------------------------------------------------------------------------------


def test_watch_json_prints_one_object_per_refresh_and_ends_on_sigint(broker: int) -> None:
    """`status --watch --json` prints a JSON object per line per refresh; SIGINT ends it with exit 0."""
    name = f"watch-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name, max_queue_size=5) as sender:
        sender.send([1])
        sender.send([2])
        sender.get_queue()  # a round trip: the broker has handled the (posted) sends
        proc = subprocess.Popen(_cli_args("status", "--watch", "--json", "--interval", "0.2"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
        try:
            lines = _Lines(proc)
            for _ in range(3):
                lines.json_until(lambda s: s is not None, 30, "a refresh")
        finally:
            out, err = _interrupt(proc)
    assert proc.returncode == 0, err
    assert err == ""
    refreshes = [json.loads(line) for line in lines.seen + out.splitlines()]
    assert len(refreshes) >= 3
    for status in refreshes:
        assert status["pid"] == broker and status["backend"] == "embedded"
        assert _channel(status, name)["depths"] == [2]


def test_watch_goes_on_while_the_broker_goes_away_and_comes_back(broker: int) -> None:
    """A watch reports no broker (null) while none runs and the new broker once it is back."""
    proc = subprocess.Popen(_cli_args("status", "--watch", "--json", "--interval", "0.1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        lines = _Lines(proc)
        lines.json_until(lambda s: s is not None and s["pid"] == broker, 30, "the first broker")
        assert daemon.stop() == broker
        lines.json_until(lambda s: s is None, 30, "no broker (null)")
        conn = daemon.ensure_running()
        new = int(conn.info["pid"])
        conn.close()
        lines.json_until(lambda s: s is not None and s["pid"] == new, 30, f"the new broker {new}")
    finally:
        out, err = _interrupt(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_watch_in_a_terminal_draws_the_table_and_ends_on_ctrl_c(broker: int) -> None:
    """In a terminal, `status --watch` draws the rich table live; Ctrl-C ends it with exit 0, no traceback."""
    name = f"term-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name) as sender:
        sender.send([1])
        code, output = _in_terminal(["status", "--watch", "--interval", "0.2"], lambda out: name in out,
                                    interrupt=True)
    assert code == 0, output
    assert name in output and f"pid {broker}" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output


def test_interval_must_be_positive(broker: int) -> None:
    """`--interval 0` is refused with a message naming the option."""
    result = _cli("status", "--watch", "--interval", "0")
    assert result.returncode == 1
    assert result.stderr == "shmchannel status: --interval must be a positive number of seconds, got 0.0\n"


def test_cluster_option_refuses_an_address_of_another_kind() -> None:
    """`status --ray 10.0.0.1` is refused, naming the address forms the option takes."""
    result = _cli("status", "--ray", "10.0.0.1")
    assert result.returncode == 1
    assert result.stderr == ("shmchannel status: --ray must be a Ray address, 'ray://host:port', 'ray:auto' or "
                             "'ray:local', got '10.0.0.1'\n")


# -- renderers ------------------------------------------------------------------------------


def _two_shard_channel(name: str) -> DataSender:
    """A 2-shard channel (max 5) with 3 objects queued on each shard."""
    sender = DataSender(ADDRESS, dataset_name=name, num_shards=2, max_queue_size=5)
    for i in range(3):
        sender.send(np.arange(2 * i, 2 * i + 2))
    sender.get_queue()  # a round trip: the broker has handled the (posted) sends
    return sender


def test_rich_table_shows_the_channel_row(broker: int) -> None:
    """`shmchannel status` with rich draws a header with the broker and a row per channel."""
    name = f"rich-{os.getpid()}"
    with _two_shard_channel(name):
        result = _cli("status", COLUMNS="200")
    assert result.returncode == 0, result.stderr
    assert f"pid {broker}" in result.stdout and "store" in result.stdout
    (row,) = [line for line in result.stdout.splitlines() if name in line]
    cells = [cell.strip() for cell in row.split("│")]
    assert cells[:4] == ["default", name, "2", "3 3 / 5"], row
    assert cells[4].startswith("3 (") and cells[6].endswith("/s)"), row
    assert cells[-3:] == ["yes", "0 0", "open"], row


def test_plain_renderer_shows_the_channel_row(broker: int) -> None:
    """The plain renderer prints the header and a row per channel, columns two spaces apart."""
    name = f"plain-{os.getpid()}"
    with _two_shard_channel(name):
        text = cli.format_status(shmchannel.status())
    lines = text.splitlines()
    assert lines[0].startswith(f"broker pid {broker}, up ") and lines[1].startswith("store: ")
    rows = [line.split("  ") for line in lines[2:]]
    header = [cell.strip() for cell in rows[0] if cell.strip()]
    assert header == list(cli._PLAIN_COLUMNS)
    (row,) = [[cell.strip() for cell in r if cell.strip()] for r in rows if r[0] == f"default/{name}"]
    cells = dict(zip(header, row))
    assert (cells["shards"], cells["queued"], cells["sender"], cells["receivers"], cells["state"]) == \
        ("2", "3 3 (max 5)", "yes", "0 0", "open")
    assert cells["sent"].startswith("3 (") and cells["sent/s"].endswith("/s)")
    assert cli.format_status(None) == "no broker running"


def test_without_rich_status_prints_the_plain_table(broker: int) -> None:
    """With rich not importable, `status` falls back to the plain table."""
    name = f"norich-{os.getpid()}"
    code = "import sys; sys.modules['rich'] = None\nfrom shmchannel.cli import main\nmain(['status'])\n"
    with _two_shard_channel(name):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"broker pid {broker}, up ")
    assert any(line.startswith(f"default/{name}  ") and "3 3 (max 5)" in line for line in result.stdout.splitlines())


def test_status_without_broker_says_so_and_starts_none() -> None:
    """With no broker, `status` says so and exits 1, `--json` prints null; neither starts one."""
    plain, as_json = _cli("status"), _cli("status", "--json")
    assert (plain.returncode, plain.stdout) == (1, "no broker running\n")
    assert (as_json.returncode, as_json.stdout) == (1, "null\n")
    assert shmchannel.status() is None and daemon.status() is None


# -- progress and the module entry point --------------------------------------------------


def test_stop_in_a_terminal_shows_progress_then_the_result(broker: int) -> None:
    """In a terminal, `stop` runs a rich status spinner (it hides the cursor) and then says what it stopped."""
    code, output = _in_terminal(["stop"], lambda out: False, interrupt=False)
    assert code == 0, output
    assert "\x1b[?25l" in output, f"no spinner was drawn: {output!r}"
    assert output.rstrip().endswith(f"broker {broker} stopped")
    assert not daemon.pid_alive(broker)


def test_python_m_shmchannel_is_the_cli() -> None:
    """`python -m shmchannel --help` is the CLI's help, naming its commands."""
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: shmchannel ") and "{start,stop,status}" in result.stdout


# -- shmchannel.status() ----------------------------------------------------------------------


def test_python_status_reports_the_documented_fields(broker: int) -> None:
    """`shmchannel.status()` (and with this machine's address) returns the documented figures."""
    name = f"py-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name, num_shards=2) as sender, \
            DataReceiver(ADDRESS, dataset_name=name, shard_id=1) as receiver:
        for i in range(4):
            sender.send(np.arange(2 * i, 2 * i + 2))
        sender.get_queue()  # a round trip: all 4 are queued before the recv fetches
        np.testing.assert_array_equal(receiver.recv(timeout=10), [1])
        status: Any = shmchannel.status()
        assert shmchannel.status(ADDRESS)["pid"] == broker
    assert status["backend"] == "embedded" and status["pid"] == broker and status["clients"] >= 2
    assert {"capacity", "used", "free", "reserved", "objects", "inline_bytes"} <= set(status["store"])
    c = _channel(status, name)
    # The recv claimed one object of shard 1 (claims are one at a time: no round trip to save).
    assert (c["depths"], c["sent_objects"], c["received_objects"]) == ([4, 3], 4, [0, 1])
    assert c["shard_receivers"] == [0, 1] and c["receivers"] == 1
    assert set(c["rates"]) == RATE_KEYS and c["rates"]["sent_objects"] > 0 and c["rates"]["received_objects"] > 0


def test_python_status_refuses_an_address_of_another_machine(broker: int) -> None:
    """An address that is not this machine's is refused, naming the backend that serves it."""
    with pytest.raises(InvalidArgument, match=r"^address '192\.0\.2\.1' is not an IPv4 address of this machine; "):
        shmchannel.status("192.0.2.1")


def test_python_status_lists_3000_channels_over_several_pages(broker: int) -> None:
    """3,000 channels (made by a raw client in one write) come back from
    `shmchannel.status()` each once, in name order, though one reply holds at most
    STATUS_PAGE_CHANNELS of them (issue 13: one reply for all of them outgrew the frame)."""
    from .test_hostile import _frame, _raw, _reply

    names = [f"many-{i:04d}" for i in range(3000)]
    with _raw(30) as sock:
        sock.sendall(b"".join(_frame({"op": "create", "namespace": "pages", "dataset_name": n,
                                      "num_shards": 1, "max_queue_size": 1}) for n in names))
        assert all(_reply(sock)["ok"] for _ in names)
        sock.sendall(_frame({"op": "status"}))
        first = _reply(sock)
        assert len(first["channels"]) == system.STATUS_PAGE_CHANNELS
        assert first["next"] == ["pages", names[system.STATUS_PAGE_CHANNELS - 1]]
        status: Any = shmchannel.status()
    assert [c["dataset_name"] for c in status["channels"]] == names
    assert "next" not in status


def test_worst_status_page_fits_a_reply() -> None:
    """The largest page a status reply can carry -- STATUS_PAGE_CHANNELS channels named with
    MAX_NAME astral characters (12 bytes of JSON each), STATUS_PAGE_SHARDS shards among
    them, every counter at 2**63 -- encodes within protocol.MAX_REPLY_JSON."""
    name = "\U0001F600" * rules.MAX_NAME
    shards = system.STATUS_PAGE_SHARDS // system.STATUS_PAGE_CHANNELS
    # One set of queues in shared memory, every counter in it at 2**63, behind every channel.
    plan = layout.plan(shards, 1, False)
    memory = mmap.mmap(-1, plan.size)
    view, region = memoryview(memory), Region(memory)
    layout.write_header(view, 0, plan)
    region.store(layout.H_TAIL, 2**63)
    region.store(layout.H_SENT_BYTES, 2**63)
    for shard in range(shards):
        region.store(plan.shard(shard) + layout.S_RET_HEAD, 2**63)
        region.store(plan.shard(shard) + layout.S_RECV_BYTES, 2**63)
    queues = Queues(region, view, 0)
    channels = {}
    for i in range(system.STATUS_PAGE_CHANNELS + 1):
        channel = Channel(name, f"{i:04d}" + name[4:], shards, False, 2**63, queues, 0, sender=1)
        channel.receivers = {2**63 - n: n for n in range(shards)}
        channels[(channel.namespace, channel.name)] = channel
    page, following = system.status_page(channels, None)
    assert len(page) == system.STATUS_PAGE_CHANNELS and following is not None
    body = sum(map(len, protocol.encode(protocol.ok(channels=page, next=list(following)),
                                        max_json=protocol.MAX_REPLY_JSON)))
    assert body < protocol.MAX_REPLY_JSON // 2


# -- rates -----------------------------------------------------------------------------------


def test_rates_average_the_window_and_fall_to_zero_after_it() -> None:
    """Rates average what was added over the last WINDOW seconds (or the channel's age) and are 0 after."""
    now = [100.0]
    rates = Rates(("objects", "bytes"), clock=lambda: now[0])
    for _ in range(10):  # 10 objects of 100 bytes a second, for 10 s
        for _ in range(10):
            rates.add(1, 100)
        now[0] += 1.0
    assert rates.per_second() == pytest.approx({"objects": 10.0, "bytes": 1000.0})
    now[0] += WINDOW
    assert rates.per_second() == {"objects": 0.0, "bytes": 0.0}
    rates.add(-3, -300)  # taken back (requeued) in a quiet window: a rate is never negative
    assert rates.per_second() == {"objects": 0.0, "bytes": 0.0}
    young = Rates(("objects",), clock=lambda: now[0])
    young.add(5)
    now[0] += 0.5
    assert young.per_second() == pytest.approx({"objects": 10.0})
