"""The outside world: a click-through log that lands in a directory, one CSV chunk at a time.

Each row is an impression: a user saw an item at some position of a result page, on some
device, at some time, and clicked it or not. Whether they clicked is drawn from a hidden
logistic model (user propensity, item quality, position, relative price, device, local
hour of day, country), so there is something to learn and a model can beat the base rate.
Nothing but the CSV files leaves this module: the producer sees only the log.

A chunk is written under a hidden temporary name and then renamed (atomic on one file
system), so a reader never sees half a file; ``_DONE`` marks the end of the stream.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from schema import CATEGORIES, COUNTRIES, DEVICES, POSITIONS, say

DONE = "_DONE"
START = pd.Timestamp("2026-11-02 06:00", tz="UTC")
#: Event time covered by one chunk: the log is replayed faster than it happened.
CHUNK_SPAN_S = 60.0


@dataclass
class World:
    """Hidden per-user and per-item facts; the log shows ids, never these."""

    user_weight: np.ndarray  # cumulative activity (a few users are very active)
    user_country: np.ndarray
    user_device: np.ndarray
    user_propensity: np.ndarray
    item_weight: np.ndarray  # cumulative popularity
    item_category: np.ndarray
    item_price: np.ndarray
    item_quality: np.ndarray
    relative_price: np.ndarray  # log price minus its category's mean
    country_effect: np.ndarray

    @classmethod
    def make(cls, rng: np.random.Generator, users: int = 20_000, items: int = 5_000) -> World:
        cats = rng.integers(0, len(CATEGORIES), items)
        cat_price = rng.uniform(2.0, 5.0, len(CATEGORIES))  # mean log price per category
        log_price = cat_price[cats] + rng.normal(0, 0.5, items)
        share = np.array([8, 2, 3, 3, 2, 1, 1, 4, 2, 2, 1, 1], float)  # visitors per country
        return cls(
            user_weight=np.cumsum(1 / np.arange(1, users + 1) ** 0.9),
            user_country=rng.choice(len(COUNTRIES), users, p=share / share.sum()),
            user_device=rng.choice(len(DEVICES), users, p=[0.35, 0.45, 0.2]),
            user_propensity=rng.normal(0, 0.8, users),
            item_weight=np.cumsum(1 / np.arange(1, items + 1) ** 1.0),
            item_category=cats,
            item_price=np.exp(log_price).round(2),
            item_quality=rng.normal(0, 0.7, items),
            relative_price=log_price - cat_price[cats],
            country_effect=rng.normal(0, 0.25, len(COUNTRIES)),
        )

    def impressions(self, rng: np.random.Generator, n: int, first_id: int, start: pd.Timestamp) -> pd.DataFrame:
        """``n`` impressions in time order from ``start`` on, with ids from ``first_id``."""
        user = np.searchsorted(self.user_weight, rng.uniform(0, self.user_weight[-1], n))
        item = np.searchsorted(self.item_weight, rng.uniform(0, self.item_weight[-1], n))
        position = rng.integers(1, POSITIONS + 1, n)
        # Users mostly stay on their own device.
        device = np.where(rng.random(n) < 0.85, self.user_device[user], rng.integers(0, len(DEVICES), n))
        ts = start + pd.to_timedelta(np.sort(rng.uniform(0, CHUNK_SPAN_S * 1000, n)).astype(np.int64), unit="ms")
        country = self.user_country[user]
        offsets = np.array(list(COUNTRIES.values()))
        hour = (ts.hour.to_numpy() + offsets[country]) % 24
        logit = (
            -1.9
            + self.user_propensity[user]
            + self.item_quality[item]
            - 0.3 * (position - 1)
            - 0.8 * self.relative_price[item]
            + np.array([0.2, 0.0, -0.35])[device]
            + 0.4 * np.cos(2 * np.pi * (hour - 21) / 24)  # evenings click more
            + self.country_effect[country]
        )
        clicked = rng.random(n) < 1 / (1 + np.exp(-logit))
        return pd.DataFrame(
            {
                "event_id": np.arange(first_id, first_id + n),
                "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "user_id": user + 100_000,
                "item_id": item + 5_000_000,
                "category": np.array(CATEGORIES)[self.item_category[item]],
                "price": self.item_price[item],
                "position": position,
                "device": np.array(DEVICES)[device],
                "country": np.array(list(COUNTRIES))[country],
                "hour": hour,
                "clicked": clicked.astype(np.int8),
            }
        )


def write_atomically(path: Path, frame: pd.DataFrame) -> None:
    """Write ``frame`` as CSV to a hidden temporary name, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def generate(directory: str, chunks: int, rows_per_chunk: int, interval: float, seed: int) -> dict[str, float]:
    """Write ``chunks`` CSV chunks of ``rows_per_chunk`` events into ``directory``, one every
    ``interval`` seconds, then ``_DONE``; return what was written."""
    rng = np.random.default_rng(seed)
    world = World.make(rng)
    out = Path(directory)
    began = time.monotonic()
    clicks = 0
    for k in range(chunks):
        start = START + pd.Timedelta(seconds=k * CHUNK_SPAN_S)
        frame = world.impressions(rng, rows_per_chunk, k * rows_per_chunk, start)
        clicks += int(frame["clicked"].sum())
        write_atomically(out / f"chunk-{k:05d}.csv", frame)
        time.sleep(max(0.0, began + (k + 1) * interval - time.monotonic()))  # the next chunk's arrival
    total = chunks * rows_per_chunk
    write_atomically(out / DONE, pd.DataFrame({"events": [total]}))
    elapsed = time.monotonic() - began
    rate = clicks / max(total, 1)
    say(f"[events]   wrote {chunks} chunks, {total:,} events (click rate {rate:.1%}) in {elapsed:.1f} s")
    return {"events": total, "clicks": clicks, "seconds": elapsed}
