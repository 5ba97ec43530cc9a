"""A recv run on the receiver's worker thread, which may outlive the call that started
it: for ``arecv`` (asyncio), and for the main thread's calls on a backend whose own steps
an interrupt could cut (Ray). Its object goes to the next recv if its caller gave up
(aio.py)."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, AsyncIterator

from .. import aio
from ..broker import rules
from ..errors import ChannelClosed, ChannelTimeout
from .checks import check_timeout
from .endpoint import ChannelEnd, Turn


class WorkerRecv(ChannelEnd):
    """The worker side of a DataReceiver (whose state this is)."""

    _worker: aio.Worker | None
    _slot: collections.deque[Pending]
    _main_waits: bool
    _async_lock: asyncio.Lock | None
    _turn: Turn
    _shard_id: int

    def _take(self, endpoint: Any, timeout: float | None, peek: bool) -> Any:
        raise NotImplementedError

    def _from_main(self, endpoint: Any, timeout: float | None, keep: bool) -> Any:
        """recv/peek of the main thread, run on the worker: an interrupt ends only the wait.
        An interrupted recv stays pending, and its object is the next recv's; an
        interrupted peek took nothing."""
        self._refuse_reentry("a recv/peek", "it would take that call's object")
        try:
            self._main_waits = True
            if keep and not self._slot:
                return aio.result(self._worker_thread().submit(self._take, endpoint, timeout, True))
            return self._pending_result(endpoint, timeout, keep)
        finally:
            self._main_waits = False

    def _worker_thread(self) -> aio.Worker:
        if self._worker is None:
            self._worker = aio.Worker(f"shmchannel {self!r}")
        return self._worker

    def _pending_result(self, endpoint: Any, timeout: float | None, keep: bool) -> Any:
        """The object of the recv pending on the worker, one started now if none is.

        A recv started here ends within ``timeout`` itself, and is waited for to its end.
        One started by an earlier call is waited for at most ``timeout``; if it timed out
        by that call's timeout, a new one gets what is left of ours."""
        deadline = None if timeout is None else time.monotonic() + timeout
        left = timeout  # as asked, the first time: a TimeoutError names it
        while True:
            mine = not self._slot
            if mine:
                self._slot.append(Pending(endpoint, left))
            job = self._slot[0]
            self._worker_thread().submit(self._run_pending)  # again if already: it then does nothing
            try:
                obj = aio.result(job, None if mine else left_of(deadline), lambda: self._expired(timeout))
            except BaseException as exc:
                # Only the recv's own error is its outcome: an interrupt while taking its
                # object leaves that object pending, for the next call.
                if job.done() and job.exception() is exc and self._slot and self._slot[0] is job:
                    del self._slot[0]
                    stale = not mine and isinstance(exc, ChannelTimeout)
                    if stale and (deadline is None or deadline > time.monotonic()):
                        left = left_of(deadline)
                        continue
                raise
            if keep:
                return obj
            # Whoever takes the job out of the slot has its object (no call between the test
            # and the del: no other thread runs in between); another caller waiting on the
            # same job (another thread, arecv) goes round for the next.
            if self._slot and self._slot[0] is job:
                del self._slot[0]
                return obj
            left = left_of(deadline)

    def _run_pending(self) -> None:
        """On the worker: run the pending recv, unless it ran (or runs) already."""
        if not self._slot:
            return
        job = self._slot[0]
        if not job.start():
            return
        try:
            job.set_result(self._take(job.endpoint, job.timeout, False))
        except BaseException as exc:  # its waiter raises it
            job.set_exception(exc)

    async def arecv(self, timeout: float | None = None) -> Any:
        """``recv`` for asyncio: waits without blocking the event loop.

        Example::

            rx = DataReceiver("127.0.0.1", dataset_name="events", wait=30)
            first = await rx.arecv(timeout=5)
            async for batch in rx:      # until the sender closes the channel
                await handle(batch)

        Cancelling it (or its ``timeout`` running out) loses nothing: the object that then
        arrives is the one the next ``recv``/``arecv`` returns, or ``close`` puts it back.
        Concurrent ``arecv`` calls on one receiver are served one after the other.

        Raises: as ``recv``.
        """
        self._live()
        timeout = check_timeout("timeout", timeout)
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:
            if not self._slot:
                endpoint = self._live()  # again: close() may have run while we waited for the lock
                # Prefetched: no wait, so no thread hop -- but not in the main thread, where
                # an interrupt could come between taking the object and returning it.
                if not aio.in_main_thread() and endpoint.buffered() and self._turn.try_take():
                    try:
                        return endpoint.recv(0, False)  # prefetched: no wait, so no thread hop
                    finally:
                        self._turn.give()
                self._slot.append(Pending(endpoint, None))
            job = self._slot[0]
            self._worker_thread().submit(self._run_pending)
            try:
                obj = await aio.wait_for(job, timeout, lambda: self._expired(timeout))
            except asyncio.CancelledError:
                raise  # the job stays pending: its object goes to the next call
            except BaseException as exc:
                if job.done() and job.exception() is exc and self._slot and self._slot[0] is job:
                    del self._slot[0]
                raise
            if self._slot and self._slot[0] is job:
                del self._slot[0]
            return obj

    def __aiter__(self) -> AsyncIterator[Any]:
        """``async for obj in receiver``: ``arecv`` until the end of the stream.

        Example::

            async for batch in receiver:
                await handle(batch)
        """
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        while True:
            try:
                obj = await self.arecv()
            except ChannelClosed:
                return
            yield obj
            del obj  # as in __iter__

    def _expired(self, timeout: float | None) -> ChannelTimeout:
        return rules.recv_timeout(False, timeout, self._shard_id, f"{self._namespace}/{self._dataset_name}")


class Pending(aio.Job):
    """A recv for the worker to run (``_run_pending``), and then its outcome."""

    __slots__ = ("endpoint", "timeout")

    def __init__(self, endpoint: Any, timeout: float | None) -> None:
        super().__init__()
        self.endpoint, self.timeout = endpoint, timeout


def left_of(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
