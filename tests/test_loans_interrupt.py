"""Loans and send by key (issue 15) under interrupts: ``DataSender.empty``, ``send`` of a
loan and ``send_key`` interrupted at random instants (KeyboardInterrupt), ``empty`` waiting
for room in a full store interrupted or timing out, and a signal handler that itself calls
``empty``/``send``/``send_key`` while the main thread is inside one of them (re-entry).

The project standard (README, "Ctrl-C and signals"): an interrupt at any instant never
loses, duplicates (beyond at-least-once) or corrupts an object, and never leaves memory
held for ever -- a hold kept until the sender closes is acceptable, but after
``sender.close()`` and dropping every array the store must be empty.

Every interrupted loop runs in a child interpreter (``python -c CHILD <scenario> <json>``,
the ``child_*`` functions below), so no signal reaches pytest; it is killed after dumping
its stacks if it outlives its ``hang`` limit, and prints a JSON summary as the last line
of its stdout. As in tests/interrupted/interrupts.py, a signal raises KeyboardInterrupt
only inside the shmchannel call a loop makes, at most once per call, never in this file's
own code: so the loop's own state (which seq was sent) is exact.

Every failure names its seed: ``SHMCHANNEL_TEST_SEED=<seed>`` replays it (as far as timing
allows).

Random instants find a narrow window only now and then; the windows they found are also
tested at their exact instant (``AtSignalPoint``): a trace function runs the "signal
handler" -- a call of the sender, or ``raise KeyboardInterrupt`` -- at the first instant
inside the library's ``Ledger.tidy`` where CPython can run a real signal handler (after a
C call returns, at a backward jump, at a Python call's entry) and the ledger is in the
state named. Those are deterministic (seed 0 in their messages).

Objects are ``(rows, 8)`` int64 arrays stamped with their seq, their row numbers, their
row count, their kind and a pattern of (seq, row, column): a receiver checks each shard's
rows are exactly the rows that object must have, and re-checks the last few it still holds
before dropping them (memory lent again while a receiver views it would show there).
"""

from __future__ import annotations

import collections
import gc
import itertools
import json
import os
import random
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from shmchannel import (
    ChannelClosed, ChannelError, ChannelNotFound, ChannelTimeout, DataReceiver, DataSender, DataSystem,
    ObjectNotFound, ReentrantCall, StoreFull, StoreFullTimeout,
)

from .conftest import ADDRESS
from .interrupted.common import close_all, connections_left, error_text
from .interrupted_harness import SEED_ENV, Child, sends_problems, store_problems

pytestmark = pytest.mark.timeout(120)  # each child is bounded by its own hang limit, well below

ROOT = Path(__file__).resolve().parents[1]
CHILD = "from tests.test_loans_interrupt import child_main; child_main()"
MIB = 1 << 20
COLS = 8
LOAN, KEY, DICT_LOAN, ALARM_LOAN, ALARM_KEY = 0, 1, 2, 3, 4  # an object's kind (column 3)
ROWS = (2, 64, 2048, 16384)  # 128 B (inline by key) .. 1 MiB
SECONDS = 2.5  # how long each random loop runs

# This file's code: a signal landing in it is dropped (see Interrupter).
_OURS = (lambda: None).__code__.co_filename


# -- objects and their check -------------------------------------------------------------------


def stamp(out: np.ndarray, seq: int, kind: int) -> np.ndarray:
    """Fill ``out`` ((rows, 8) int64) with the stamp of object ``seq`` of ``kind``."""
    rows = out.shape[0]
    r = np.arange(rows, dtype=np.int64)
    out[:, 0] = seq
    out[:, 1] = r
    out[:, 2] = rows
    out[:, 3] = kind
    out[:, 4:] = seq * 1_000_003 + r[:, None] * 7919 + np.arange(4, dtype=np.int64)
    return out


def expected_rows(seq: int, rows: int, kind: int, shard: int, shards: int) -> np.ndarray:
    part = rows // shards
    return stamp(np.empty((rows, COLS), np.int64), seq, kind)[shard * part: (shard + 1) * part]


def check_part(obj: Any, shard: int, shards: int = 2) -> tuple[tuple[int, int] | None, str | None]:
    """((kind, seq), None) if ``obj`` is shard ``shard``'s rows of a stamped object, whole;
    else (None, what is wrong)."""
    if isinstance(obj, dict) and set(obj) == {"x"}:
        obj = obj["x"]
    if not isinstance(obj, np.ndarray) or obj.dtype != np.int64 or obj.ndim != 2 or obj.shape[1] != COLS \
            or not obj.shape[0]:
        return None, f"not a (rows, {COLS}) int64 array: {type(obj).__name__} {getattr(obj, 'shape', '')} " \
                     f"{repr(obj)[:80]}"
    seq, rows, kind = int(obj[0, 0]), int(obj[0, 2]), int(obj[0, 3])
    if rows not in ROWS or kind not in (LOAN, KEY, DICT_LOAN, ALARM_LOAN, ALARM_KEY) or seq < 0:
        return None, f"header row {obj[0].tolist()} names no object (rows {obj.shape[0]})"
    want = expected_rows(seq, rows, kind, shard, shards)
    if obj.shape != want.shape:
        return None, f"seq {seq} kind {kind}: shape {obj.shape}, expected {want.shape}"
    wrong = np.flatnonzero((obj != want).any(axis=1))
    if wrong.size:
        i = int(wrong[0])
        return None, (f"seq {seq} kind {kind} ({rows} rows): {wrong.size} rows differ, first row {i}: "
                      f"{obj[i].tolist()} expected {want[i].tolist()}")
    return (kind, seq), None


# -- interrupts ----------------------------------------------------------------------------------


