"""Streaming feature engineering with pandas: raw click-log chunks in, model-ready batches out.

State is kept across chunks, as a stream needs it:

- ``RunningStats``: mean and variance of each numeric feature over every row seen so far
  (Chan's parallel update), to normalize without a pass over the whole data set;
- ``WindowCounts``: per user and per item, views and clicks in the last 10 minutes of event
  time, counting only events strictly before each row (no label leaks into its own
  features). The events of the last 10 minutes are carried over to the next chunk.

Hashing (``pd.util.hash_pandas_object``, a keyed SipHash, stable across processes and runs)
maps ids of unbounded cardinality into a fixed number of buckets, so the model's size is
fixed before any id is seen; low-cardinality fields use a fixed vocabulary.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from schema import CATEGORIES, COUNTRIES, DENSE, DEVICES, EVENT_ID, LABEL, POSITIONS, SPARSE

EPOCH = pd.Timestamp(0, tz="UTC")
WINDOW_MS = 10 * 60 * 1000
PRIOR_CTR, PRIOR_VIEWS = 0.1, 5.0  # smoothing of windowed click rates toward a prior


class RunningStats:
    """Mean and variance of several columns, updated one chunk at a time."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns
        self.count = 0
        self.mean = np.zeros(len(columns))
        self.m2 = np.zeros(len(columns))  # sum of squared deviations from the mean

    def update(self, values: np.ndarray) -> None:
        n = len(values)
        if n == 0:
            return
        mean = values.mean(axis=0)
        m2 = ((values - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total

    def normalize(self, values: np.ndarray) -> np.ndarray:
        """``(values - mean) / std``, clipped to +-5 standard deviations."""
        std = np.sqrt(self.m2 / max(self.count - 1, 1)) + 1e-6
        return np.clip((values - self.mean) / std, -5, 5)


class WindowCounts:
    """Views and clicks per key in the ``window_ms`` before each event, across chunks."""

    def __init__(self, window_ms: int = WINDOW_MS) -> None:
        self.window_ms = window_ms
        self.keys = np.empty(0, np.int64)
        self.times = np.empty(0, np.int64)
        self.clicks = np.empty(0, np.int64)

    def __call__(self, keys: np.ndarray, times: np.ndarray, clicks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Views and clicks of each event's key in ``[t - window, t)``; then remember the events."""
        all_keys = np.concatenate([self.keys, keys])
        all_times = np.concatenate([self.times, times])
        all_clicks = np.concatenate([self.clicks, clicks])
        # Sort by (key, time); then one key's events in a time range are one contiguous run,
        # found by binary search on a combined (key code, time) value.
        codes = pd.factorize(all_keys)[0].astype(np.int64)
        rel = all_times - all_times.min()
        combined = codes * (int(rel.max()) + self.window_ms + 1) + rel
        order = np.argsort(combined, kind="stable")
        ordered = combined[order]
        clicks_before = np.concatenate([[0], np.cumsum(all_clicks[order])])
        mine = order >= len(self.keys)  # rows of this chunk, in sorted order
        hi = np.searchsorted(ordered, ordered[mine], "left")  # excludes the event itself (and ties)
        lo = np.searchsorted(ordered, ordered[mine] - self.window_ms, "left")
        views = np.empty(len(keys), np.int64)
        hits = np.empty(len(keys), np.int64)
        views[order[mine] - len(self.keys)] = hi - lo
        hits[order[mine] - len(self.keys)] = clicks_before[hi] - clicks_before[lo]
        keep = all_times >= all_times.max() - self.window_ms
        self.keys, self.times, self.clicks = all_keys[keep], all_times[keep], all_clicks[keep]
        return views, hits


def hash_bucket(values: pd.Series | pd.DataFrame, buckets: int) -> np.ndarray:
    """The hashing trick: each value (or row) to one of ``buckets`` ids."""
    return (pd.util.hash_pandas_object(values, index=False).to_numpy() % np.uint64(buckets)).astype(np.int64)


def vocab_id(values: pd.Series, vocabulary: list[str]) -> np.ndarray:
    """1 + the position of each value in ``vocabulary``; 0 for a value not in it."""
    return pd.Categorical(values, categories=vocabulary).codes.astype(np.int64) + 1


def smoothed_logit(clicks: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Log-odds of a click rate pulled toward the prior when there are few views."""
    ctr = (clicks + PRIOR_CTR * PRIOR_VIEWS) / (views + PRIOR_VIEWS)
    return np.log(ctr / (1 - ctr))


class FeaturePipeline:
    """Raw chunk -> DataFrame of ``schema.COLUMNS``; keeps the state a stream needs."""

    def __init__(self) -> None:
        self.stats = RunningStats(DENSE)
        self.user_window = WindowCounts()
        self.item_window = WindowCounts()

    def __call__(self, raw: pd.DataFrame) -> pd.DataFrame:
        raw = raw.sort_values("ts", kind="stable")
        times = ((pd.to_datetime(raw["ts"], utc=True) - EPOCH) // pd.Timedelta(milliseconds=1)).to_numpy(np.int64)
        clicked = raw["clicked"].to_numpy(np.int64)
        user_views, user_clicks = self.user_window(raw["user_id"].to_numpy(np.int64), times, clicked)
        item_views, item_clicks = self.item_window(raw["item_id"].to_numpy(np.int64), times, clicked)
        dense = np.column_stack(
            [
                np.log1p(raw["price"].to_numpy(np.float64)),
                np.log1p(user_views),
                smoothed_logit(user_clicks, user_views),
                np.log1p(item_views),
                smoothed_logit(item_clicks, item_views),
            ]
        )
        self.stats.update(dense)
        dense = self.stats.normalize(dense).astype(np.float32)
        position = raw["position"].to_numpy(np.int64)
        sparse = {
            "user_bucket": hash_bucket(raw["user_id"], SPARSE["user_bucket"]),
            "item_bucket": hash_bucket(raw["item_id"], SPARSE["item_bucket"]),
            "category_x_device": hash_bucket(raw[["category", "device"]], SPARSE["category_x_device"]),
            "device": vocab_id(raw["device"], DEVICES),
            "country": vocab_id(raw["country"], list(COUNTRIES)),
            "category": vocab_id(raw["category"], CATEGORIES),
            "position": np.where((position >= 1) & (position <= POSITIONS), position, 0),
            "hour": raw["hour"].to_numpy(np.int64) % 24 + 1,
        }
        out = pd.DataFrame(
            {EVENT_ID: raw[EVENT_ID].to_numpy(np.int64), LABEL: clicked.astype(np.float32), **sparse}
        )
        for i, name in enumerate(DENSE):
            out[name] = dense[:, i]
        return out
