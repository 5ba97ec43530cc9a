"""Argument checks shared by the public classes: each names the parameter, what was
expected and what was got. Also the finalizer of endpoints their user forgot to close."""

from __future__ import annotations

import operator
import os
import warnings
from typing import Any, Callable

import numpy as np

from ..broker import rules
from ..errors import InvalidArgument

MAX_NAME = rules.MAX_NAME
check_name = rules.check_name  # the broker checks names with the same rule and words
#: Objects a receiver fetches per round trip when that many are queued (see DataReceiver).
PREFETCH = int(os.environ.get("SHMCHANNEL_PREFETCH", 8))


def check_int(param: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (maximum is not None and value > maximum):
        if maximum is not None:
            what = f"an int from {minimum} to {maximum}"
        else:
            what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise InvalidArgument(f"{param} must be {what}, got {value!r} ({type(value).__name__})")
    return value


def check_timeout(param: str, value: object) -> float | None:
    """``value`` as seconds, or None for no limit: None, inf, and any number past
    ``rules.MAX_TIMEOUT`` (about 292 years: no lock waits longer) mean no limit."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidArgument(f"{param} must be None or a number of seconds >= 0, got {value!r} ({type(value).__name__})")
    if rules.no_limit(value):  # before float(): 10**400 has no float
        return None
    return float(value)


def warn_unclosed(what: list[str], made: list[Any], close: Callable[[Any], None]) -> None:
    """Finalizer of a forgotten endpoint: warn, then leave the channel without ending it.
    Registered before the backend endpoint is made, with the list it goes in (``made``):
    a constructor cut short empties the list, and nothing then warns. ``what[0]`` names
    the endpoint (set again once it is made: its repr says "open" then)."""
    if not made:
        return
    warnings.warn(f"{what[0]} was never closed; call close() or use it in a with block", ResourceWarning, stacklevel=2)
    try:
        close(made[0])
    except Exception:
        pass


def check_shape(param: str, value: object) -> tuple[int, ...]:
    """An array shape: an int >= 0 or a sequence of them (numpy's ``empty`` takes the same)."""
    dims: Any = (value,) if isinstance(value, (int, np.integer)) else value
    if not isinstance(dims, (tuple, list)):
        dims = None  # (a dict or a string would iterate)
    try:
        shape = tuple(operator.index(d) for d in dims if not isinstance(d, bool))
        whole = len(shape) == len(dims)  # no bool among them
    except TypeError:
        shape, whole = (), False
    if not whole or any(d < 0 for d in shape):
        raise InvalidArgument(f"{param} must be an int >= 0 or a tuple of them, got {value!r:.80} ({type(value).__name__})")
    return shape


def check_dtype(param: str, value: object) -> np.dtype:
    """A numpy dtype without Python objects in it (their addresses mean nothing elsewhere)."""
    try:
        dtype = np.dtype(value)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{param} must be a numpy dtype, got {value!r:.80}: {exc}") from None
    if dtype.hasobject:
        raise InvalidArgument(f"{param} must hold no Python objects, got {dtype}")
    if not dtype.itemsize:
        raise InvalidArgument(f"{param} must have a size, got {dtype} (0 bytes an item)")
    return dtype
