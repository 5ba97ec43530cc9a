"""A sender's close() cut by a KeyboardInterrupt at each instant of its path (embedded
backend), with receivers asleep in recv and in peek: they get ChannelClosed, not their
timeout, whether close() is then called again, never called again, or the sender's
process exits or is killed right after it marked the end. (Cut between the end's store
and its wake-up and not said again, receivers slept past the end: the broker's close,
which followed, woke them only if the stream was not marked closed yet; a sender killed
there woke no one.)

Instants are those at which CPython can raise a signal handler's exception
(``AtSignalPoint``, tests/test_loans_interrupt.py): deterministic, one per round. The
receivers are made to sleep through the end's store (``_end_stored_after``): a receiver
that looks again after it sees the end whatever the wake-ups do.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import platform
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import pytest

from shmchannel import ChannelClosed, DataReceiver, DataSender
from shmchannel.testing import join_ok, start_process, wait_until

from .conftest import ADDRESS
from .interrupted.common import store_left
from .test_api_interrupt import _interrupt, _nth

SHARDS = 2
SENT = 2  # objects sent before the close: each receiver must get its part of every one
ROWS = 1000  # per shard
#: A receiver's recv/peek timeout: woken by the close it returns long before; asleep past
#: the end it raises ChannelTimeout (what the tests look for, not how long it took).
RECV_TIMEOUT = 20.0


def _await_line() -> int:
    from shmchannel.queue.ring import Queues

    lines, first = inspect.getsourcelines(Queues._await)
    return first + next(i for i, line in enumerate(lines) if "region.wait(" in line)


_WAIT_LINE = _await_line()


#: The futex system call's number, to read a sleeper's in /proc/<pid>/task/<tid>/syscall.
FUTEX_SYSCALL = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
pytestmark = pytest.mark.skipif(FUTEX_SYSCALL is None,
                                reason=f"futex's system call number on {platform.machine()} is not known here")


def _asleep(thread: threading.Thread) -> bool:
    """Whether ``thread`` sleeps in ``Queues._await``'s futex wait -- the kernel says it
    sleeps in futex on that word -- or is about to, on the word's present value (it then
    sleeps until the word changes). Being at that line is not enough: woken there and
    waiting for the GIL it looks again after it, and would hide a wake-up lost meanwhile."""
    from shmchannel.queue.ring import Queues

    frame = sys._current_frames().get(thread.ident)
    if frame is None or frame.f_code is not Queues._await.__code__ or frame.f_lineno != _WAIT_LINE:
        return False
    local = frame.f_locals
    word, announced, queues = local["word"], local["announced"], local["self"]
    if announced is None:
        return False
    if local["region"].load32(word) == announced:
        return True
    task = f"/proc/self/task/{thread.native_id}"
    try:
        with open(f"{task}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"{task}/syscall") as f:
            call = f.read().split()
    except OSError:  # it ended meanwhile
        return False
    address = np.frombuffer(queues.view, np.uint8, count=1).ctypes.data + word
    return state == "S" and len(call) > 1 and call[0] == str(FUTEX_SYSCALL) and int(call[1], 16) == address


def _obj(i: int) -> np.ndarray:
    return np.arange(i * SHARDS * ROWS, (i + 1) * SHARDS * ROWS)


def _part(i: int, shard: int) -> np.ndarray:
    return _obj(i)[shard * ROWS : (shard + 1) * ROWS]


def _close_path() -> dict[str, Any]:
    """The functions a DataSender's close runs through on the embedded backend (no asend,
    no loans), each with an instant at which an interrupt may land (``_begin_close`` and
    ``_settle`` with no send in flight have none: no call, no backward jump)."""
    from shmchannel.backends.sending import EmbeddedSender
    from shmchannel.broker.client import Connection
    from shmchannel.channel.endpoint import Endpoint
    from shmchannel.queue import events
    from shmchannel.queue.ring import Publisher, Queues

    return {"DataSender.close": DataSender.close, "EmbeddedSender.close": EmbeddedSender.close,
            "Connection.withdraw": Connection.withdraw, "Publisher.close": Publisher.close,
            "Queues.wake_all": Queues.wake_all, "wake_all_of": events.wake_all_of,
            "Connection.close": Connection.close, "Connection._call": Connection._call,
            "Endpoint._end_close": Endpoint._end_close}


class Asleep:
    """A receiver of each shard on a thread that takes every object and then sleeps for
    the next: shard 0 in ``recv``, shard 1 in ``peek`` (each peeked object is then taken
    by a recv). Each thread records what it got and the exception that ended it."""

    def __init__(self, name: str) -> None:
        self.receivers = [DataReceiver(ADDRESS, dataset_name=name, shard_id=s) for s in range(SHARDS)]
        self.got: list[list[Any]] = [[] for _ in range(SHARDS)]
        self.ended: list[Any] = [None] * SHARDS
        self.threads = [threading.Thread(target=self._run, args=(s, s == 1), name=f"asleep-{s}") for s in range(SHARDS)]
        for thread in self.threads:
            thread.start()
        wait_until(lambda: all(_asleep(t) for t in self.threads)
                   and all(len(g) == SENT for g in self.got), 15, "both receivers to drain and fall asleep")

    def settle(self) -> None:
        """Wait until each receiver sleeps for the next object or has ended."""
        wait_until(lambda: all(_asleep(t) or not t.is_alive() for t in self.threads), 15,
                   "the receivers to fall asleep again")

    def _run(self, shard: int, peek: bool) -> None:
        receiver = self.receivers[shard]
        try:
            while True:
                if peek:
                    receiver.peek(timeout=RECV_TIMEOUT)
                self.got[shard].append(receiver.recv(timeout=RECV_TIMEOUT))
        except Exception as exc:  # noqa: BLE001 -- what the test looks at
            self.ended[shard] = exc

    def problem(self) -> str | None:
        """Join the threads and close the receivers; what went wrong, if anything. What
        they got is dropped then: its arrays view the store."""
        for thread in self.threads:
            thread.join(RECV_TIMEOUT + 10)
        try:
            for shard, thread in enumerate(self.threads):
                call = "peek" if shard == 1 else "recv"
                if thread.is_alive():
                    return f"the receiver asleep in {call} was still asleep {RECV_TIMEOUT + 10} s later"
                if not isinstance(self.ended[shard], ChannelClosed):
                    return f"the receiver asleep in {call} ended with {self.ended[shard]!r}, not ChannelClosed"
                expected = [_part(i, shard) for i in range(SENT)]
                got = self.got[shard]
                if len(got) != SENT or not all(np.array_equal(a, b) for a, b in zip(got, expected)):
                    return f"the receiver of shard {shard} got {got}, not its parts of the {SENT} objects sent"
            return None
        finally:
            self.got = []
            for receiver in self.receivers:
                receiver.close()


def _marked(sender: DataSender) -> bool:
    """Whether the sender's stream is marked closed in shared memory (private: the backend
    endpoint that close() took, or still holds after an interrupt)."""
    endpoint = sender._endpoint if sender._endpoint is not None else sender._closing
    return bool(endpoint is None or endpoint._pub.closed)


@contextlib.contextmanager
def _end_stored_after(wait: Callable[[], None]) -> Iterator[None]:
    """``Publisher.close`` calls ``wait()`` before it stores the end. The close's first step
    wakes every receiver (to end sends of other threads); those that look again only after
    the store see the end and hide a wake-up lost after it. ``wait`` lets them fall asleep
    again first: the receivers then sleep through the store, the case that loses a wake-up."""
    from shmchannel.queue.ring import Publisher

    original = Publisher.close

    def close(self: Publisher) -> None:
        wait()
        original(self)

    with mock.patch.object(Publisher, "close", close):
        yield


def _cut_close(name: str, point: Any, then: str) -> str | None:
    """A stream of ``SENT`` objects on ``name``, receivers asleep at its end, and the
    sender's close() run under ``point`` (which may interrupt it). ``then``: "again" calls
    close() again at once; "never" calls it only once the receivers answered -- unless the
    interrupt came before the close marked anything (then there is no end to see: the
    close is said again, as it must be). None, or what went wrong."""
    sender = DataSender(ADDRESS, dataset_name=name, num_shards=SHARDS)
    try:
        for i in range(SENT):
            sender.send(_obj(i), timeout=5)
        asleep = Asleep(name)
        with _end_stored_after(asleep.settle):
            try:
                point.run(sender.close)
            except KeyboardInterrupt:
                if then == "again" or not _marked(sender):
                    sender.close()
            problem = asleep.problem()
    finally:
        sender.close()
    return problem or store_left(ADDRESS)


def _each_instant(where: str, then: str) -> int:
    """Cut the close at instant 0, 1, ... of ``where`` until it has no more; how many."""
    from .test_loans_interrupt import AtSignalPoint

    code = _close_path()[where].__code__
    for k in range(1000):
        point = AtSignalPoint(code, _nth(k), _interrupt)
        problem = _cut_close(f"cut-{then}-{k}", point, then)
        assert problem is None, f"close() interrupted at instant {k} of {where}, then {then}: {problem}"
        if not point.fired:
            return k
    raise AssertionError(f"{where} has more than 1000 instants")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where", list(_close_path()))
def test_close_interrupted_at_any_instant_then_called_again_wakes_receivers(broker: int, where: str) -> None:
    """A close() cut at each instant of ``where`` and called again: receivers asleep in
    recv and in peek get every object, then ChannelClosed; the store empties."""
    assert _each_instant(where, "again") >= 1, f"no instant in {where}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where", list(_close_path()))
def test_close_interrupted_at_any_instant_never_called_again_wakes_receivers(broker: int, where: str) -> None:
    """A close() cut at each instant of ``where`` after which the end is marked, and not
    called again: receivers asleep in recv and in peek get every object, then
    ChannelClosed; the store empties. (Cut between the end's store and its wake-up, they
    slept on: the broker's close woke no one for a stream marked closed already.)"""
    assert _each_instant(where, "never") >= 1, f"no instant in {where}"


# -- the sender's process leaves right after its close marked the end ---------------------------


def _marked_closed(frame: Any) -> bool:
    """In ``Publisher.close``, the end stored, the wake-up not yet made."""
    return bool(frame.f_locals["self"].closed)


def _close_cut_then_leave(name: str, how: str, ready: Any, go: Any, storing: Any, stored: Any) -> None:
    """Child: send ``SENT`` objects, and once ``go`` is set close, cut right after the end
    was stored in shared memory (set ``storing`` before the store, which waits for
    ``stored``: see ``_end_stored_after``); then ``how``: "exit" returns (the interpreter
    exits: the sender's finalizer runs), "_exit" leaves by os._exit (no finalizer: the
    connection just drops), "kill" is SIGKILLed at that instant instead (no farewell to
    the broker)."""
    from shmchannel.queue.ring import Publisher

    from .test_loans_interrupt import AtSignalPoint

    def wait() -> None:
        storing.set()
        assert stored.wait(30)

    def kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)

    sender = DataSender(ADDRESS, dataset_name=name, num_shards=SHARDS)
    for i in range(SENT):
        sender.send(_obj(i), timeout=5)
    ready.set()
    assert go.wait(60)
    point = AtSignalPoint(Publisher.close.__code__, _marked_closed, kill if how == "kill" else _interrupt)
    with _end_stored_after(wait):
        try:
            point.run(sender.close)
        except KeyboardInterrupt:
            pass
    assert point.fired
    if how == "_exit":
        os._exit(0)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["exit", "_exit", "kill"])
def test_sender_process_leaving_right_after_marking_the_end_wakes_receivers(broker: int, how: str) -> None:
    """A sender process whose close() is cut right after it stored the end, and that then
    exits (``how``) without calling it again: receivers of another process asleep in recv
    and in peek get every object, then ChannelClosed; the store empties."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    name = f"leave-{how}"
    ready, go, storing, stored = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    proc = start_process(_close_cut_then_leave, name, how, ready, go, storing, stored)
    try:
        assert ready.wait(60), "the sending child did not start"
        asleep = Asleep(name)
        go.set()
        assert storing.wait(30), "the sending child did not come to its close's store"
        asleep.settle()
        stored.set()
        problem = asleep.problem()
    finally:
        go.set()
        stored.set()
        if how == "kill":
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            assert proc.exitcode == -signal.SIGKILL, f"child {proc.pid} exited with {proc.exitcode}"
        else:
            join_ok(proc, 30)
    assert problem is None, f"sender {how}: {problem}"
    assert store_left(ADDRESS) is None
