"""`make demo`: a feature-engineering process streams DataFrames to two trainer processes.

The producer generates a synthetic click log, engineers features with pandas and sends
each batch through a 2-shard channel on the embedded default backend (the broker starts by
itself): the first half of every batch goes to trainer 0, the second half to trainer 1.
Each trainer fits a logistic-regression click model on what arrives and prints its
progress. The demo stops the broker at the end if it was the one that started it.
"""

from __future__ import annotations

import multiprocessing
import sys
import time

import numpy as np
import pandas as pd

import shmchannel
from shmchannel import DataReceiver, DataSender

ADDRESS = "127.0.0.1"
CHANNEL = "demo-clicks"
BATCHES = 40
ROWS = 100_000  # per batch, split 50,000 + 50,000
FEATURES = ["price_z", "log_dwell", "hour_sin", "hour_cos", "user_clicks_z", "is_mobile", "item_pop_z"]


def say(line: str) -> None:
    """One write per line, so that lines of the three processes never interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def click_log(rng: np.random.Generator, batch: int) -> pd.DataFrame:
    """One batch of raw events: who saw what, when, on which device, for how long."""
    start = pd.Timestamp("2026-11-01", tz="UTC") + pd.Timedelta(minutes=10 * batch)
    return pd.DataFrame(
        {
            "ts": start + pd.to_timedelta(np.sort(rng.integers(0, 600, ROWS)), unit="s"),
            "user_id": rng.zipf(1.6, ROWS) % 50_000,
            "item_id": rng.zipf(1.3, ROWS) % 20_000,
            "device": pd.Categorical(rng.choice(["ios", "android", "web"], ROWS, p=[0.4, 0.4, 0.2])),
            "price": rng.lognormal(3.0, 1.0, ROWS).round(2),
            "dwell_ms": rng.exponential(8_000, ROWS).astype(np.int64),
        }
    )


def features(raw: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Feature engineering: normalization, cyclic time, per-user and per-item counts."""
    hour = raw["ts"].dt.hour + raw["ts"].dt.minute / 60
    user_clicks = raw.groupby("user_id")["item_id"].transform("size")
    item_pop = raw.groupby("item_id")["user_id"].transform("size")
    out = pd.DataFrame(
        {
            "user_bucket": (raw["user_id"] * 2654435761 % 1024).astype(np.int32),
            "price_z": (np.log1p(raw["price"]) - 3.0) / 1.0,
            "log_dwell": np.log1p(raw["dwell_ms"]) / 10,
            "hour_sin": np.sin(2 * np.pi * hour / 24),
            "hour_cos": np.cos(2 * np.pi * hour / 24),
            "user_clicks_z": (user_clicks - user_clicks.mean()) / (user_clicks.std() + 1e-9),
            "is_mobile": (raw["device"] != "web").astype(np.float64),
            "item_pop_z": (np.log1p(item_pop) - np.log1p(item_pop).mean()) / (np.log1p(item_pop).std() + 1e-9),
            "device": raw["device"],
            "ts": raw["ts"],
        }
    )
    logit = 1.5 * out["log_dwell"] - 0.8 * out["price_z"] + 0.5 * out["is_mobile"] - 1.0
    out["clicked"] = (rng.random(ROWS) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    return out


def producer() -> None:
    rng = np.random.default_rng(7)
    start = time.perf_counter()
    with DataSender(ADDRESS, dataset_name=CHANNEL, num_shards=2, max_queue_size=4) as sender:
        for batch in range(BATCHES):
            sender.send(features(click_log(rng, batch), rng))
    say(f"[producer] sent {BATCHES} batches of {ROWS:,} rows in {time.perf_counter() - start:.1f} s")


def trainer(shard: int) -> None:
    weights, bias, lr = np.zeros(len(FEATURES)), 0.0, 0.5
    rows = batches = nbytes = 0
    wait = 0.0
    start = time.perf_counter()
    with DataReceiver(ADDRESS, dataset_name=CHANNEL, shard_id=shard, wait=60) as receiver:
        while True:
            t = time.perf_counter()
            try:
                df = receiver.recv(timeout=60)
            except shmchannel.ChannelClosed:
                break
            wait += time.perf_counter() - t
            x = df[FEATURES].to_numpy()
            y = df["clicked"].to_numpy()
            p = 1 / (1 + np.exp(-(x @ weights + bias)))
            loss = -np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12))
            weights -= lr * x.T @ (p - y) / len(y)
            bias -= lr * float(np.mean(p - y))
            rows += len(df)
            batches += 1
            nbytes += int(df.memory_usage(index=True, deep=False).sum())
            if batches % 10 == 0:
                elapsed = time.perf_counter() - start
                say(
                    f"[trainer {shard}] batch {batches:3d}: {rows:,} rows, loss {loss:.4f}, "
                    f"{nbytes / elapsed / 1e6:,.0f} MB/s received"
                )
            del df, x, y
    elapsed = time.perf_counter() - start
    say(
        f"[trainer {shard}] done: {batches} batches, {rows:,} rows, {nbytes / 1e6:,.0f} MB in {elapsed:.1f} s "
        f"({wait / elapsed:.0%} of it waiting for the producer); weights {np.round(weights, 2).tolist()}"
    )


def main() -> None:
    was_running = shmchannel.status() is not None
    ctx = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    trainers = [ctx.Process(target=trainer, args=(shard,)) for shard in (0, 1)]
    for proc in trainers:
        proc.start()
    feeder = ctx.Process(target=producer)
    feeder.start()
    try:
        for proc in [feeder, *trainers]:
            proc.join(timeout=120)
            if proc.is_alive():
                proc.kill()
                raise SystemExit(f"demo: {proc.name} hung; killed it")
            if proc.exitcode != 0:
                raise SystemExit(f"demo: {proc.name} failed with exit code {proc.exitcode}")
    finally:
        if not was_running:
            shmchannel.stop_broker()
    say(f"demo finished in {time.perf_counter() - started:.1f} s; nothing left running")


if __name__ == "__main__":
    main()
