"""Signals at random instants, turned into KeyboardInterrupt only inside a shmchannel call.

The handler raises KeyboardInterrupt only while a call made through ``Interrupts.call``
runs, only in a frame of that call (never in the test's own code: any module of this
package, so the loops, their lambdas and ``call`` itself) and at most once per call; a
signal landing elsewhere is counted and dropped. So every KeyboardInterrupt a loop sees
came from inside the shmchannel call it retries, and the loop's own state (which seq was
sent, what was received) is exact -- as for a user whose Ctrl-C lands in the library, which
is what the library must survive.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any, Callable

# The folder the frames of this package's modules carry: all of them are the test's own code.
_OURS = os.path.dirname((lambda: None).__code__.co_filename)


def _ours(frame: Any) -> bool:
    """Whether ``frame`` runs code of this package (not the library's, nor the stdlib's)."""
    return os.path.dirname(frame.f_code.co_filename) == _OURS


class Interrupts:
    """Signals at random instants, turned into KeyboardInterrupt inside ``call`` only.

    Sources: ``every()`` a forked process sends ``signum`` every ``low..high`` s;
    ``timer()`` an interval timer (SIGALRM) re-armed at random from its handler;
    ``on_kick()`` one signal ``low..high`` s after each ``kick()`` (a one-shot timer).

    Not a thread of this process: a thread runs only when it gets the GIL, which a call
    holding it throughout (a send on the direct path: a copy and a few atomic operations)
    gives up only where it blocks -- so every signal would land in a blocking wait, and
    none in the code between.
    """

    def __init__(self, seed: int, low: float, high: float, signum: int = signal.SIGINT) -> None:
        self._rng = random.Random(seed)
        self._low, self._high, self._signum = low, high, signum
        self._stop = threading.Event()
        self._child = 0
        self._kicks = False
        self._timer = False
        self.armed = False
        self.raised = 0  # KeyboardInterrupts raised inside a call
        self.dropped = 0  # signals that landed outside one
        signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self._timer and not self._stop.is_set():
            signal.setitimer(signal.ITIMER_REAL, self._rng.uniform(self._low, self._high))
        if self.armed and frame is not None and not _ours(frame):
            self.armed = False  # once per call: the call's own clean-up runs undisturbed
            self.raised += 1
            raise KeyboardInterrupt
        self.dropped += 1

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, which a signal may interrupt (KeyboardInterrupt)."""
        self.armed = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.armed = False

    def every(self) -> Interrupts:
        parent, delays = os.getpid(), [self._rng.uniform(self._low, self._high) for _ in range(1 << 16)]
        pid = os.fork()
        if pid == 0:  # the interrupter: sleeps and signals, nothing else (no Python state is used)
            try:
                for delay in delays:
                    time.sleep(delay)
                    os.kill(parent, self._signum)
            finally:
                os._exit(0)
        self._child = pid
        return self

    def on_kick(self) -> Interrupts:
        signal.signal(signal.SIGALRM, self._handler)
        self._kicks = True
        return self

    def kick(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, self._rng.uniform(self._low, self._high) or 1e-6)

    def timer(self) -> Interrupts:
        self._timer = True
        signal.setitimer(signal.ITIMER_REAL, self._rng.uniform(self._low, self._high))
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._timer or self._kicks:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if self._child:
            os.kill(self._child, signal.SIGKILL)
            os.waitpid(self._child, 0)
            self._child = 0

    def counts(self) -> dict[str, int]:
        return {"raised": self.raised, "dropped": self.dropped}
