"""The native core (``shmchannel._native.Region``): atomics and futex wait/wake.

Atomics and futex are tested across real processes: spawned children (as every child of
the tests) map one /dev/shm file of the test's own, removed after it. A child that must be
asleep in the kernel before it is woken is watched through /proc until it is, so a wake
test cannot pass through the path where the word had already changed. The error tests
check that each bad argument is refused with a clear message naming the offset.
"""

from __future__ import annotations

import math
import mmap
import os
import platform
import signal
import struct
import time
import uuid
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from shmchannel._native import Region
from shmchannel.testing import join_ok, start_process, wait_until

pytestmark = pytest.mark.timeout(60)

SIZE = 4096
SHM = Path("/dev/shm")
PREFIX = "pytest-native-"
# futex(2)'s number, for /proc/<pid>/syscall when /proc/<pid>/wchan says nothing useful.
FUTEX_NR = {"x86_64": 202, "aarch64": 98}.get(platform.machine())


def _map(path: str) -> tuple[mmap.mmap, Region]:
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, SIZE)
    finally:
        os.close(fd)
    return m, Region(m)


@pytest.fixture
def shared() -> Iterator[str]:
    """A zeroed /dev/shm file of SIZE bytes for this test only; removed (and checked) after."""
    path = SHM / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, SIZE)
    os.close(fd)
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)
        left = sorted(p.name for p in SHM.iterdir() if p.name.startswith(f"{PREFIX}{os.getpid()}-"))
        assert not left, f"left in /dev/shm: {left}"


