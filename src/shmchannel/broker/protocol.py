"""Wire format between clients and the broker (frames and names only; no sockets here).

A frame is ``u32 json_len | u32 payload_len | json | payload``. The JSON object carries the
operation and its small arguments; the payload carries inline blobs (small objects travel
with their key instead of through the arena). JSON, not pickle: the broker must never
unpickle what a client sends. Every request gets exactly one reply, in the order of the
requests, except the one-way operations listed in ``ONE_WAY``, which are handled as they
arrive, and *posted* requests (``"posted": true``), which are answered only if they fail,
with an error reply marked ``"posted": true``. A client may send requests before earlier
ones were answered; the broker handles them in order, holding later ones back while an
earlier one waits.
"""

from __future__ import annotations

import json
import struct
from typing import Any

PROTOCOL_VERSION = 6  # 6: loans, blobs referencing other objects (issue 15); 5: event-count futex words, no sleep marks, no hold op; 4: the broker leaves the data path (issue 14); 3: request ids, IMMEDIATE requests, cancel by id
HEAD = struct.Struct("<II")
MAX_JSON = 1 << 20
MAX_PAYLOAD = 256 << 20
#: A reply's JSON may be larger than a request's: a queue listing names up to
#: ``rules.MAX_QUEUED`` keys (about 26 bytes each), a status page up to 29 MB
#: (``system.STATUS_PAGE_CHANNELS``). The broker is our own code; the bound only
#: catches a stream out of step before it allocates without limit.
MAX_REPLY_JSON = 64 << 20

_ENCODER = json.JSONEncoder(separators=(",", ":"))  # one, not one per json.dumps call with options

#: Operations whose reply confirms a change of what is queued (or shows it): it goes out
#: only after the broker's journal holds that change (see journal.py).
CONFIRMS = frozenset({"create", "close", "detach", "queue", "status", "sync", "stop", "slab", "unslab", "log", "loan", "lend"})

#: Operations that get no reply.
ONE_WAY = frozenset({"release", "cancel"})

#: Requests answered on arrival, even while an earlier request of the connection waits:
#: they never wait themselves, and no earlier request of the same connection can change
#: their answer in a way its caller relies on (a client posts only from the thread that
#: waits, see client.py). ``delete`` is one so that deleting a key can free the memory a
#: ``put`` of another thread waits for.
IMMEDIATE = frozenset({"queue", "status", "stats", "contains", "get", "delete"})


class FrameError(ValueError):
    """A frame is malformed (sizes out of bounds, JSON not an object)."""


def encode(
    msg: dict[str, Any], payload: bytes | bytearray | memoryview = b"", *, max_json: int = MAX_JSON
) -> list[Any]:
    """The parts of one frame, ready for ``socket.sendmsg`` or a transport's writelines.

    Raises:
        FrameError: the JSON is over ``max_json`` bytes or the payload over ``MAX_PAYLOAD``
            (the receiving end would drop the connection).
    """
    body = _ENCODER.encode(msg).encode()
    if len(body) > max_json or len(payload) > MAX_PAYLOAD:
        raise FrameError(
            f"{msg.get('op', 'reply')!r} frame too large: JSON {len(body)} bytes (at most {max_json}), "
            f"payload {len(payload)} bytes (at most {MAX_PAYLOAD})"
        )
    return [HEAD.pack(len(body), len(payload)), body, payload] if len(payload) else [HEAD.pack(len(body), 0), body]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this protocol carries")


def parse_head(head: bytes | bytearray | memoryview, *, max_json: int = MAX_JSON) -> tuple[int, int]:
    json_len, payload_len = HEAD.unpack(head)
    if json_len > max_json or json_len == 0:
        raise FrameError(f"frame JSON length {json_len} outside 1..{max_json}")
    if payload_len > MAX_PAYLOAD:
        raise FrameError(f"frame payload length {payload_len} above {MAX_PAYLOAD}")
    return json_len, payload_len


def parse_body(body: bytes | bytearray | memoryview, *, request: bool = True) -> dict[str, Any]:
    try:
        msg = json.loads(bytes(body), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"frame body is not JSON: {exc}"[:300]) from None
    if not isinstance(msg, dict):
        raise FrameError("frame body must be a JSON object")
    if request and not isinstance(msg.get("op"), str):
        raise FrameError("request must have a string 'op'")
    return msg


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": code, "message": message}