class Interrupter:
    """SIGALRM at random instants (an interval timer re-armed from its handler), turned into
    KeyboardInterrupt only inside a call made through ``call``, at most once per call, and
    never in a frame of this file (as tests/interrupted/interrupts.py)."""

    def __init__(self, seed: int, low: float, high: float) -> None:
        self._rng = random.Random(seed)
        self._low, self._high = low, high
        self._running = False
        self.armed = False
        self.raised = 0
        self.dropped = 0
        signal.signal(signal.SIGALRM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self._running:
            signal.setitimer(signal.ITIMER_REAL, self._rng.uniform(self._low, self._high))
        if self.armed and frame is not None and frame.f_code.co_filename != _OURS:
            self.armed = False
            self.raised += 1
            raise KeyboardInterrupt
        self.dropped += 1

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.armed = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.armed = False

    def start(self) -> Interrupter:
        self._running = True
        signal.setitimer(signal.ITIMER_REAL, self._rng.uniform(self._low, self._high))
        return self

    def stop(self) -> None:
        self._running = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    def counts(self) -> dict[str, int]:
        return {"raised": self.raised, "dropped": self.dropped}


def wait_store_empty(ds: DataSystem, timeout: float) -> tuple[float | None, dict[str, int]]:
    """Seconds until the store held no object and no byte (None: not within ``timeout``),
    and its last stats."""
    start = time.monotonic()
    while True:
        gc.collect()
        stats = ds.stats()
        if stats.objects == 0 and stats.used == 0:
            return time.monotonic() - start, {"objects": 0, "used": 0}
        if time.monotonic() - start > timeout:
            return None, {"objects": stats.objects, "used": stats.used}
        time.sleep(0.05)


def ledger_held(sender: DataSender) -> int:
    """How many loans the sender's ledger holds (backends/loans.py; a figure, not a check)."""
    endpoint = getattr(sender, "_endpoint", None)
    ledger = getattr(endpoint, "_ledger", None)
    return int(getattr(ledger, "held", -1))


# -- the children ---------------------------------------------------------------------------------


def child_stream(name: str, seed: int, low: float, high: float, seconds: float) -> dict[str, Any]:
    """Scenario 1: loop ``a = sender.empty(...)``, stamp it, ``send(a)`` (bare, or inside a
    dict), or ``ds.put`` a stamped array and ``send_key(key)``, on a 2-shard channel, every
    call interrupted at random and retried with the same seq (empty and put: a new one).
    Then close and wait for the store to be empty (the parent's receivers drop everything)."""
    rng = random.Random(seed)
    ds = DataSystem(ADDRESS)
    sender = DataSender(ADDRESS, dataset_name=name, num_shards=2, max_queue_size=4)
    interrupts = Interrupter(seed, low, high)
    interrupted: list[int] = []  # the seq of each interrupted send / send_key
    cut: collections.Counter[str] = collections.Counter()  # interrupted empty / put calls
    problems: list[str] = []
    kept: collections.deque[np.ndarray] = collections.deque(maxlen=3)  # sent loans the sender keeps viewing
    seq, error = 0, None
    deadline = time.monotonic() + seconds
    interrupts.start()
    try:
        while time.monotonic() < deadline and len(problems) < 10:
            rows = rng.choice(ROWS)
            kind = rng.choices((LOAN, DICT_LOAN, KEY), (5, 2, 3))[0]
            key = None
            if kind == KEY:
                try:
                    key = interrupts.call(ds.put, stamp(np.empty((rows, COLS), np.int64), seq, KEY), timeout=30)
                except KeyboardInterrupt:
                    cut["put"] += 1
                    continue
                while True:
                    try:
                        interrupts.call(sender.send_key, key, timeout=10)
                        break
                    except KeyboardInterrupt:
                        interrupted.append(seq)
                ds.delete(key)
            else:
                try:
                    loan = interrupts.call(sender.empty, (rows, COLS), np.int64, timeout=30)
                except KeyboardInterrupt:
                    cut["empty"] += 1
                    continue
                if not loan.flags.writeable or loan.shape != (rows, COLS) or loan.dtype != np.int64:
                    problems.append(f"empty() of seq {seq} returned {loan.shape} {loan.dtype} "
                                    f"writeable={loan.flags.writeable}")
                stamp(loan, seq, kind)
                obj: Any = loan if kind == LOAN else {"x": loan}
                while True:
                    try:
                        interrupts.call(sender.send, obj, timeout=10)
                        break
                    except KeyboardInterrupt:
                        interrupted.append(seq)
                del obj
                if loan.flags.writeable:
                    problems.append(f"the loan of seq {seq} is still writable after its send returned")
                if not np.array_equal(loan, stamp(np.empty((rows, COLS), np.int64), seq, kind)):
                    problems.append(f"the sender's own loan of seq {seq} changed after its send")
                if rng.random() < 0.2:
                    kept.append(loan)
                del loan
            seq += 1
    except Exception as exc:  # noqa: BLE001 -- reported
        error = f"seq {seq} raised {error_text(exc)}"
    finally:
        interrupts.stop()
    kept.clear()
    gc.collect()
    # A figure only: holds an interrupt left to the sender's close (acceptable).
    settle = time.monotonic() + 1.6  # the ledger's 50 ms looks and its 1 s keep-for-reuse
    while ledger_held(sender) > 0 and time.monotonic() < settle:
        time.sleep(0.05)
    held = ledger_held(sender)
    before_close = ds.stats()  # figures: what the sender holds until its close (acceptable)
    close_errors = close_all(sender)
    emptied, stats = wait_store_empty(ds, 10.0)
    if emptied is None:
        problems.append(f"10 s after the sender's close() (everything dropped here) the store still holds "
                        f"{stats['objects']} objects, {stats['used']} bytes")
    close_errors += close_all(ds)
    return {"sent": seq, "interrupted": interrupted, "error": error, "close_errors": close_errors,
            "problems": problems, "empty_interrupted": cut["empty"], "put_interrupted": cut["put"],
            "send_interrupted": len(interrupted), "held_before_close": held,
            "objects_before_close": before_close.objects, "mib_used_before_close": before_close.used >> 20,
            "emptied_after_close_s": emptied, **interrupts.counts()}


FULL_LOAN = MIB  # the loan a full store has no room for
JUNK = 256 * 1024  # the DataSystem objects that fill it


def _fill(ds: DataSystem, room: int) -> list[str]:
    """Put JUNK objects until less than ``room`` bytes are free (the store cannot lend that)."""
    keys = []
    junk = np.full(JUNK, 0xEE, np.uint8)
    while ds.stats().free >= room:
        keys.append(ds.put(junk, timeout=5))
    return keys


def _delete(ds: DataSystem, keys: list[str]) -> None:
    for key in keys:
        try:
            ds.delete(key)
        except ObjectNotFound:
            pass
    keys.clear()


def child_full_store(name: str, seed: int, low: float, high: float, rounds: int) -> dict[str, Any]:
    """Scenario 2: on a 4 MiB store filled with DataSystem objects, ``empty(1 MiB)`` waits for
    room. Each round (a new sender, so that no loan kept for reuse spares the wait) either
    an interrupt ends the wait ("interrupt"), or room comes -- another thread deletes
    objects -- at a random instant racing the interrupt ("race"), or a timeout of 0-30 ms
    races the room ("timeout_race"); or ("kept") a sender holding a loan kept for reuse,
    which the full store makes it give back first, waits and is interrupted. A lent array
    is filled, sometimes kept past its sender's close. Afterwards, with every sender closed
    and everything dropped, the store must be empty."""
    rng = random.Random(seed)
    ds = DataSystem(ADDRESS)
    freer_ds = DataSystem(ADDRESS)  # the other thread's own connection
    keeper = DataSender(ADDRESS, dataset_name=f"{name}-keeper")  # the "kept" rounds' sender
    interrupts = Interrupter(seed, low, high)
    outcomes: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    kept: list[tuple[int, np.ndarray]] = []  # (round, loan) held past its sender's close
    try:
        for i in range(rounds):
            if len(problems) >= 10:
                break
            mode = rng.choice(("interrupt", "race", "timeout_race", "kept"))
            if mode == "kept":
                sender = keeper
                small = sender.empty(JUNK, np.uint8)
                del small
                settle = time.monotonic() + 0.5
                while not sender._endpoint._ledger.idle() and time.monotonic() < settle:
                    time.sleep(0.005)  # (private: the daemon's look marks it kept for reuse)
            else:
                sender = DataSender(ADDRESS, dataset_name=f"{name}-{i}")
            keys = _fill(ds, FULL_LOAN)
            freer = None
            if mode in ("race", "timeout_race"):
                delay = rng.uniform(0.0, 0.03)
                give = keys[:6]  # 1.5 MiB: room for the loan
                keys = keys[6:]

                def free(give: list[str] = give, delay: float = delay) -> None:
                    time.sleep(delay)
                    for key in give:
                        freer_ds.delete(key)

                freer = threading.Thread(target=free, daemon=True)
                freer.start()
            timeout = rng.uniform(0.0, 0.03) if mode == "timeout_race" else 10.0
            if mode != "timeout_race":
                interrupts.start()
            start = time.monotonic()
            loan = None
            try:
                loan = interrupts.call(sender.empty, FULL_LOAN, np.uint8, timeout=timeout)
                outcomes[f"{mode}: lent"] += 1
            except KeyboardInterrupt:
                outcomes[f"{mode}: interrupted"] += 1
            except StoreFullTimeout as exc:
                outcomes[f"{mode}: timed out"] += 1
                if mode != "timeout_race":
                    problems.append(f"round {i} ({mode}): empty() timed out after {time.monotonic() - start:.2f} s "
                                    f"though an interrupt was due within {high} s: {exc}")
            except Exception as exc:  # noqa: BLE001 -- reported
                problems.append(f"round {i} ({mode}): empty() raised {error_text(exc)}")
            finally:
                interrupts.stop()
            if freer is not None:
                freer.join(10)
            if loan is not None:
                if loan.shape != (FULL_LOAN,) or not loan.flags.writeable:
                    problems.append(f"round {i}: empty() returned {loan.shape} writeable={loan.flags.writeable}")
                loan[:] = i & 0xFF
                if rng.random() < 0.3 and len(kept) < 1:
                    kept.append((i, loan))  # held across rounds and its sender's close
                del loan
            if sender is not keeper:
                problems += close_all(sender)
            del sender
            _delete(ds, keys)
            changed = [j for j, held in kept if not (held == (j & 0xFF)).all()]  # (no name left bound to one)
            if changed:
                problems.append(f"round {i}: the loan lent in round {changed[0]}, still held, changed")
    except Exception as exc:  # noqa: BLE001 -- reported
        problems.append(f"the loop raised {error_text(exc)}")
    finally:
        interrupts.stop()
    kept.clear()
    gc.collect()
    settle = time.monotonic() + 1.6  # the keeper's loans kept for reuse go back after 1 s
    while ds.stats().objects and time.monotonic() < settle:
        time.sleep(0.05)
    held_before_close = ds.stats().objects  # a figure: holds left to the keeper's close (acceptable)
    problems += close_all(keeper)
    emptied, stats = wait_store_empty(ds, 10.0)
    if emptied is None:
        problems.append(f"10 s after every sender's close() (every array dropped, every key deleted) the store "
                        f"still holds {stats['objects']} objects, {stats['used']} bytes")
    problems += close_all(ds, freer_ds)
    return {"problems": problems, "outcomes": dict(outcomes), "held_before_close": held_before_close,
            "emptied_after_close_s": emptied, "connections": connections_left(), **interrupts.counts()}


def _receive_into(receiver: DataReceiver, shard: int, got: list[tuple[int, int]], problems: list[str]) -> None:
    """Receive until the end of the stream, checking every object (a thread's target)."""
    try:
        for obj in receiver:
            what, problem = check_part(obj, shard)
            del obj
            if problem is not None:
                problems.append(f"shard {shard} object {len(got)}: {problem}")
            else:
                got.append(what)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 -- reported
        problems.append(f"the reader of shard {shard} raised {error_text(exc)}")


def _reentry_handler(sender: DataSender, ds: DataSystem, rng: random.Random, low: float, high: float,
                     record: dict[str, Any]) -> Callable[[int, Any], None]:
    """A SIGALRM handler that calls ``empty`` (and drops or sends the loan) or ``send_key`` on
    the sender the main thread uses; each either works or raises ReentrantCall at once."""
    calls = itertools.count()

    def handler(signum: int, frame: Any) -> None:
        if record["stopping"]:
            return
        j = next(calls)
        what = rng.choice(("empty+send", "empty", "send_key"))
        rows = rng.choice(ROWS)
        start = time.monotonic()
        key = None
        try:
            if what == "send_key":
                key = ds.put(stamp(np.empty((rows, COLS), np.int64), j, ALARM_KEY), timeout=5)
                sender.send_key(key, timeout=5)
                record["sent"].append((ALARM_KEY, j))
            else:
                loan = sender.empty((rows, COLS), np.int64, timeout=5)
                stamp(loan, j, ALARM_LOAN)
                if what == "empty+send":
                    sender.send(loan, timeout=5)
                    record["sent"].append((ALARM_LOAN, j))
                else:
                    record["lent"] += 1
                del loan
        except ReentrantCall:
            record["reentrant"].append((what, time.monotonic() - start))
        except Exception as exc:  # noqa: BLE001 -- reported, not raised into the main thread's call
            record["errors"].append(f"the handler's {what} #{j} raised {error_text(exc)} "
                                    f"after {time.monotonic() - start:.3f} s")
        finally:
            if key is not None:
                try:
                    ds.delete(key)
                except Exception as exc:  # noqa: BLE001 -- reported
                    record["errors"].append(f"the handler's delete of its key raised {error_text(exc)}")
        if not record["stopping"]:
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(low, high))

    return handler


