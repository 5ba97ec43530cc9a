"""Interrupts at random instants, over many iterations: whatever a blocking call was doing
when a signal (or an asyncio cancel) hit it, nothing sent is lost or corrupted, nothing
arrives twice beyond what at-least-once allows, the endpoint stays usable, nothing leaks
(store empty, no connection left, no ResourceWarning) and nothing hangs.

Each interrupted loop runs in a child interpreter, so no SIGINT reaches pytest: the loops
are in tests/interrupted/ (not collected), starting one and checking what it reports is
tests/interrupted_harness.py. A child that outlives ``HANG`` is killed after dumping its
stacks. The instants and sizes come from a seed named in every failure:
``SHMCHANNEL_TEST_SEED=<seed>`` replays it (as far as timing allows).

In a child, a signal raises KeyboardInterrupt only inside the shmchannel call a loop makes
(tests/interrupted/interrupts.py), at most once per call, never in the loop's own code: so
the loop's own state (which seq was sent, what was received) is exact -- as for a user
whose Ctrl-C lands in the library, which is what the library must survive.

Before the fix (the issue's report): a send interrupted mid-write left half a frame on the
socket, so receivers got arrays whose tail held the next frame's header JSON, the broker
then dropped the sender, and sends that had returned were never delivered.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from .interrupted.common import ARENA, INLINE, LARGE_INLINE, MEDIUM, SMALL
from .interrupted_harness import (
    SEED_ENV, Child, assert_none, common_problems, enough, receive_all, receiving_child, recvs_problems,
    sends_problems, store_problems,
)


@pytest.fixture
def seed() -> int:
    """The seed of the random instants and sizes (``SHMCHANNEL_TEST_SEED`` replays one)."""
    value = int(os.environ.get(SEED_ENV) or random.randrange(1 << 32))
    print(f"seed {value}: replay with {SEED_ENV}={value}")
    return value


@pytest.mark.parametrize(
    ("elements", "inline_threshold"),
    [(INLINE, None), (LARGE_INLINE, 1 << 20), (ARENA, None)],
    ids=["60KB-inline", "600KB-inline", "2MB-arena"],
)
def test_send_interrupted_by_sigint_every_10_to_20_ms_delivers_every_seq_whole(
    broker: int, tmp_path: Path, seed: int, elements: int, inline_threshold: int | None
) -> None:
    """The issue's loop: a send interrupted by SIGINT (every 10-20 ms) and retried with the
    same seq; every seq arrives whole and in order, twice only if its send was interrupted,
    and the stream ends."""
    child = Child(tmp_path, "send", seed, name="intr-send", sizes=[elements], inline_threshold=inline_threshold,
                  max_queue_size=10, low=0.010, high=0.020)
    got, problems = receive_all(child, "intr-send", (elements,))
    summary = child.summary()
    problems += sends_problems(summary, got) + common_problems(summary) + store_problems()
    enough(problems, summary["raised"], 20, "interrupts landed in a send")
    assert_none(child, summary, problems)


def test_send_on_a_full_queue_interrupted_at_random_delivers_every_seq_whole(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """Sends of mixed sizes (inline and arena) on a queue of 2, often waiting for room or for
    their arena block, interrupted every 1-5 ms: the same guarantees."""
    sizes = [100, INLINE, MEDIUM, ARENA]
    child = Child(tmp_path, "send", seed, name="intr-full", sizes=sizes, inline_threshold=None, max_queue_size=2,
                  low=0.001, high=0.005)
    got, problems = receive_all(child, "intr-full", sizes)
    summary = child.summary()
    problems += sends_problems(summary, got) + common_problems(summary) + store_problems()
    enough(problems, summary["raised"], 50, "interrupts landed in a send")
    assert_none(child, summary, problems)


@pytest.mark.parametrize("prefetch", [None, 1], ids=["prefetch-default", "prefetch-1"])
@pytest.mark.parametrize(
    ("mode", "sizes", "low", "high"),
    [("every10", (SMALL,), 0.0, 0.002), ("timer", (SMALL,), 0.001, 0.006), ("timer", (SMALL, MEDIUM, ARENA), 0.001, 0.006)],
    ids=["sigint-after-every-10th", "itimer-random", "itimer-random-arena"],
)
def test_recv_interrupted_and_called_again_gets_every_object_in_order(
    broker: int, tmp_path: Path, seed: int, mode: str, sizes: tuple[int, ...], low: float, high: float,
    prefetch: int | None,
) -> None:
    """20,000 objects (3,000 of mixed sizes) received by a recv loop that a signal
    interrupts (after every 10th object, or at random instants) and that simply calls recv
    again: every object arrives, whole, in order apart from redeliveries right after an
    interrupt; the store ends empty; no call fails. Ten times issue 13's counts: on the
    direct path a recv takes microseconds, and fewer interrupts would land in one."""
    count = 20000 if sizes == (SMALL,) else 3000
    child, summary = receiving_child(tmp_path, "recv", seed, "intr-recv", count, sizes,
                                      prefetch=prefetch, mode=mode, low=low, high=high)
    problems = recvs_problems(summary, count) + common_problems(summary) + store_problems()
    enough(problems, summary["raised"], 30 if sizes == (SMALL,) else 15, "interrupts landed in a recv")
    assert_none(child, summary, problems)


def test_peek_and_recv_interrupted_at_random_agree_and_lose_nothing(broker: int, tmp_path: Path, seed: int) -> None:
    """peek then recv, each interrupted at random and called again: recv returns what peek
    showed, every object arrives once in order, and the store ends empty (peeked arena
    objects included)."""
    count = 6000
    child, summary = receiving_child(tmp_path, "peek", seed, "intr-peek", count, (SMALL, MEDIUM),
                                      low=0.0005, high=0.004)
    problems = recvs_problems(summary, count) + common_problems(summary) + store_problems()
    enough(problems, summary["raised"], 30, "interrupts landed in a peek or recv")
    assert_none(child, summary, problems)


def test_get_queue_interrupted_at_random_answers_right_and_stays_in_step(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """get_queue of a sender and a receiver interrupted at random: every answer is the
    queue's, and afterwards both ends send, receive and end the stream in step."""
    child = Child(tmp_path, "get_queue", seed, name="intr-look", low=0.0005, high=0.003)
    summary = child.summary()
    problems = summary["errors"] + common_problems(summary) + store_problems()
    enough(problems, summary["raised"], 30, "interrupts landed in a get_queue")
    assert_none(child, summary, problems)