@pytest.fixture
def children() -> Iterator[Callable[..., BaseProcess]]:
    """``start(target, *args)``: a spawned child, killed at the end of the test if still alive."""
    started = []

    def start(target: Callable[..., object], *args: object) -> BaseProcess:
        proc = start_process(target, *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.is_alive():
            proc.kill()
        proc.join(5)


@pytest.fixture
def region() -> Region:
    """A Region over an anonymous mapping (which it keeps alive), for tests in this process."""
    return Region(mmap.mmap(-1, SIZE))


def in_futex_wait(pid: int) -> bool:
    """Whether process ``pid`` (its main thread) sleeps in futex(2) now."""
    try:
        if "futex" in Path(f"/proc/{pid}/wchan").read_text():
            return True
    except OSError:
        pass
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return FUTEX_NR is not None and bool(fields) and fields[0] == str(FUTEX_NR)


# -- children (module level: spawned children import them) ------------------------------------

GO = 16  # u32: the parent stores 1 and wakes all: the children start together
COUNT64, COUNT32 = 0, 8  # the words the adders add to
LOCK, PLAIN = 64, 128  # the spin lock and the counter it protects (plain, non-atomic memory)


def _await_go(r: Region) -> None:
    while r.load32(GO) == 0:
        r.wait(GO, 0, 30)


def _adder(path: str, n: int) -> None:
    m, r = _map(path)
    _await_go(r)
    for _ in range(n):
        r.add(COUNT64, 1)
        r.add32(COUNT32, 1)


def _locked_incrementer(path: str, n: int) -> None:
    m, r = _map(path)
    me = os.getpid()
    _await_go(r)
    for _ in range(n):
        while r.cas(LOCK, 0, me) != 0:
            os.sched_yield()
        (value,) = struct.unpack_from("<Q", m, PLAIN)
        struct.pack_into("<Q", m, PLAIN, value + 1)
        assert r.cas(LOCK, me, 0) == me, "the lock changed hands while held"


WORD, ARRIVED, DONE, TRUE = 0, 4, 8, 12  # u32 words of the wait/wake tests
ALARMED, HANDLED, RESULT, ELAPSED_MS = 20, 24, 28, 32


def _waiter_until_set(path: str) -> None:
    """Waits (no spurious exit) until WORD is non-zero, then counts itself DONE."""
    m, r = _map(path)
    r.add32(ARRIVED, 1)
    while r.load32(WORD) == 0:
        r.wait(WORD, 0, 30)
    r.add32(DONE, 1)


def _waiter_once(path: str) -> None:
    """One wait on WORD (while it holds 0); counts itself DONE, and TRUE if the wait said so."""
    m, r = _map(path)
    r.add32(ARRIVED, 1)
    if r.wait(WORD, 0, 30):
        r.add32(TRUE, 1)
    r.add32(DONE, 1)


class Alarm(Exception):
    pass


def _wait_interrupted_by_raising_handler(path: str) -> None:
    m, r = _map(path)

    def handler(signum: int, frame: object) -> None:
        raise Alarm

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        r.wait(WORD, 0)  # no timeout: only the handler's exception can end it
    except Alarm:
        r.store32(ALARMED, 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _wait_through_quiet_handler(path: str) -> None:
    m, r = _map(path)
    calls = []
    signal.signal(signal.SIGALRM, lambda signum, frame: calls.append(signum))
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)  # every 50 ms during a 0.5 s wait
    start = time.monotonic()
    try:
        result = r.wait(WORD, 0, 0.5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    r.store32(ELAPSED_MS, int((time.monotonic() - start) * 1000))
    r.store32(RESULT, 1 if result else 2)
    r.store32(HANDLED, len(calls))


# -- atomics across processes ------------------------------------------------------------------


def _go(r: Region) -> None:
    r.store32(GO, 1)
    r.wake(GO, -1)


def test_add_from_four_processes_loses_no_increment(shared: str, children: Callable[..., BaseProcess]) -> None:
    """4 processes add 1 to a 64-bit and a 32-bit word 20,000 times each, all at once:
    both end at exactly 80,000."""
    n, procs = 20_000, 4
    m, r = _map(shared)
    started = [children(_adder, shared, n) for _ in range(procs)]
    _go(r)
    for proc in started:
        join_ok(proc, 45)
    assert r.load(COUNT64) == procs * n
    assert r.load32(COUNT32) == procs * n


def test_cas_spin_lock_protects_a_plain_counter_across_processes(shared: str, children: Callable[..., BaseProcess]) -> None:
    """A lock taken with cas and released with cas guards a read-modify-write of plain memory
    (struct on the mapping) by 3 processes: the counter is exact and the lock ends free."""
    n, procs = 3_000, 3
    m, r = _map(shared)
    started = [children(_locked_incrementer, shared, n) for _ in range(procs)]
    _go(r)
    for proc in started:
        join_ok(proc, 45)
    assert struct.unpack_from("<Q", m, PLAIN)[0] == procs * n
    assert r.load(LOCK) == 0


# -- futex across processes --------------------------------------------------------------------


def test_wait_in_one_process_is_woken_by_store32_and_wake_in_another(
    shared: str, children: Callable[..., BaseProcess]
) -> None:
    """A child asleep on a word (timeout 30 s) returns once another process stores a new
    value and wakes it; wake reports the one waiter it woke."""
    m, r = _map(shared)
    proc = children(_waiter_until_set, shared)
    wait_until(lambda: r.load32(ARRIVED) == 1, 30, "the child to map the region")
    wait_until(lambda: in_futex_wait(proc.pid), 30, "the child to sleep in futex")
    r.store32(WORD, 1)
    assert r.wake(WORD, 1) == 1
    join_ok(proc, 20)
    assert r.load32(DONE) == 1


def test_wake_returns_how_many_waiters_it_woke(shared: str, children: Callable[..., BaseProcess]) -> None:
    """Three processes asleep on one word: wake(n=2) wakes 2, wake(all) the last one, a
    further wake none; each woken wait returns True."""
    m, r = _map(shared)
    procs = [children(_waiter_once, shared) for _ in range(3)]
    wait_until(lambda: r.load32(ARRIVED) == 3, 30, "the children to map the region")
    wait_until(lambda: all(in_futex_wait(p.pid) for p in procs), 30, "3 children asleep")
    assert r.wake(WORD, 2) == 2
    wait_until(lambda: r.load32(DONE) == 2, 20, "the 2 woken children")
    assert r.wake(WORD, -1) == 1
    for proc in procs:
        join_ok(proc, 20)
    assert r.wake(WORD, -1) == 0
    assert (r.load32(DONE), r.load32(TRUE)) == (3, 3)


def test_signal_handler_that_raises_ends_a_wait_with_its_exception(
    shared: str, children: Callable[..., BaseProcess]
) -> None:
    """SIGALRM during a wait without timeout: the handler's exception comes out of wait."""
    m, r = _map(shared)
    join_ok(children(_wait_interrupted_by_raising_handler, shared), 30)
    assert r.load32(ALARMED) == 1


def test_signal_handler_that_returns_lets_the_wait_go_on_to_its_timeout(
    shared: str, children: Callable[..., BaseProcess]
) -> None:
    """SIGALRM every 50 ms during a 0.5 s wait: the handler runs, and the wait goes on
    until its own deadline (not restarted from scratch, not cut short), then returns False."""
    m, r = _map(shared)
    join_ok(children(_wait_through_quiet_handler, shared), 30)
    assert r.load32(RESULT) == 2, "wait returned True: nothing woke it"
    assert r.load32(HANDLED) >= 3
    assert 490 <= r.load32(ELAPSED_MS) < 5000


# -- wait and wake in one process --------------------------------------------------------------


def test_wait_returns_false_after_its_timeout(region: Region) -> None:
    start = time.monotonic()
    assert region.wait(0, 0, 0.05) is False
    assert time.monotonic() - start >= 0.045
    assert region.wait(0, 0, 0) is False
    assert region.wait(0, 0, 1e-9) is False


def test_wait_returns_true_at_once_when_the_word_differs(region: Region) -> None:
    region.store32(4, 7)
    start = time.monotonic()
    for timeout in (None, math.inf, 30, 30.0, 0, 0.0):
        args = (4, 6) if timeout is None else (4, 6, timeout)
        assert region.wait(*args) is True, timeout
    assert time.monotonic() - start < 5


def test_wake_without_waiters_returns_zero(region: Region) -> None:
    assert region.wake(0, 1) == 0
    assert region.wake(0, -1) == 0
    assert region.wake(0, 0) == 0


# -- atomics in one process --------------------------------------------------------------------


def test_operations_return_the_old_value_and_wrap(region: Region) -> None:
    assert region.add(8, 5) == 0
    assert region.add(8, -6) == 5
    assert region.load(8) == 2**64 - 1
    assert region.add(8, 1) == 2**64 - 1 and region.load(8) == 0
    assert region.add32(16, -1) == 0 and region.load32(16) == 2**32 - 1
    assert region.cas(24, 1, 9) == 0 and region.load(24) == 0  # not replaced
    assert region.cas(24, 0, 9) == 0 and region.load(24) == 9
    assert region.cas32(40, 1, 7) == 0 and region.load32(40) == 0  # not replaced
    assert region.cas32(40, 0, 2**32 - 1) == 0 and region.load32(40) == 2**32 - 1
    assert region.load32(44) == 0  # the word next to it untouched: 32 bits only
    region.store(32, 2**64 - 1)
    assert region.load(32) == 2**64 - 1
    assert region.size == SIZE


def test_words_are_little_endian_in_the_buffer() -> None:
    m = mmap.mmap(-1, SIZE)
    r = Region(m)
    r.store32(0, 0x11223344)
    r.store32(4, 0x55667788)
    assert r.load(0) == 0x5566778811223344 == struct.unpack_from("<Q", m, 0)[0]
    struct.pack_into("<I", m, 8, 12345)
    assert r.load32(8) == 12345
    del r
    m.close()


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "offset"),
    [
        (lambda r: r.load(SIZE), SIZE),  # just past the end
        (lambda r: r.load(SIZE - 4), SIZE - 4),  # a word that straddles the end (and misaligned)
        (lambda r: r.load32(SIZE), SIZE),
        (lambda r: r.store(2**40, 1), 2**40),
        (lambda r: r.add(2**64 + 8, 1), 2**64 + 8),  # beyond 64 bits: a corrupt word read back
        (lambda r: r.cas(-8, 0, 1), -8),
        (lambda r: r.add32(-4, 1), -4),
        (lambda r: r.wait(-4, 0, 0), -4),
        (lambda r: r.wake(SIZE, 1), SIZE),
        (lambda r: r.load(4), 4),
        (lambda r: r.store(12, 0), 12),
        (lambda r: r.cas(1, 0, 0), 1),
        (lambda r: r.cas32(SIZE, 0, 0), SIZE),
        (lambda r: r.cas32(2, 0, 0), 2),
        (lambda r: r.load32(2), 2),
        (lambda r: r.store32(6, 0), 6),
        (lambda r: r.wait(2, 0, 0), 2),
        (lambda r: r.wake(3, 1), 3),
    ],
)
def test_offsets_out_of_bounds_negative_or_misaligned_are_value_errors_naming_them(
    region: Region, call: Callable[[Region], object], offset: int
) -> None:
    with pytest.raises(ValueError, match=rf"offset {offset}\b") as info:
        call(region)
    assert "inside the region of 4096 bytes" in str(info.value) or "multiple of" in str(info.value)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda r: r.store32(8, 2**32), OverflowError, ["store32", "offset 8", "4294967296", "32-bit"]),
        (lambda r: r.store32(8, -1), OverflowError, ["store32", "offset 8", "-1"]),
        (lambda r: r.store(8, 2**64), OverflowError, ["store", "offset 8", str(2**64), "64-bit"]),
        (lambda r: r.store(8, -1), OverflowError, ["store", "offset 8", "-1"]),
        (lambda r: r.cas(8, -1, 0), OverflowError, ["cas", "offset 8", "expected -1"]),
        (lambda r: r.cas(8, 0, 2**64), OverflowError, ["cas", "offset 8", "desired"]),
        (lambda r: r.cas32(8, 2**32, 0), OverflowError, ["cas32", "offset 8", "expected 4294967296", "32-bit"]),
        (lambda r: r.cas32(8, 0, -1), OverflowError, ["cas32", "offset 8", "desired -1"]),
        (lambda r: r.add(8, 2**63), OverflowError, ["add", "offset 8", "delta"]),
        (lambda r: r.wait(8, 2**32, 0), OverflowError, ["wait", "offset 8", "expected 4294967296"]),
        (lambda r: r.wait(8, -1, 0), OverflowError, ["wait", "offset 8", "expected -1"]),
        (lambda r: r.wait(8, 0, math.nan), ValueError, ["wait", "offset 8", "timeout", "nan"]),
        (lambda r: r.wait(8, 0, -0.5), ValueError, ["wait", "offset 8", "timeout", "-0.5"]),
        (lambda r: r.wait(8, 0, "1"), TypeError, []),
        (lambda r: r.store(8, 1.0), TypeError, ["store", "offset 8", "value 1.0", "not an int"]),
        (lambda r: r.load(8.0), TypeError, ["load", "offset 8.0", "not an int"]),
        (lambda r: r.load("8"), TypeError, ["load", "offset '8'", "not an int"]),
        (lambda r: r.store(8), TypeError, ["store(offset, value)", "2 arguments"]),
        (lambda r: r.wait(8), TypeError, ["wait(offset, expected, timeout=None, waiters=None, mark=None)"]),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_the_call_and_offset(
    region: Region, call: Callable[[Region], object], error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as info:
        call(region)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert region.load(8) == 0  # nothing was written


def test_read_only_buffers_are_refused() -> None:
    with pytest.raises(BufferError, match="not writable"):
        Region(b"\0" * 64)
    ro = mmap.mmap(-1, SIZE, access=mmap.ACCESS_READ)
    with pytest.raises(BufferError, match="not writable"):
        Region(ro)
    ro.close()
    with pytest.raises(TypeError):
        Region(object())
    with pytest.raises(TypeError):
        Region()  # type: ignore[call-arg]


def test_a_buffer_that_does_not_start_on_8_bytes_is_refused() -> None:
    m = mmap.mmap(-1, SIZE)
    view = memoryview(m)
    with pytest.raises(ValueError, match="8-byte boundary; this one starts 4 bytes past one"):
        Region(view[4:])
    r = Region(view[8:])  # aligned slices are fine; offsets count from the slice
    r.store32(0, 1)
    assert struct.unpack_from("<I", m, 8)[0] == 1
    assert r.size == SIZE - 8
    del r
    view.release()
    m.close()


def test_an_uninitialised_region_refuses_every_operation() -> None:
    r = Region.__new__(Region)
    with pytest.raises(ValueError, match="not initialised"):
        r.load(0)
    with pytest.raises(ValueError, match="not initialised"):
        r.wake(0, 1)


def test_a_region_cannot_be_initialised_twice(region: Region) -> None:
    with pytest.raises(RuntimeError, match="already initialised"):
        region.__init__(bytearray(64))  # type: ignore[misc]


def test_the_region_keeps_its_buffer_exported_while_it_lives() -> None:
    """The mapping cannot be closed (unmapped) under a live Region; after it, it can."""
    m = mmap.mmap(-1, SIZE)
    r = Region(m)
    with pytest.raises(BufferError):
        m.close()
    r.store(0, 42)
    assert r.load(0) == 42
    del r
    m.close()
    assert m.closed

    data = bytearray(64)
    r = Region(data)
    with pytest.raises(BufferError):
        data.extend(b"x")  # a resize would move the memory
    del r
    data.extend(b"x")