def child_reentrant(name: str, seed: int, low: float, high: float, seconds: float) -> dict[str, Any]:
    """Scenario 3: the main thread loops ``empty``/stamp/``send`` (and ``send_key``) on a
    2-shard channel (queue of 2: sends wait) while a SIGALRM handler every ``low..high`` s
    calls ``empty``/``send``/``send_key`` on the same sender; two reader threads check every
    object. Each handler call works or raises ReentrantCall at once; every send that
    returned arrives once, in its order; after close the store empties."""
    rng = random.Random(seed)
    ds = DataSystem(ADDRESS)
    alarm_ds = DataSystem(ADDRESS)  # the handler's: re-entering the main thread's would be refused
    sender = DataSender(ADDRESS, dataset_name=name, num_shards=2, max_queue_size=2)
    receivers = [DataReceiver(ADDRESS, dataset_name=name, shard_id=s, wait=10) for s in (0, 1)]
    got: list[list[tuple[int, int]]] = [[], []]
    errors: list[str] = []
    readers = [threading.Thread(target=_receive_into, args=(r, s, got[s], errors), daemon=True)
               for s, r in enumerate(receivers)]
    for reader in readers:
        reader.start()
    record: dict[str, Any] = {"stopping": False, "sent": [], "reentrant": [], "errors": errors, "lent": 0}
    signal.signal(signal.SIGALRM, _reentry_handler(sender, alarm_ds, random.Random(seed + 1), low, high, record))
    signal.setitimer(signal.ITIMER_REAL, rng.uniform(low, high))
    main_sent: list[tuple[int, int]] = []
    deadline = time.monotonic() + seconds
    i = 0
    try:
        while time.monotonic() < deadline and len(errors) < 10:
            rows = rng.choice(ROWS)
            if rng.random() < 0.25:
                key = ds.put(stamp(np.empty((rows, COLS), np.int64), i, KEY), timeout=30)
                sender.send_key(key, timeout=30)
                ds.delete(key)
                main_sent.append((KEY, i))
            else:
                loan = sender.empty((rows, COLS), np.int64, timeout=30)
                stamp(loan, i, LOAN)
                sender.send(loan, timeout=30)
                main_sent.append((LOAN, i))
                del loan
            i += 1
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"the main thread's call #{i} raised {error_text(exc)}")
    finally:
        record["stopping"] = True
        signal.setitimer(signal.ITIMER_REAL, 0)
    errors += close_all(sender)
    for reader in readers:
        reader.join(30)
        if reader.is_alive():
            errors.append("a reader did not see the end of the stream within 30 s")
    errors += close_all(*receivers)
    gc.collect()
    emptied, stats = wait_store_empty(ds, 10.0)
    if emptied is None:
        errors.append(f"10 s after close() (every array dropped) the store still holds {stats['objects']} "
                      f"objects, {stats['used']} bytes")
    errors += close_all(ds, alarm_ds)
    slow = [round(t, 3) for _, t in record["reentrant"] if t > 1.0]
    if slow:
        errors.append(f"ReentrantCall took up to {max(slow)} s to come, not at once")
    return {"main_sent": main_sent, "alarm_sent": record["sent"], "got": got, "errors": errors,
            "reentrant": collections.Counter(w for w, _ in record["reentrant"]), "alarm_lent": record["lent"],
            "emptied_after_close_s": emptied, "connections": connections_left()}


