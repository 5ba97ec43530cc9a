"""The parent side of tests/test_api_interrupt_random.py: start a child, read what it sent
and its summary, and turn both into a list of problems for the test to assert empty.

Each interrupted loop runs in a child interpreter (``sys.executable -c CHILD``, the
programs in tests/interrupted/), so no SIGINT reaches pytest; it is killed (after dumping
its stacks) if it outlives ``HANG``, and prints a JSON summary as the last line of its
stdout. Every failure names the seed: ``SHMCHANNEL_TEST_SEED=<seed>`` replays it (as far
as timing allows).
"""

from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from shmchannel import (
    ChannelClosed, ChannelError, ChannelNotFound, ChannelTimeout, DataReceiver, DataSender, DataSystem,
)
from shmchannel.testing import wait_until

from .conftest import ADDRESS
from .interrupted.common import error_text, seq_of
from .test_api_threads import Background

HANG = 45.0  # seconds a child may run before it counts as hung (killed, the test fails)
SEED_ENV = "SHMCHANNEL_TEST_SEED"
ROOT = Path(__file__).resolve().parents[1]
CHILD = "from tests.interrupted.main import main; main()"


class Child:
    """A child interpreter running one scenario, its output in files (a full pipe never
    stalls it); ``summary()`` waits for it within HANG of its start."""

    def __init__(self, tmp_path: Path, scenario: str, seed: int, **params: Any) -> None:
        self.scenario, self.seed = scenario, seed
        self._out, self._err = tmp_path / f"{scenario}.out", tmp_path / f"{scenario}.err"
        self.deadline = time.monotonic() + HANG
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", CHILD, scenario, json.dumps({"seed": seed, **params})],
                                         cwd=ROOT, stdout=out, stderr=err)

    def where(self) -> str:
        return f"[{self.scenario}, seed {self.seed}: replay with {SEED_ENV}={self.seed}]"

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def stderr(self) -> str:
        return self._err.read_text()[-6000:]

    def summary(self) -> dict[str, Any]:
        try:
            self.proc.wait(max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack
            try:
                wait_until(lambda: "Current thread" in self.stderr(), 5, "the child's stacks")
            finally:
                self.proc.kill()
                self.proc.wait(10)
            raise AssertionError(
                f"{self.where()} hung: still running after {HANG} s, killed; its stacks:\n{self.stderr()}"
            ) from None
        assert self.proc.returncode == 0, f"{self.where()} exited with {self.proc.returncode}:\n{self.stderr()}"
        lines = self._out.read_text().splitlines()
        assert lines, f"{self.where()} printed no summary:\n{self.stderr()}"
        summary: dict[str, Any] = json.loads(lines[-1])
        return summary


def _open_receiver(child: Child, name: str) -> DataReceiver:
    """A receiver of the channel the child creates (as soon as it exists)."""
    while True:
        try:
            return DataReceiver(ADDRESS, dataset_name=name, wait=0.5)
        except ChannelNotFound:
            assert not child.exited(), f"{child.where()} exited before creating {name}:\n{child.stderr()}"
            assert time.monotonic() < child.deadline, f"{child.where()} did not create {name} within {HANG} s"


def receive_all(child: Child, name: str, sizes: Any) -> tuple[list[int], list[str]]:
    """Everything the child sends, received here until the end of the stream: (the seqs,
    problems: corrupt objects, errors, no end of stream)."""
    got: list[int] = []
    problems: list[str] = []
    with _open_receiver(child, name) as receiver:
        quiet = 0  # timeouts in a row since the child exited
        while len(problems) < 10:
            try:
                obj = receiver.recv(timeout=1)
            except ChannelClosed:
                return got, problems
            except ChannelTimeout:
                quiet = quiet + 1 if child.exited() else 0
                if quiet >= 2:
                    problems.append(f"no end of stream: the sender exited, {len(got)} objects received")
                    break
                if time.monotonic() > child.deadline:
                    problems.append(f"no end of stream within {HANG} s, {len(got)} objects received")
                    break
                continue
            except ChannelError as exc:
                problems.append(f"recv after {len(got)} objects raised {error_text(exc)}")
                break
            seq, problem = seq_of(obj, sizes)
            del obj
            if problem is not None:
                problems.append(f"object {len(got)} received: {problem}")
            else:
                got.append(seq)  # type: ignore[arg-type]
    return got, problems


def store_problems() -> list[str]:
    """What is left in the store once everything was received, deleted and closed."""
    with DataSystem(ADDRESS) as ds:
        try:
            wait_until(lambda: (s := ds.stats()).objects == 0 and s.used == 0, 10, "the store to empty")
        except AssertionError:
            stats = ds.stats()
            return [f"the store did not empty: {stats.objects} objects, {stats.used} bytes used"]
    return []


def common_problems(summary: dict[str, Any]) -> list[str]:
    """What any child reports left behind: warnings it saw, connections it left open."""
    problems = [f"in the child: {w}" for w in summary.get("warnings", [])]
    if summary.get("connections"):
        problems.append(f"{summary['connections']} connections to the broker left open by the child")
    return problems


def sends_problems(summary: dict[str, Any], got: list[int], exactly_once: bool = False) -> list[str]:
    """Every send that returned arrived, in order, whole; a seq arrives more than once only
    if its send was interrupted (once more per interrupt), or never with ``exactly_once``."""
    problems = [f"in the child: {e}" for e in [summary["error"], *summary["close_errors"]] if e]
    sent = summary["sent"]
    retries = collections.Counter(summary["interrupted"])
    missing = sorted(set(range(sent)) - set(got))
    if missing:
        problems.append(f"{len(missing)} of the {sent} sends that returned never arrived: seqs {missing[:12]}...")
    descents = [(i, got[i - 1], got[i]) for i in range(1, len(got)) if got[i] < got[i - 1]]
    if descents:
        problems.append(f"out of order: {len(descents)} times, first at object {descents[0][0]}: "
                        f"seq {descents[0][2]} after {descents[0][1]}")
    # The send in progress when the loop stopped (it failed, or was interrupted as time ran
    # out) may have gone through.
    limit = sent + (1 if summary["error"] or sent in retries else 0)
    strays = sorted({s for s in got if not 0 <= s < limit})
    if strays:
        problems.append(f"seqs never sent arrived: {strays[:12]}")
    extra = {s: n for s, n in collections.Counter(got).items() if n > 1 + (0 if exactly_once else retries[s])}
    if extra:
        problems.append(f"{len(extra)} seqs arrived more often than their sends were tried, e.g. "
                        f"{sorted(extra.items())[:8]} (seq: times; interrupted sends: "
                        f"{[(s, retries[s]) for s in sorted(extra)[:8]]})")
    return problems


def recvs_problems(summary: dict[str, Any], count: int) -> list[str]:
    """Every object arrived, in order apart from redeliveries: a run going back to an earlier
    seq and on from there, only right after an interrupted call."""
    problems = [f"in the child: {c}" for c in summary["corrupt"]] + [f"in the child: {e}" for e in summary["errors"]]
    got, after = summary["got"], summary["after"]
    top, redelivered, disorder = -1, 0, 0
    for i, (s, interrupted) in enumerate(zip(got, after)):
        if s == top + 1 or (i and s == got[i - 1] + 1 and s <= top):
            pass  # the next new one, or the next of a redelivered run
        elif interrupted and 0 <= s <= top:
            pass  # a redelivered run starts after an interrupt
        else:
            disorder += 1
            if disorder == 1:
                problems.append(f"object {i} received is seq {s} after seq {got[i - 1] if i else None} "
                                f"(highest so far {top}, interrupted just before: {interrupted})")
        redelivered += s <= top
        top = max(top, s)
    if disorder > 1:
        problems.append(f"{disorder} objects in all came out of order")
    missing = sorted(set(range(count)) - set(got))
    if missing:
        problems.append(f"{len(missing)} of the {count} objects sent never arrived: seqs {missing[:12]}...")
    if redelivered:
        print(f"{redelivered} objects redelivered after interrupts")
    return problems


def _produce(sender: DataSender, count: int, sizes: tuple[int, ...], seed: int) -> None:
    """Send ``np.full(n, i)`` for i < count, n drawn from ``sizes``; then end the stream."""
    rng = random.Random(seed)
    for i in range(count):
        sender.send(np.full(rng.choice(sizes), i), timeout=30)
    sender.close()


def receiving_child(tmp_path: Path, scenario: str, seed: int, name: str, count: int, sizes: tuple[int, ...],
                     **params: Any) -> tuple[Child, dict[str, Any]]:
    """Run a receiving child on channel ``name`` while a thread here sends ``count`` objects
    of ``sizes`` on it and then ends the stream; return the child and its summary."""
    sender = DataSender(ADDRESS, dataset_name=name)
    producer = Background(lambda: _produce(sender, count, sizes, seed), "producer")
    try:
        child = Child(tmp_path, scenario, seed, name=name, sizes=list(sizes), **params)
        summary = child.summary()
    finally:
        sender.close()  # ends a send stuck because the child stopped receiving
    try:
        producer.result(30)
    except ChannelError as exc:
        summary["errors"].append(f"the sender here raised {error_text(exc)} (the child stopped receiving)")
    return child, summary


def enough(problems: list[str], count: int, minimum: int, what: str) -> None:
    """Note a run that went well but proved little: fewer than ``minimum`` interrupts hit."""
    if not problems and count < minimum:
        problems.append(f"only {count} {what}: the test proved little")


def assert_none(child: Child, summary: dict[str, Any], problems: list[str]) -> None:
    """Print the child's figures (seen with ``-s``, or on failure); fail with ``problems``."""
    figures = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"{child.where()} {figures}")
    assert not problems, "\n".join([f"{child.where()} {figures}", *problems])

