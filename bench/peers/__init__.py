"""One module per peer; ``PEERS`` maps the name used on the command line to its instance.

Order matters: peers that need Ray run last, so the Ray cluster is started once, late, and
does not disturb the others.
"""

from __future__ import annotations

from harness import Peer

from .fasterfifo import FasterFifoPeer
from .fill import FillPeer
from .memcpy import MemcpyPeer
from .mpqueue import MPQueuePeer
from .ray_peer import RayQueuePeer
from .shm_handoff import ShmHandoffPeer
from .shmchannel_peer import ShmChannelEmbedded, ShmChannelLoan, ShmChannelRay
from .zmq_peer import ZmqPeer

PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        ShmChannelEmbedded(),
        ShmChannelLoan(),
        MPQueuePeer(),
        FasterFifoPeer(),
        ShmHandoffPeer(),
        ZmqPeer(),
        MemcpyPeer(),
        FillPeer(),
        ShmChannelRay(),
        RayQueuePeer(),
    )
}