# -- re-entry at an exact instant -----------------------------------------------------------------


class AtSignalPoint:
    """Run ``action()`` once, in the main thread, at the first instant of a call of ``code``
    (a function of the library) at which CPython can run a signal handler and at which
    ``predicate(frame)`` holds -- as a signal arriving just then would run its handler.

    Those instants (where the eval loop checks for pending signals; on 3.11+ only there,
    on 3.10 at most instructions, these included): right after a call of a C function
    returns (the next instruction), a backward jump (its target), and the entry of a
    Python function it calls (before its body). No other instant is used, so what the
    action finds is what a real handler can find. Driven by a trace function (``sys.settrace``, opcode events), which runs between
    two instructions of the frame as a handler does; ``action`` may raise (as a handler
    raising KeyboardInterrupt): it propagates into the traced call."""

    def __init__(self, code: Any, predicate: Callable[[Any], bool], action: Callable[[], None]) -> None:
        import dis

        self._code, self._predicate, self._action = code, predicate, action
        instructions = list(dis.get_instructions(code))
        jumps = set(dis.hasjabs) | set(dis.hasjrel)
        # CALL (3.11+), CALL_FUNCTION / CALL_METHOD / CALL_FUNCTION_KW (3.10), CALL_FUNCTION_EX
        self._after_call = {instructions[i + 1].offset for i, ins in enumerate(instructions[:-1])
                            if ins.opname.startswith("CALL") and not ins.opname.startswith("CALL_INTRINSIC")}
        self._targets = {ins.argval for ins in instructions
                         if ins.opcode in jumps and isinstance(ins.argval, int) and ins.argval <= ins.offset}
        self._python_call = False  # the call that just returned was of a Python function
        self.fired = False
        self.points = 0  # instants looked at

    def _maybe_fire(self, frame: Any) -> None:
        self.points += 1
        if not self.fired and self._predicate(frame):
            self.fired = True
            self._action()

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            offset = frame.f_lasti
            after_c_call = offset in self._after_call and not self._python_call
            self._python_call = False
            if after_c_call or offset in self._targets:
                self._maybe_fire(frame)
        return self._local

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        if frame.f_code is self._code:
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return self._local
        caller = frame.f_back
        if caller is not None and caller.f_code is self._code:
            self._python_call = True  # (its return is no instant: its entry is)
            self._maybe_fire(caller)
        return None

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        sys.settrace(self._global)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.settrace(None)


