"""Calls run on a thread of the endpoint: those of asyncio (``arecv``/``asend``), and the
main thread's ``send``/``recv``/``peek``.

Each endpoint gets one worker thread (on first use) that runs its calls in order, so the
event loop never blocks and objects keep their order. The thread is a daemon: a recv
blocked until the receiver closes must not hold up interpreter exit, as the threads of a
``ThreadPoolExecutor`` would.

The main thread is the only one an interrupt reaches (KeyboardInterrupt, a signal
handler's exception), and at any instruction: in the middle of taking an object from a
buffer, say, after which it is lost. On the worker the call runs to its end whatever
happens to its caller, whose wait is all an interrupt can cut short (issue 13).

A recv cannot be withdrawn once it runs. When the caller awaiting it gives up (an
interrupt, its timeout, a cancel) the recv stays *pending*: its object is the oldest not
handed out, so the next ``recv``/``arecv`` returns it, and ``close`` gives it back to the
queue.
"""

from __future__ import annotations

import _thread
import asyncio
import os
import queue
import threading
import time
from typing import Any, Callable

from .errors import ChannelTimeout

#: How long an interrupted send waits for its withdrawal (``withdraw``) before it leaves
#: the send to finish, or time out, on its own.
WITHDRAW_TIMEOUT = 5.0


class Job:
    """A call handed to a worker, and then its outcome.

    Not a ``concurrent.futures.Future``: its methods take a ``threading.Condition``, whose
    ``__enter__`` is Python code, so an interrupt between taking the lock and entering the
    with block keeps the lock for good (the worker then hangs on ``set_result``). Here the
    caller's side reads plain attributes and waits on a lock held until done, whose
    acquire is one C call."""

    __slots__ = ("_gate", "_lock", "_started", "_done", "_value", "_error", "_callbacks")

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._gate.acquire()
        self._lock = threading.Lock()
        self._started = self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Job], None]] = []

    def done(self) -> bool:
        return self._done

    def running(self) -> bool:
        return self._started and not self._done

    def start(self) -> bool:
        """Mark it running (the worker's thread only); False if it ran already."""
        if self._started:
            return False
        self._started = True
        return True

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        with self._lock:
            self._value, self._error, self._done = value, error, True
            callbacks, self._callbacks = self._callbacks, []
        self._gate.release()
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[Job], None]) -> None:
        """Call ``callback(job)`` once done: in the worker's thread, or here if done now."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until done, at most ``timeout`` seconds; whether it is."""
        if self._done:
            return True
        if self._gate.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._gate.release()  # done for every later wait too
            return True
        return self._done

    def exception(self) -> BaseException | None:
        """The error it raised (None: none, or not done)."""
        return self._error

    def result(self) -> Any:
        """Its value, or its error raised (call it once done)."""
        if self._error is not None:
            raise self._error
        return self._value


class Worker:
    """A daemon thread running one endpoint's calls, in the order they were submitted.

    Started with ``_thread.start_new_thread``, one C call: ``Thread.start`` waits on an
    Event, whose Condition an interrupt can leave locked (see ``Job``), and the new
    thread then never runs."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Job, Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._started = False
        self._pid = os.getpid()
        self._ident: int | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        job = Job()
        with self._lock:
            if self._pid != os.getpid():  # forked: the thread stayed in the parent
                self._pid, self._started, self._jobs = os.getpid(), False, queue.SimpleQueue()
            if not self._started:
                self._started = True
                _thread.start_new_thread(self._run, ())
            self._jobs.put((job, fn, args))
        return job

    @property
    def ident(self) -> int | None:
        """The thread's id (None before it runs)."""
        return self._ident

    def stop(self) -> None:
        """Let the thread exit after the calls already submitted."""
        with self._lock:
            if self._started:
                self._jobs.put(None)
                self._started = False

    def _run(self) -> None:
        self._ident = threading.get_ident()
        while (item := self._jobs.get()) is not None:
            job, fn, args = item
            if job.start():
                try:
                    job.set_result(fn(*args))
                except BaseException as exc:  # the awaiting side raises it
                    job.set_exception(exc)
            del job, fn, args, item  # a received object must not outlive its hand-over here


async def wait_for(job: Job, timeout: float | None = None, expired: Callable[[], ChannelTimeout] | None = None) -> Any:
    """The result of ``job``, awaited without blocking the loop; the job goes on running if
    the wait is cancelled or ``timeout`` runs out (``expired()`` is raised then: it must be
    given with a timeout)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def settle() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def wake(_: Job) -> None:
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the loop is closed: nobody waits

    job.add_done_callback(wake)
    try:
        await asyncio.wait_for(asyncio.shield(waiter), timeout)
    except asyncio.TimeoutError:
        if not job.done():
            assert expired is not None
            raise expired() from None
    return job.result()


_main_ident = threading.main_thread().ident


def _forked() -> None:
    global _main_ident
    _main_ident = threading.main_thread().ident  # the thread that forked (threading updated it first)


os.register_at_fork(after_in_child=_forked)


def in_main_thread() -> bool:
    """Whether this thread is the one interrupts are raised in (asked once per call: kept
    in a global, renewed in a forked child)."""
    return _thread.get_ident() == _main_ident


def withdraw(job: Job, withdraw_once: Callable[[], None], timeout: float) -> None:
    """After its caller was interrupted: end ``job`` by withdrawing what it waits for
    (``withdraw_once``, repeated: it may not wait yet), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not job.done() and time.monotonic() < deadline:
        withdraw_once()
        job.wait(0.02)


def result(job: Job, timeout: float | None = None, expired: Callable[[], ChannelTimeout] | None = None) -> Any:
    """The result of ``job`` for a blocking caller: ``expired()`` is raised if it is not
    done within ``timeout`` (which needs ``expired``)."""
    if not job.wait(timeout):
        assert expired is not None
        raise expired()
    return job.result()


__all__ = ["Job", "Worker", "in_main_thread", "result", "wait_for", "withdraw"]
