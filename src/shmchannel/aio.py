"""asyncio support: ``arecv``/``asend`` run the blocking calls on a thread of the endpoint.

Each endpoint gets one worker thread (on first use) that runs its calls in order, so the
event loop never blocks and objects keep their order. The thread is a daemon: a recv
blocked until the receiver closes must not hold up interpreter exit, as the threads of a
``ThreadPoolExecutor`` would.

A recv cannot be withdrawn once it runs. When the coroutine awaiting it gives up (its
timeout, or a cancel) the recv stays *pending*: its object is the oldest not handed out, so
the next ``recv``/``arecv`` returns it, and ``close`` gives it back to the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from typing import Any, Callable

from .errors import ChannelTimeout

Job = concurrent.futures.Future


class Worker:
    """A daemon thread running one endpoint's calls, in the order they were submitted."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Job, Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        job: Job = concurrent.futures.Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._jobs.put((job, fn, args))
        return job

    def stop(self) -> None:
        """Let the thread exit after the calls already submitted."""
        with self._lock:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread = None

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, fn, args = item
            if not job.set_running_or_notify_cancel():
                continue
            try:
                job.set_result(fn(*args))
            except BaseException as exc:  # the awaiting side raises it
                job.set_exception(exc)
            del job, fn, args, item  # a received object must not outlive its hand-over here


async def wait_for(job: Job, timeout: float | None = None, expired: Callable[[], ChannelTimeout] | None = None) -> Any:
    """The result of ``job``, awaited without blocking the loop; the job goes on running if
    the wait is cancelled or ``timeout`` runs out (``expired()`` is raised then: it must be
    given with a timeout)."""
    waiter = asyncio.wrap_future(job)
    # Retrieve its outcome even when nobody awaits it any more: no "exception never retrieved".
    waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        return await asyncio.wait_for(asyncio.shield(waiter), timeout)
    except asyncio.TimeoutError:
        if waiter.done() or expired is None:  # the job's own TimeoutError
            return waiter.result()
        raise expired() from None


def result(job: Job, timeout: float | None, expired: Callable[[], ChannelTimeout]) -> Any:
    """The result of ``job`` for a blocking caller."""
    try:
        return job.result(timeout)
    except concurrent.futures.TimeoutError:
        if job.done():  # the job's own TimeoutError
            return job.result()
        raise expired() from None


__all__ = ["Job", "Worker", "result", "wait_for"]