def _lock_held(ledger: Any) -> Callable[[Any], bool]:
    """Inside the ledger's look, its lock held by this thread."""
    return lambda frame: bool(ledger._lock._is_owned())


def _dead_processed(ledger: Any) -> Callable[[Any], bool]:
    """The look has processed the first dropped array's death (its viewer entry is gone)
    and not yet taken it off the queue of deaths."""
    return lambda frame: bool(ledger._dead) and id(ledger._dead[0]) not in ledger._viewers


def _popped_not_released(ledger: Any) -> Callable[[Any], bool]:
    """The look has taken a loan out of its tables and not yet given it back (given == 0)."""
    from shmchannel.backends.loans import Loan

    def predicate(frame: Any) -> bool:
        loan, given = frame.f_locals.get("loan"), frame.f_locals.get("given")
        return isinstance(loan, Loan) and loan.id not in ledger._loans and given == 0

    return predicate


def _keep_one(sender: DataSender, ledger: Any, shape: Any, dtype: Any) -> bool:
    """A loan of ``shape`` lent, written and dropped; whether, within 0.5 s, the ledger's
    daemon thread marked it kept for reuse (1 s)."""
    spare = sender.empty(shape, dtype)
    spare[:] = 1
    del spare
    deadline = time.monotonic() + 0.5
    while not ledger.idle() and time.monotonic() < deadline:
        time.sleep(0.005)
    return bool(ledger.idle())


#: case: (where in the main thread's empty() the handler runs, what it does). Where:
#: "lock-held" any instant of the ledger's look (tidy) holding its lock; "dead-processed"
#: the look has processed a dropped array's death, not yet taken it off its queue. What:
#: "empty-new" empty() of a size no kept loan has (a round trip to the broker);
#: "empty-reuse-drop"/"-keep" empty() of the size of a loan kept for reuse (no round trip),
#: the array dropped as the handler returns, or kept; "send_key" a DataSystem object.
CASES = {
    "lock-held/empty-new": ("lock-held", "empty-new"),
    "lock-held/send_key": ("lock-held", "send_key"),
    "dead-processed/empty-reuse-drop": ("dead-processed", "empty-reuse-drop"),
    "dead-processed/empty-reuse-keep": ("dead-processed", "empty-reuse-keep"),
}
SPARE = (2048, COLS)  # the size of the loan kept for reuse


def child_reentrant_at(name: str, case: str, seed: int) -> dict[str, Any]:
    """Run a "signal handler" doing ``CASES[case]`` on the sender at an exact instant of the
    main thread's ``empty()`` (``AtSignalPoint``). The handler's call must work or raise
    ReentrantCall; the main thread's ``empty()`` must work; after close, with every array
    dropped, the store must be empty. A hang is the child being killed (stacks shown)."""
    from shmchannel.backends.loans import Ledger

    where, call = CASES[case]
    ds = DataSystem(ADDRESS)
    sender = DataSender(ADDRESS, dataset_name=name)
    ledger = sender._endpoint._ledger  # (private: the predicates look at its tables)
    errors: list[str] = []
    outcome: list[str] = []
    stash: list[np.ndarray] = []
    key = ds.put(stamp(np.empty((2048, COLS), np.int64), 0, ALARM_KEY)) if call == "send_key" else None

    def handler() -> None:
        start = time.monotonic()
        try:
            if call == "send_key":
                sender.send_key(key, timeout=5)
            else:
                loan = sender.empty((4096, COLS) if call == "empty-new" else SPARE, np.int64, timeout=5)
                stamp(loan, 1, ALARM_LOAN)
                if call == "empty-reuse-keep":
                    stash.append(loan)
                del loan  # (-drop: it dies here, as a handler's local does when it returns)
            outcome.append(f"worked in {time.monotonic() - start:.3f} s")
        except ReentrantCall:
            outcome.append("ReentrantCall")
        except Exception as exc:  # noqa: BLE001 -- reported
            errors.append(f"the handler's {call} raised {error_text(exc)}")

    predicate = {"lock-held": _lock_held, "dead-processed": _dead_processed}[where](ledger)
    point = AtSignalPoint(Ledger.tidy.__code__, predicate, handler)
    held = sender.empty((64, COLS), np.int64)  # a loan in the ledger: its looks have one to loop over
    stamp(held, 2, LOAN)
    if not _keep_one(sender, ledger, SPARE, np.int64):
        errors.append("set-up: the dropped loan was not kept for reuse within 0.5 s")
    dropped = sender.empty((128, COLS), np.int64)
    try:
        del dropped  # a dead array for the next look to process (the daemon looks every 50 ms)
        loan = point.run(sender.empty, (8192, COLS), np.int64, timeout=5)
        stamp(loan, 3, LOAN)
        del loan
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"the main thread's empty(), whose ledger look the handler ran in, raised {error_text(exc)}")
    if not point.fired:
        errors.append(f"set-up: the handler never ran ({where}: none of {point.points} instants; the ledger's "
                      "daemon thread looked first? run again)")
    if not (held == stamp(np.empty((64, COLS), np.int64), 2, LOAN)).all():
        errors.append("the main thread's held loan changed")
    del held
    stash.clear()
    gc.collect()
    errors += close_all(sender)
    if key is not None:
        ds.delete(key)
    if call == "send_key" and any(o.startswith("worked") for o in outcome):
        # The handler's object is queued (nobody received yet): received, checked, released.
        with DataReceiver(ADDRESS, dataset_name=name) as receiver:
            got = receiver.recv(timeout=5)
            if not (got == stamp(np.empty((2048, COLS), np.int64), 0, ALARM_KEY)).all():
                errors.append("the object the handler sent by key arrived changed")
            del got
    emptied, stats = wait_store_empty(ds, 5.0)
    if emptied is None:
        errors.append(f"5 s after close() (every array dropped, the key deleted) the store still holds "
                      f"{stats['objects']} objects, {stats['used']} bytes")
    errors += close_all(ds)
    return {"outcome": outcome, "errors": errors, "emptied_after_close_s": emptied}


