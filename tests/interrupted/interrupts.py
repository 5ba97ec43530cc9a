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

    Sources: ``every()`` a thread sends the main thread ``signum`` every ``low..high`` s;
    ``timer()`` an interval timer (SIGALRM) re-armed at random from its handler;
    ``on_kick()`` one signal ``low..high`` s after each ``kick()``.
    """

    def __init__(self, seed: int, low: float, high: float, signum: int = signal.SIGINT) -> None:
        self._rng = random.Random(seed)
        self._low, self._high, self._signum = low, high, signum
        self._main = threading.get_ident()
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
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
        def run() -> None:
            while not self._stop.wait(self._rng.uniform(self._low, self._high)):
                signal.pthread_kill(self._main, self._signum)

        return self._start(run)

    def on_kick(self) -> Interrupts:
        def run() -> None:
            while self._kick.wait() and not self._stop.is_set():
                self._kick.clear()
                time.sleep(self._rng.uniform(self._low, self._high))
                signal.pthread_kill(self._main, self._signum)

        return self._start(run)

    def kick(self) -> None:
        self._kick.set()

    def timer(self) -> Interrupts:
        self._timer = True
        signal.setitimer(signal.ITIMER_REAL, self._rng.uniform(self._low, self._high))
        return self

    def _start(self, run: Callable[[], None]) -> Interrupts:
        self._thread = threading.Thread(target=run, name="interrupter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if self._thread is not None:
            self._thread.join(10)

    def counts(self) -> dict[str, int]:
        return {"raised": self.raised, "dropped": self.dropped}
