"""Find, start and stop the broker daemon; ``python -m shmchannel.broker.daemon`` runs one.

Start is race-free: a starter takes an exclusive ``flock`` on ``broker.lock`` in the runtime
directory, looks again whether a broker answers, and only then spawns one and waits for
its "ready" line on a pipe -- so two processes starting at once end with one broker. The
daemon double-forks (no zombie in the starter), recovers what dead brokers of its runtime
directory left queued (journal.py) and removes the rest of their /dev/shm entries (their
pid is in the name), creates its arena and journal, and exits after ``idle_timeout``
seconds without clients, channels or objects, removing everything.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import config
from ..errors import BrokerUnavailable
from ..store.arena import ArenaFile, ArenaMap
from ..store.table import ObjectTable
from . import recovery
from .client import Connection
from .journal import Journal, Recovered
from .journal import runtime_of as journal_runtime
from .server import Server
from .state import BrokerState

log = logging.getLogger("shmchannel.broker")

START_TIMEOUT = 20.0
#: Seconds the journal's records may wait to be written unless a reply confirming them
#: goes out first: the one write then covers every change made meanwhile.
JOURNAL_DELAY = 0.01


pid_alive = config.pid_alive


def connect(path: Path | None = None) -> Connection:
    """A connection to the running broker; BrokerUnavailable if none answers."""
    return Connection(path or config.socket_path())


def ensure_running(memory: int | None = None, idle_timeout: float | None = None) -> Connection:
    """A connection to this user's broker, starting one first if none runs."""
    path = config.socket_path()
    try:
        return Connection(path)
    except BrokerUnavailable:
        pass
    with open(config.runtime_dir() / "broker.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return Connection(path)  # another process won the race
        except BrokerUnavailable:
            pass
        spawn(memory, idle_timeout)
        return Connection(path)


def spawn(memory: int | None = None, idle_timeout: float | None = None) -> int:
    """Start a daemon (caller holds the start lock) and return its pid once it listens."""
    memory = memory or config.default_memory()
    idle = config.default_idle_timeout() if idle_timeout is None else idle_timeout
    rt = config.runtime_dir()
    env = dict(os.environ, SHMCHANNEL_RUNTIME_DIR=str(rt))
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    read_fd, write_fd = os.pipe()
    try:
        with open(rt / "broker.log", "ab") as logfile:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "shmchannel.broker.daemon", "--memory", str(memory),
                 "--idle-timeout", str(idle), "--ready-fd", str(write_fd)],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                start_new_session=True, env=env, close_fds=True,
            )
        os.close(write_fd)
        write_fd = -1
        launcher.wait(START_TIMEOUT)
        answer = _read_line(read_fd, START_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BrokerUnavailable(f"could not start the broker: {exc}") from exc
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    if not answer.startswith("ready "):
        raise BrokerUnavailable(
            f"the broker did not start: {answer or 'no answer within %.0f s' % START_TIMEOUT} (log: {rt / 'broker.log'})"
        )
    pid = int(answer.split()[1])
    log.info("started broker %d: store of %d bytes, socket in %s, log %s", pid, memory, rt, rt / "broker.log")
    return pid


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def stop(timeout: float = 10.0) -> int | None:
    """Stop this user's broker; return its pid, or None if none was running.

    Blocks until the process has exited and removed its shared memory.
    """
    try:
        conn = connect()
    except BrokerUnavailable:
        return None
    try:
        reply, _ = conn.request({"op": "stop"})
    finally:
        conn.close()
    pid = int(reply["pid"])
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            log.warning("broker %d did not stop within %s s: killing it", pid, timeout)
            os.kill(pid, signal.SIGKILL)
            discard_dead()
            break
        time.sleep(0.005)  # waiting for another process to exit: no event to wait on
    return pid


def status() -> dict[str, Any] | None:
    """The broker's status (pid, store, channels), or None if no broker runs. The channels
    come in pages (``system.status_page``); the other figures are the first page's."""
    try:
        conn = connect()
    except BrokerUnavailable:
        return None
    try:
        reply, _ = conn.request({"op": "status"})
        following = reply.pop("next", None)
        while following is not None:
            page, _ = conn.request({"op": "status", "after": following})
            reply["channels"] += page["channels"]
            following = page.get("next")
    finally:
        conn.close()
    return reply


def _pid_of(entry: Path) -> int | None:
    try:
        return int(entry.name.split("-")[2])
    except (IndexError, ValueError):
        return None


def _own_arena(journal: Path) -> str:
    return journal.name[: -len("journal")] + "arena"


def _recover(runtime: Path) -> tuple[Recovered, Path | None, list[Path]]:
    """What the journal of the newest dead broker of ``runtime`` says, and its arena (to
    take over); and the dead brokers' entries nobody else may need: not those of a running
    broker, nor those of a dead broker of another runtime directory that still exists
    (another project of this user, whose next broker will come back for them)."""
    recovered = Recovered()
    entries = config.our_shm_entries()
    dead = [e for e in entries if (pid := _pid_of(e)) is not None and not pid_alive(pid)]
    protected: set[str] = set()
    ours: list[Path] = []
    for journal in sorted((e for e in entries if e.name.endswith("-journal")), key=_mtime):
        if not journal.exists():  # its broker (or another's clean-up) removed it since the listing
            continue
        try:
            owner, running = journal_runtime(journal), journal not in dead
        except FileNotFoundError:
            continue
        if not running and owner == str(runtime):
            ours.append(journal)
        elif running or (owner is not None and Path(owner).is_dir()):
            protected |= {journal.name, _own_arena(journal)}
    adopt = None
    for journal in reversed(ours):  # the newest dead broker's arena is the one in use
        arena = journal.with_name(_own_arena(journal))
        if not arena.exists():
            continue
        try:
            recovered.replay(journal)
        except FileNotFoundError:
            continue  # removed while we read it: by its own broker's clean exit, so nothing was lost
        except (OSError, KeyError, TypeError, ValueError, IndexError) as exc:  # a damaged journal
            log.error("cannot read %s, its channels are lost: %r", journal, exc)
            recovered = Recovered()
            continue
        adopt = arena
        break
    return recovered, adopt, [e for e in dead if e.name not in protected and e != adopt]


def _mtime(entry: Path) -> float:
    """When ``entry`` last changed; 0 if it is gone (another broker may remove its own
    entries while we list: /dev/shm is shared by every runtime directory of this user)."""
    try:
        return entry.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def discard_dead(runtime: Path | None = None) -> list[Path]:
    """Remove what dead brokers of ``runtime`` (default: this process's) left, giving up
    its data, along with leftovers nobody can come back for."""
    _, _, removable = _recover(runtime or config.runtime_dir(create=False))
    for entry in removable:
        entry.unlink(missing_ok=True)
    return removable


# -- the daemon itself -----------------------------------------------------------------


def _run(memory: int, idle_timeout: float, ready_fd: int) -> None:
    rt = config.runtime_dir()
    sock_path = rt / "broker.sock"
    recovered, adopt, dead = _recover(rt)
    sock_path.unlink(missing_ok=True)  # a dead broker's socket; the starter holds the lock
    own = config.shm_dir() / config.shm_name(os.getpid(), "arena")
    if adopt is not None:
        # The dead broker's arena, in place: its queues, objects and its clients' views go on.
        os.rename(adopt, own)
        arena = ArenaFile.adopt(own)
        if arena.capacity != memory:
            log.warning("took over a store of %d bytes (asked for %d): a store keeps its size", arena.capacity, memory)
        memory = arena.capacity
    else:
        arena = ArenaFile(own, memory)
    journal: Journal | None = None
    try:
        journal = Journal(config.shm_dir() / config.shm_name(os.getpid(), "journal"), str(rt))
        mapping = ArenaMap(str(arena.path), arena.size)
        state = BrokerState(ObjectTable(memory, arena.reserve, key_prefix=f"{os.getpid():x}-"), mapping.region,
                            mapping.whole, journal, arena.reserve_range)
        count = recovery.restore(state, recovered)
        journal.rewrite(recovery.snapshot(state))  # before the dead journals go: a crash now loses nothing
        for entry in dead:
            entry.unlink(missing_ok=True)
            log.warning("removed %s left by a broker that died", entry)
        if adopt is not None:
            log.warning("took over %s from a broker that died: %d objects queued in %d channels",
                        adopt.name, count, len(state.channels))

        async def main() -> None:
            assert state is not None and journal is not None
            server = Server(state, arena, str(sock_path), idle_timeout)
            loop = asyncio.get_running_loop()
            journal_state, journal_file = state, journal

            def write_journal() -> None:
                journal_file.flush()
                if journal_file.due:
                    journal_file.rewrite(recovery.snapshot(journal_state))

            def schedule() -> None:  # one write per JOURNAL_DELAY at most, whatever happened
                loop.call_later(JOURNAL_DELAY, write_journal)

            journal.on_pending = schedule
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, server.stopping.set)

            def ready() -> None:
                log.info("broker %d listening on %s, arena %s of %d bytes", os.getpid(), sock_path, arena.path, memory)
                if ready_fd >= 0:
                    os.write(ready_fd, f"ready {os.getpid()}\n".encode())
                    os.close(ready_fd)

            try:
                await server.serve(ready)
            finally:
                sock_path.unlink(missing_ok=True)

        asyncio.run(main())
    finally:
        arena.destroy()
        if journal is not None:
            journal.destroy()
        log.info("broker %d stopped; removed %s", os.getpid(), arena.path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shmchannel.broker.daemon")
    parser.add_argument("--memory", type=int, default=config.default_memory())
    parser.add_argument("--idle-timeout", type=float, default=config.default_idle_timeout())
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--foreground", action="store_true")
    args = parser.parse_args(argv)
    if not args.foreground and os.fork() > 0:
        os._exit(0)  # the launcher exits; the daemon is adopted by init
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        _run(args.memory, args.idle_timeout, args.ready_fd)
    except BaseException as exc:
        log.exception("broker failed")
        if args.ready_fd >= 0:
            try:
                os.write(args.ready_fd, f"error {exc!r}\n".encode())
            except OSError:
                pass
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