def child_interrupt_at_release(name: str, seed: int) -> dict[str, Any]:
    """A KeyboardInterrupt raised (``AtSignalPoint``) at the first instant the ledger look
    made by an ``empty()`` on a full 4 MiB store -- giving the loans kept for reuse back to
    make room -- has taken a loan out of its tables and not yet given it back: that
    ``empty()`` raises it; then, with the sender closed, every array dropped and every key
    deleted, the store must be empty (a hold kept until close is acceptable, not longer)."""
    from shmchannel.backends.loans import Ledger

    ds = DataSystem(ADDRESS)
    sender = DataSender(ADDRESS, dataset_name=name)
    ledger = sender._endpoint._ledger  # (private: the predicate looks at its tables)
    errors: list[str] = []

    def interrupt() -> None:
        raise KeyboardInterrupt

    point = AtSignalPoint(Ledger.tidy.__code__, _popped_not_released(ledger), interrupt)
    _keep_one(sender, ledger, FULL_LOAN, np.uint8)
    keys = _fill(ds, FULL_LOAN + 4096)
    outcome = "returned"
    try:
        loan = point.run(sender.empty, FULL_LOAN + 4096, np.uint8, timeout=5)  # not the kept size: store full
        del loan
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"empty() raised {error_text(exc)}")
    if not point.fired:
        errors.append(f"set-up: no instant of {point.points} had a loan taken out and not given back (the kept "
                      "loan was given back by the daemon thread first? run again)")
    _delete(ds, keys)
    gc.collect()
    errors += close_all(sender)
    emptied, stats = wait_store_empty(ds, 5.0)
    if emptied is None:
        errors.append(f"5 s after close() (every array dropped, every key deleted) the store still holds "
                      f"{stats['objects']} objects, {stats['used']} bytes")
    errors += close_all(ds)
    return {"outcome": outcome, "errors": errors, "emptied_after_close_s": emptied,
            "connections": connections_left()}


def child_interrupt_before_unlisting(name: str, seed: int) -> dict[str, Any]:
    """A KeyboardInterrupt (``AtSignalPoint``) at the first instant the ledger look made by
    an ``empty()`` on a full 4 MiB store has given a kept loan back but not yet taken its
    start out of the ledger's sorted list. Afterwards every loan must still be sent as
    documented: referenced (the receiver's view is the loan's memory) and read-only once
    sent -- also a new loan the store lends at the same offset (the ledger's sorted list
    then holds the old loan's start next to the new one's, and a look must pass over it)."""
    from shmchannel.backends.loans import Ledger

    ds = DataSystem(ADDRESS)
    sender = DataSender(ADDRESS, dataset_name=name)
    receiver = DataReceiver(ADDRESS, dataset_name=name)
    ledger = sender._endpoint._ledger  # (private: the predicate looks at its tables)
    errors: list[str] = []
    _keep_one(sender, ledger, FULL_LOAN, np.uint8)
    keys = _fill(ds, FULL_LOAN + 4096)

    def unlisting(frame: Any) -> bool:
        given = frame.f_locals.get("given") or 0
        return given >= 1 and any(k not in ledger._loans for _, k in ledger._starts)

    def interrupt() -> None:
        raise KeyboardInterrupt

    point = AtSignalPoint(Ledger.tidy.__code__, unlisting, interrupt)
    try:
        loan = point.run(sender.empty, FULL_LOAN + 4096, np.uint8, timeout=5)  # not the kept size: store full
        del loan
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 -- reported
        errors.append(f"empty() raised {error_text(exc)}")
    if not point.fired:
        errors.append(f"set-up: no instant of {point.points} had a loan given back and still listed (the kept "
                      "loan was given back by the daemon thread first? run again)")
    _delete(ds, keys)
    stale = [offset for offset, key in ledger._starts if key not in ledger._loans]
    held: list[np.ndarray] = []  # loans kept, so that the next one takes other memory
    for i in range(3):  # until the store lends the old loan's offset again
        loan = sender.empty(FULL_LOAN, np.uint8)
        loan[:] = i
        at = loan.ctypes.data - ledger._base
        if at in stale or i == 2:
            held.clear()  # room for a copy, should the send make one
            address = loan.ctypes.data
            try:
                sender.send(loan, timeout=5)
                got = receiver.recv(timeout=5)
            except Exception as exc:  # noqa: BLE001 -- reported
                errors.append(f"the send of a loan at offset {at} raised {error_text(exc)}")
                break
            if loan.flags.writeable or got.ctypes.data != address:
                errors.append(f"a loan at offset {at} (key {next(k for k, x in ledger._loans.items() if x.offset == at)!r}; the ledger lists "
                              f"starts {ledger._starts}) was {'copied' if got.ctypes.data != address else 'referenced'}"
                              f" by its send and is {'still writable' if loan.flags.writeable else 'read-only'} after it")
            if not (got == i).all():
                errors.append("the receiver got other bytes")
            if at not in stale:
                errors.append(f"set-up: no new loan landed at the old one's offset {stale} (last at {at})")
            del got, loan
            break
        held.append(loan)
        del loan
    held.clear()
    errors += close_all(receiver, sender)
    emptied, stats = wait_store_empty(ds, 5.0)
    if emptied is None:
        errors.append(f"5 s after close() the store still holds {stats['objects']} objects, {stats['used']} bytes")
    errors += close_all(ds)
    return {"errors": errors, "emptied_after_close_s": emptied}


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "stream": child_stream, "full_store": child_full_store, "reentrant": child_reentrant,
    "reentrant_at": child_reentrant_at, "interrupt_at_release": child_interrupt_at_release,
    "interrupt_before_unlisting": child_interrupt_before_unlisting,
}


def child_main() -> None:
    """A child's entry point (``python -c CHILD <scenario> <json params>``)."""
    from tests.interrupted.main import run_child

    run_child(SCENARIOS)


