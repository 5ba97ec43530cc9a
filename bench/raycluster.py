"""The local Ray cluster of the bench: started once by the driver, stopped at the end.

The driver starts it with ``ray.init`` (2 CPUs, 1.5 GB object store, no dashboard, usage
stats off) and exports its address as RAY_ADDRESS, so children started later join it with
``connect()``. ``shutdown()`` stops every Ray process this driver started.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

_started = False


@contextlib.contextmanager
def session() -> Iterator[None]:
    start()
    yield


def start() -> None:
    global _started
    if _started:
        return
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    ctx = ray.init(num_cpus=2, object_store_memory=int(1.5e9), include_dashboard=False,
                   logging_level=logging.ERROR, log_to_driver=False)
    _started = True
    os.environ["RAY_ADDRESS"] = ctx.address_info["gcs_address"]


def connect() -> None:
    """In a child: join the driver's cluster (RAY_ADDRESS)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.ERROR, log_to_driver=False)


def shutdown() -> None:
    global _started
    if _started:
        import ray

        ray.shutdown()
        _started = False
        os.environ.pop("RAY_ADDRESS", None)
