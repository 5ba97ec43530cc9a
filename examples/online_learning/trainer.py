"""A trainer process: online logistic regression for click-through rate, fed by one shard.

``ChannelDataset`` turns each received DataFrame into ``{column: tensor}`` (views of the
shared memory the batch arrived in) and ends when the producer closes the channel; the
``DataLoader`` is there as in any PyTorch script (``batch_size=None``: each item already is
a batch).

The loss printed is *progressive validation* log-loss: each batch is scored before the
model trains on it, so it measures prediction on data the model has not seen yet. It is
compared with the base-rate log-loss of the same rows: what a constant prediction equal
to their click rate would score, knowing that rate in hindsight.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from schema import DENSE, EVENT_ID, LABEL, SPARSE, say
from shmchannel.torch import ChannelDataset


class LogisticCTR(nn.Module):
    """Logistic regression over one-hot sparse ids (one weight per id) and dense features."""

    offsets: torch.Tensor  # where each sparse field's ids start in the weight table

    def __init__(self) -> None:
        super().__init__()
        sizes = list(SPARSE.values())
        self.register_buffer("offsets", torch.tensor([0, *np.cumsum(sizes[:-1])], dtype=torch.int64))
        self.weights = nn.Embedding(sum(sizes), 1)  # every field's ids in one table
        self.dense = nn.Linear(len(DENSE), 1)
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Logits of a click for ``sparse`` ids (rows x fields) and ``dense`` features."""
        return self.weights(sparse + self.offsets).sum(dim=(1, 2)) + self.dense(dense).squeeze(1)


def entropy(rate: float) -> float:
    """Log-loss of predicting ``rate`` for rows whose click rate is ``rate``."""
    if rate <= 0 or rate >= 1:
        return 0.0
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


class Window:
    """Rows, clicks and log-loss of the last ``size`` batches added (None: all of them)."""

    def __init__(self, size: int | None = None) -> None:
        self.batches: deque[tuple[int, float, float]] = deque(maxlen=size)  # rows, clicks, loss

    def add(self, rows: int, clicks: float, loss: float) -> None:
        self.batches.append((rows, clicks, loss))

    @property
    def rows(self) -> int:
        return sum(b[0] for b in self.batches)

    @property
    def loss(self) -> float:
        return sum(b[0] * b[2] for b in self.batches) / max(self.rows, 1)

    @property
    def base(self) -> float:
        return entropy(sum(b[1] for b in self.batches) / max(self.rows, 1))


def train(shard: int, address: str, namespace: str, dataset_name: str, lr: float, log_every: int) -> dict[str, object]:
    """Train on shard ``shard`` until the producer closes the channel; return what was seen."""
    torch.set_num_threads(1)  # two trainers and a producer share the machine's cores
    torch.manual_seed(shard)
    model = LogisticCTR()
    # Adagrad, the classic for sparse logistic regression: each weight's step shrinks with
    # its own gradient history, so frequent ids settle while rare ones still learn.
    optimizer = torch.optim.Adagrad(model.parameters(), lr=lr)
    dataset = ChannelDataset(address, dataset_name, shard_id=shard, namespace=namespace)
    ids: list[np.ndarray] = []
    window, last = Window(), Window(log_every)  # since the last report; the last log_every batches
    rows = batches = 0
    first = busy = 0.0
    for batch in DataLoader(dataset, batch_size=None):
        t = time.monotonic()
        first = first or t
        sparse = torch.stack([batch[name] for name in SPARSE], dim=1)
        dense = torch.stack([batch[name] for name in DENSE], dim=1)
        label = batch[LABEL]
        loss = F.binary_cross_entropy_with_logits(model(sparse, dense), label)  # before training on it
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ids.append(batch[EVENT_ID].numpy().copy())  # a copy: the batch's shared memory goes back
        n, clicks, value = len(label), float(label.sum()), loss.item()
        rows += n
        batches += 1
        window.add(n, clicks, value)
        last.add(n, clicks, value)
        busy += time.monotonic() - t
        if batches % log_every == 0:
            rate = rows / max(time.monotonic() - first, 1e-9)
            say(
                f"[trainer {shard}] batch {batches:4d}  rows {rows:9,}  loss {window.loss:.4f}"
                f" (base rate {window.base:.4f})  {rate:8,.0f} rows/s"
            )
            window = Window()
        del batch, sparse, dense, label
    elapsed = max(time.monotonic() - first, 1e-9) if first else 0.0
    rate = rows / elapsed if elapsed else 0.0
    gain = 1 - last.loss / last.base if last.base else 0.0
    say(
        f"[trainer {shard}] done: {rows:,} rows in {batches} batches, {rate:,.0f} rows/s"
        f" (busy {busy / max(elapsed, 1e-9):.0%});"
        f" final loss {last.loss:.4f} vs base rate {last.base:.4f} ({gain:.0%} lower)"
    )
    return {
        "rows": rows,
        "batches": batches,
        "final_loss": last.loss,
        "base_loss": last.base,
        "ids": np.concatenate(ids) if ids else np.empty(0, np.int64),
    }