# -- the parent's side ----------------------------------------------------------------------------


class LoanChild(Child):
    """A child running one scenario of this file (tests/interrupted_harness.py's Child, with
    this file's entry point and its own hang limit)."""

    def __init__(self, tmp_path: Path, scenario: str, seed: int, hang: float, label: str = "", **params: Any) -> None:
        import subprocess

        self.scenario, self.seed = label or scenario, seed
        stem = re.sub(r"[^\w.-]", "_", self.scenario)
        self._out, self._err = tmp_path / f"{stem}.out", tmp_path / f"{stem}.err"
        self.deadline = time.monotonic() + hang
        self.hang = hang
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD, scenario, json.dumps({"seed": seed, **params})],
                                         cwd=ROOT, stdout=out, stderr=err)

    def summary(self) -> dict[str, Any]:
        try:
            return super().summary()
        except AssertionError as exc:
            raise AssertionError(str(exc).replace("after 45.0 s", f"after {self.hang} s")) from None


@pytest.fixture
def seed() -> int:
    """The seed of the random instants and sizes (``SHMCHANNEL_TEST_SEED`` replays one)."""
    value = int(os.environ.get(SEED_ENV) or random.randrange(1 << 32))
    print(f"seed {value}: replay with {SEED_ENV}={value}")
    return value


def child_problems(summary: dict[str, Any]) -> list[str]:
    problems = [f"in the child: {w}" for w in summary.get("warnings", [])]
    if summary.get("connections"):
        problems.append(f"{summary['connections']} connections to the broker left open by the child")
    return problems


def fail_on(child: LoanChild, summary: dict[str, Any], problems: list[str]) -> None:
    figures = {k: v for k, v in summary.items()
               if isinstance(v, (int, float, dict)) and not isinstance(v, bool) and k != "got"}
    print(f"{child.where()} {figures}")
    assert not problems, "\n".join([f"{child.where()} {figures}", *problems])


def _receive_shard(child: LoanChild, name: str, shard: int, got: list[int], problems: list[str]) -> None:
    """Receive shard ``shard`` of the child's channel until the end of the stream, checking
    each object, and each of the last 3 again before it is dropped (a thread's target)."""
    receiver = None
    while receiver is None:
        try:
            receiver = DataReceiver(ADDRESS, dataset_name=name, shard_id=shard, wait=0.5)
        except ChannelNotFound:
            if child.exited() or time.monotonic() > child.deadline:
                problems.append(f"shard {shard}: the child never created {name}")
                return
    held: collections.deque[tuple[tuple[int, int], Any]] = collections.deque()
    n = 0
    with receiver:
        quiet = 0
        while len(problems) < 10:
            try:
                obj = receiver.recv(timeout=1)
            except ChannelClosed:
                break
            except ChannelTimeout:
                quiet = quiet + 1 if child.exited() else 0
                if quiet >= 2 or time.monotonic() > child.deadline:
                    problems.append(f"shard {shard}: no end of stream ({len(got)} objects received)")
                    break
                continue
            except ChannelError as exc:
                problems.append(f"shard {shard}: recv after {len(got)} objects raised {error_text(exc)}")
                break
            what, problem = check_part(obj, shard)
            if problem is not None:
                problems.append(f"shard {shard} object {n}: {problem}")
            else:
                got.append(what[1])  # type: ignore[index]
                held.append((what, obj))  # type: ignore[arg-type]
            n += 1
            del obj
            while len(held) > 3:
                before, old = held.popleft()
                again, problem = check_part(old, shard)
                if again != before:
                    problems.append(f"shard {shard}: object {before} changed while this receiver held it: {problem}")
                del old
        for before, old in held:
            again, problem = check_part(old, shard)
            if again != before:
                problems.append(f"shard {shard}: object {before} changed while this receiver held it: {problem}")
        held.clear()
        old = None