def test_sender_constructor_interrupted_at_random_leaks_nothing(broker: int, tmp_path: Path, seed: int) -> None:
    """DataSender(...) interrupted at random: the ones made work, the interrupted ones leave
    no connection and no ResourceWarning behind."""
    child = Child(tmp_path, "sender_ctor", seed, name="intr-ctor", low=0.0005, high=0.004)
    summary = child.summary()
    problems = summary["errors"] + common_problems(summary) + store_problems()
    enough(problems, summary["raised"], 30, "interrupts landed in a DataSender()")
    assert_none(child, summary, problems)


def test_receiver_constructor_interrupted_at_random_leaks_and_takes_nothing(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """DataReceiver(...) interrupted at random and called again: the receiver made gets the
    object just sent (an interrupted one took nothing), nothing leaks."""
    child = Child(tmp_path, "receiver_ctor", seed, name="intr-rctor", low=0.0005, high=0.004)
    summary = child.summary()
    problems = summary["errors"] + common_problems(summary) + store_problems()
    enough(problems, summary["raised"], 30, "interrupts landed in a DataReceiver()")
    assert_none(child, summary, problems)


@pytest.mark.parametrize("target", ["put", "get"])
def test_data_system_call_interrupted_at_random_leaves_the_store_empty(
    broker: int, tmp_path: Path, seed: int, target: str
) -> None:
    """DataSystem.put (or get) of inline and arena objects interrupted at random: every object
    read back whole, and once each is deleted the store is empty (an interrupted put leaves
    no object nobody has the key of, an interrupted get no hold)."""
    child = Child(tmp_path, "data_system", seed, target=target, low=0.0005, high=0.004)
    summary = child.summary()
    problems = summary["errors"] + common_problems(summary)
    if summary["objects"] or summary["used"]:
        problems.append(f"after deleting every key it got, the store holds {summary['objects']} objects, "
                        f"{summary['used']} bytes")
    problems += store_problems()
    enough(problems, summary["raised"], 30, f"interrupts landed in a {target}")
    assert_none(child, summary, problems)


def test_close_interrupted_at_random_still_ends_the_stream_and_gives_back(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """A receiver's close() and the sender's close() interrupted at random, then called again:
    both are closed, prefetched objects went back (at most the last received one again), and
    the stream ends."""
    child = Child(tmp_path, "close", seed, name="intr-close", low=0.0005, high=0.003)
    summary = child.summary()
    problems = summary["errors"] + common_problems(summary) + store_problems()
    enough(problems, summary["raised"], 20, "interrupts landed in a close()")
    assert_none(child, summary, problems)


@pytest.mark.parametrize("prefetch", [None, 1], ids=["prefetch-default", "prefetch-1"])
def test_arecv_cancelled_at_random_loses_nothing(broker: int, tmp_path: Path, seed: int, prefetch: int | None) -> None:
    """arecv cancelled at random instants (mixed with plain recv): every object arrives
    exactly once, whole and in order, as the README promises; the store ends empty."""
    count = 800
    child, summary = receiving_child(tmp_path, "arecv", seed, "intr-arecv", count, (SMALL, MEDIUM), prefetch=prefetch)
    summary["after"] = [False] * len(summary["got"])  # no redelivery allowed
    problems = recvs_problems(summary, count) + common_problems(summary) + store_problems()
    enough(problems, summary["cancelled"], 15, "arecv calls were cancelled")
    assert_none(child, summary, problems)


def test_asend_cancelled_at_random_sends_each_object_once(broker: int, tmp_path: Path, seed: int) -> None:
    """asend cancelled at random instants: each object handed over is sent anyway (as
    documented), exactly once and in order; the store ends empty."""
    sizes = [SMALL, MEDIUM]
    child = Child(tmp_path, "asend", seed, name="intr-asend", sizes=sizes)
    got, problems = receive_all(child, "intr-asend", sizes)
    summary = child.summary()
    problems += sends_problems(summary, got, exactly_once=True) + common_problems(summary) + store_problems()
    enough(problems, summary["cancelled"], 30, "asend calls were cancelled")
    assert_none(child, summary, problems)


def test_signal_handler_sending_on_a_busy_sender_at_random_instants_never_hangs(
    broker: int, tmp_path: Path, seed: int
) -> None:
    """The random-timing variant of tests/test_api_threads.py's re-entry tests: a SIGALRM
    handler every 10-30 ms sends on the sender the main thread sends on (queue of 4, a
    reader thread): each of its sends works or raises ReentrantCall at once; every send
    that returned arrives once, in its order."""
    child = Child(tmp_path, "handler_sends", seed, name="intr-reenter", low=0.010, high=0.030)
    summary = child.summary()
    problems = summary["errors"] + common_problems(summary) + store_problems()
    got = [tuple(x) for x in summary["got"]]
    mains = [i for who, i in got if who == "main"]
    alarms = [i for who, i in got if who == "alarm"]
    if mains != list(range(summary["main_sent"])):
        first = next((k for k, i in enumerate(mains) if i != k), len(mains))
        problems.append(f"the main thread's {summary['main_sent']} sends arrived as {len(mains)} objects, "
                        f"first difference at object {first}")
    if alarms != summary["alarm_sent"]:
        problems.append(f"the handler's sends {summary['alarm_sent'][:20]}... arrived as {alarms[:20]}...")
    slow = [t for t in summary["reentrant"] if t > 1.0]
    if slow:
        problems.append(f"ReentrantCall took up to {max(slow):.2f} s to come, not at once")
    enough(problems, len(summary["alarm_sent"]) + len(summary["reentrant"]), 20, "handler calls")
    summary["alarm_sends"] = len(summary["alarm_sent"])
    summary["reentrant_calls"] = len(summary["reentrant"])
    assert_none(child, summary, problems)

