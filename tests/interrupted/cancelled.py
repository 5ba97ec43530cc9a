"""asyncio: arecv and asend cancelled at random instants (no signals: a cancel is the
interrupt an async caller makes)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np

from shmchannel import ChannelClosed, DataReceiver, DataSender

from ..conftest import ADDRESS
from .common import SECONDS, close_all, error_text, seq_of


async def _cancel_at_random(task: asyncio.Future[Any], rng: random.Random) -> None:
    """Let ``task`` start, then cancel it at once, or after up to 0.3 ms or 2 ms."""
    await asyncio.sleep(0)
    delay = rng.choice((0.0, rng.uniform(0, 0.0003), rng.uniform(0, 0.002)))
    if delay:
        await asyncio.sleep(delay)
    task.cancel()


def child_arecv(name: str, seed: int, sizes: list[int], prefetch: int | None) -> dict[str, Any]:
    """arecv cancelled at a random instant (sometimes a plain recv instead), until the end of
    the stream."""
    rng = random.Random(seed)

    async def main() -> dict[str, Any]:
        receiver = DataReceiver(ADDRESS, dataset_name=name, wait=30,
                                **({} if prefetch is None else {"prefetch": prefetch}))
        got: list[int] = []
        corrupt: list[str] = []
        errors: list[str] = []
        cancelled = 0
        try:
            while len(corrupt) < 10:
                try:
                    if rng.random() < 0.8:
                        task = asyncio.ensure_future(receiver.arecv(timeout=30))
                        await _cancel_at_random(task, rng)
                        try:
                            obj = await task
                        except asyncio.CancelledError:
                            cancelled += 1
                            continue
                    else:
                        obj = receiver.recv(timeout=30)
                except ChannelClosed:
                    break
                seq, problem = seq_of(obj, sizes)
                del obj
                if problem is not None:
                    corrupt.append(problem)
                else:
                    got.append(seq)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 -- reported
            errors.append(f"arecv/recv after {len(got)} objects raised {error_text(exc)}")
        errors += close_all(receiver)
        return {"got": got, "corrupt": corrupt, "errors": errors, "cancelled": cancelled}

    return asyncio.run(main())


def child_asend(name: str, seed: int, sizes: list[int]) -> dict[str, Any]:
    """asend cancelled at a random instant for SECONDS; each cancelled one is still sent (as
    documented), so no seq is sent twice."""
    rng = random.Random(seed)

    async def main() -> dict[str, Any]:
        sender = DataSender(ADDRESS, dataset_name=name, max_queue_size=4)
        cancelled = seq = 0
        error = None
        deadline = time.monotonic() + SECONDS
        try:
            while time.monotonic() < deadline:
                task = asyncio.ensure_future(sender.asend(np.full(rng.choice(sizes), seq), timeout=30))
                await _cancel_at_random(task, rng)  # it started: the object was handed over
                seq += 1
                try:
                    await task
                except asyncio.CancelledError:
                    cancelled += 1
        except Exception as exc:  # noqa: BLE001 -- reported
            error = f"asend of seq {seq} raised {error_text(exc)}"
        return {"sent": seq, "interrupted": [], "cancelled": cancelled, "error": error,
                "close_errors": close_all(sender)}

    return asyncio.run(main())