def test_empty_send_and_send_key_interrupted_at_random_deliver_every_seq_whole(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """Scenario 1: empty / send of a loan (bare or in a dict) / DataSystem.put + send_key on a
    2-shard channel, interrupted every 1-4 ms and retried: both shards get the same seqs,
    every send that returned arrives, in order, whole (each shard exactly its rows, still
    whole while the receiver holds it), twice only if its send was interrupted; after the
    sender's close() and everything dropped, the store empties."""
    name = "loanintr-stream"
    child = LoanChild(tmp_path, "stream", seed, hang=40.0, name=name, low=0.001, high=0.004,
                      seconds=SECONDS)
    got: list[list[int]] = [[], []]
    problems: list[str] = []
    readers = [threading.Thread(target=_receive_shard, args=(child, name, s, got[s], problems), daemon=True)
               for s in (0, 1)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(max(1.0, child.deadline - time.monotonic() + 5))
    summary = child.summary()
    if any(reader.is_alive() for reader in readers):
        problems.append("a receiving thread did not end")
    problems += summary["problems"] + child_problems(summary)
    for shard in (0, 1):
        problems += [f"shard {shard}: {p}" for p in sends_problems(summary, got[shard])]
    if got[0] != got[1]:
        first = next((i for i, (a, b) in enumerate(zip(*got)) if a != b), min(map(len, got)))
        problems.append(f"the shards got different seqs: {len(got[0])} and {len(got[1])} objects, first "
                        f"difference at object {first}: {got[0][first:first + 3]} vs {got[1][first:first + 3]}")
    problems += store_problems()
    if not problems and summary["raised"] < 30:
        problems.append(f"only {summary['raised']} interrupts landed: the test proved little")
    fail_on(child, summary, problems)


def test_empty_waiting_on_a_full_store_interrupted_or_timing_out_leaks_nothing(
    small_store: int, tmp_path: Path, seed: int
) -> None:
    """Scenario 2: on a 4 MiB store filled with DataSystem objects, empty(1 MiB) waits for
    room; an interrupt ends the wait, or room comes at a random instant racing it, or a
    timeout of 0-30 ms races the room: each round lends the array or raises what it should,
    and once the sender is closed and everything dropped the store is empty."""
    child = LoanChild(tmp_path, "full_store", seed, hang=40.0, name="loanintr-full", low=0.002,
                      high=0.02, rounds=40)
    summary = child.summary()
    problems = summary["problems"] + child_problems(summary)
    problems += store_problems()
    outcomes = summary["outcomes"]
    waits = sum(n for what, n in outcomes.items() if what.endswith("interrupted"))
    if not problems and waits < 15:
        problems.append(f"only {waits} waits were interrupted: the test proved little")
    fail_on(child, summary, problems)


def test_empty_on_a_full_store_times_out_naming_the_store(small_store: int) -> None:
    """empty(timeout=t) on a full 4 MiB store raises StoreFullTimeout (a TimeoutError and a
    StoreFull) after about t, saying the store is full and how much was asked; timeout=0
    at once; nothing is held after, and after close the store is empty."""
    with DataSystem(ADDRESS) as ds, DataSender(ADDRESS, dataset_name="loanintr-timeout") as sender:
        keys = _fill(ds, FULL_LOAN)
        try:
            objects = ds.stats().objects
            for timeout in (0.3, 0.0):
                start = time.monotonic()
                with pytest.raises(StoreFullTimeout) as info:
                    sender.empty(FULL_LOAN, np.uint8, timeout=timeout)
                took = time.monotonic() - start
                assert isinstance(info.value, TimeoutError) and isinstance(info.value, StoreFull)
                assert timeout <= took < timeout + 2.0, f"timeout={timeout} raised after {took:.2f} s"
                message = str(info.value)
                assert "store" in message and str(FULL_LOAN) in message, f"the message names neither: {message!r}"
                assert ds.stats().objects == objects, "a timed-out empty() left an object in the store"
        finally:
            _delete(ds, keys)
        loan = sender.empty(FULL_LOAN, np.uint8, timeout=5)  # room again: lent
        loan[:] = 1
        del loan
    with DataSystem(ADDRESS) as ds:
        emptied, stats = wait_store_empty(ds, 10.0)
        assert emptied is not None, f"after close the store still holds {stats}"


def test_interrupt_as_the_ledger_gives_a_loan_back_leaks_nothing_after_close(small_store: int, tmp_path: Path) -> None:
    """A KeyboardInterrupt at the instant a ledger look (in an empty() on a full store)
    has taken a kept loan out of its tables and not yet given it back: after close, with
    everything dropped, the store is empty and the child's connection is gone."""
    child = LoanChild(tmp_path, "interrupt_at_release", 0, hang=15.0, name="loanintr-release")
    summary = child.summary()
    problems = summary["errors"] + child_problems(summary) + store_problems()
    if summary["outcome"] != "KeyboardInterrupt" and not problems:
        problems.append(f"the empty() the interrupt was raised in {summary['outcome']}")
    fail_on(child, summary, problems)


def test_interrupt_as_the_ledger_unlists_a_loan_leaves_later_loans_referenced(small_store: int,
                                                                              tmp_path: Path) -> None:
    """A KeyboardInterrupt just after a ledger look gave a loan back, before it took the
    loan's start out of its sorted list: later loans -- one lent at the same offset under a
    key sorting before the old one included -- are still referenced by a send, not
    copied, and read-only after it (DataSender.empty's documented behaviour)."""
    child = LoanChild(tmp_path, "interrupt_before_unlisting", 0, hang=15.0, name="loanintr-unlist")
    summary = child.summary()
    problems = summary["errors"] + child_problems(summary) + store_problems()
    fail_on(child, summary, problems)


def test_signal_handler_calling_empty_send_and_send_key_at_random_instants(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """Scenario 3: a SIGALRM handler every 2-8 ms calls empty (dropping or sending the loan)
    or send_key on the sender whose empty/send/send_key the main thread is inside: each
    call works or raises ReentrantCall at once (never hangs, never another error); the main
    thread's sends and the handler's that returned arrive once each, in order, whole, the
    same on both shards; after close the store empties."""
    child = LoanChild(tmp_path, "reentrant", seed, hang=15.0, name="loanintr-reenter", low=0.002,
                      high=0.008, seconds=SECONDS)
    summary = child.summary()
    problems = summary["errors"] + child_problems(summary)
    got = [[tuple(x) for x in shard] for shard in summary["got"]]
    mains = [[x for x in shard if x[0] in (LOAN, KEY)] for shard in got]
    alarms = [[x for x in shard if x[0] in (ALARM_LOAN, ALARM_KEY)] for shard in got]
    main_sent = [tuple(x) for x in summary["main_sent"]]
    alarm_sent = [tuple(x) for x in summary["alarm_sent"]]
    for shard in (0, 1):
        if mains[shard] != main_sent:
            first = next((k for k, (a, b) in enumerate(zip(mains[shard], main_sent)) if a != b),
                         min(len(mains[shard]), len(main_sent)))
            problems.append(f"shard {shard}: the main thread's {len(main_sent)} sends arrived as "
                            f"{len(mains[shard])} objects, first difference at object {first}")
        if alarms[shard] != alarm_sent:
            problems.append(f"shard {shard}: the handler's sends {alarm_sent[:10]}... arrived as {alarms[shard][:10]}...")
    problems += store_problems()
    if not problems and len(alarm_sent) + sum(summary["reentrant"].values()) + summary["alarm_lent"] < 20:
        problems.append("fewer than 20 handler calls: the test proved little")
    summary["alarm_sends"] = len(alarm_sent)
    summary["main_sends"] = len(main_sent)
    fail_on(child, summary, problems)


@pytest.mark.parametrize("case", sorted(CASES))
def test_signal_handler_calling_the_sender_inside_its_ledger(broker: int, tmp_path: Path, case: str) -> None:
    """The handler of scenario 3 at exact instants of the main thread's empty(): inside the
    sender's ledger look (tidy), which holds the ledger's lock -- while it loops over the
    loans, and just after it processed a dropped array. The handler's empty / send_key
    works or raises ReentrantCall; the main thread's empty() works; nothing hangs; after
    close the store empties."""
    child = LoanChild(tmp_path, "reentrant_at", 0, hang=8.0, label=f"reentrant_at {case}",
                      name="loanintr-at", case=case)
    summary = child.summary()
    problems = summary["errors"] + child_problems(summary) + store_problems()
    fail_on(child, summary, problems)
