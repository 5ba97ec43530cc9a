"""A child's entry point: run one scenario (a ``child_*`` loop) and print its summary, with
the warnings and unraisable exceptions the child saw, as the last line of stdout."""

from __future__ import annotations

import collections
import faulthandler
import gc
import json
import re
import signal
import sys
import warnings
from typing import Any, Callable

from .cancelled import child_arecv, child_asend
from .endpoints import child_close, child_data_system, child_get_queue, child_receiver_ctor, child_sender_ctor
from .streams import child_handler_sends, child_peek, child_recv, child_send


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    f.__name__[len("child_"):]: f
    for f in (child_send, child_recv, child_peek, child_get_queue, child_sender_ctor, child_receiver_ctor,
              child_data_system, child_close, child_arecv, child_asend, child_handler_sends)
}


def main() -> None:
    """Entry point of a child: ``python -c CHILD <scenario> <json params>`` (CHILD is in
    tests/interrupted_harness.py); prints the summary."""
    run_child(SCENARIOS)


def run_child(scenarios: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """Run ``scenarios[argv[1]](**json(argv[2]))`` and print its summary, with the warnings
    and unraisable exceptions seen, as the last line (tests/test_loans_interrupt.py too)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks before killing
    scenario, params = sys.argv[1], json.loads(sys.argv[2])
    unraisable: list[str] = []
    sys.unraisablehook = lambda u: unraisable.append(f"unraisable in {u.object!r}: {u.exc_type.__name__}: {u.exc_value}")
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        summary = scenarios[scenario](**params)
        gc.collect()
    seen = collections.Counter(re.sub(r"fd=\d+", "fd=N", text) for text in
                               [f"{w.category.__name__}: {w.message}" for w in warned] + unraisable)
    summary["warnings"] = [f"{text} (x{n})" for text, n in seen.most_common(5)]
    print(json.dumps(summary), flush=True)
