"""The contract between the producer and the trainers: which columns a batch carries.

Every batch the producer sends is a pandas DataFrame with these columns, all numeric so
that each arrives in a trainer as a tensor over shared memory:

- ``event_id`` (int64): the raw event's id, kept only to check that each event is trained
  on exactly once;
- ``label`` (float32): 1.0 if the impression was clicked;
- one int64 column per sparse field in ``SPARSE``: an index in ``[0, size)`` (hashed
  buckets for high-cardinality ids, a vocabulary position for low-cardinality values,
  0 meaning "unknown");
- one float32 column per name in ``DENSE``: normalized numeric features.
"""

from __future__ import annotations

import sys

EVENT_ID = "event_id"
LABEL = "label"

DEVICES = ["ios", "android", "web"]
#: Country code -> UTC offset in hours (the generator uses it for local hour of day).
COUNTRIES = {
    "US": -5, "BR": -3, "GB": 0, "DE": 1, "FR": 1, "ES": 1, "NG": 1, "IN": 5, "ID": 7, "JP": 9, "KR": 9, "AU": 10,
}  # fmt: skip
CATEGORIES = [
    "electronics", "books", "fashion", "home", "toys", "sports", "beauty", "grocery",
    "garden", "auto", "music", "games", "pets", "office", "health", "jewelry",
]  # fmt: skip
POSITIONS = 10  # slots on a result page, 1..10

#: Sparse field -> number of ids. Hashed fields take any value into a fixed number of
#: buckets (the hashing trick); vocabulary fields reserve id 0 for values not in the list.
SPARSE: dict[str, int] = {
    "user_bucket": 1 << 15,
    "item_bucket": 1 << 14,
    "category_x_device": 1 << 8,
    "device": len(DEVICES) + 1,
    "country": len(COUNTRIES) + 1,
    "category": len(CATEGORIES) + 1,
    "position": POSITIONS + 1,
    "hour": 24 + 1,
}
#: Numeric features, each normalized with a running mean and variance.
DENSE = ["log_price", "user_views_10m", "user_ctr_10m", "item_views_10m", "item_ctr_10m"]

COLUMNS = [EVENT_ID, LABEL, *SPARSE, *DENSE]


def say(line: str) -> None:
    """Print one line in one write, so that the lines of several processes never mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
