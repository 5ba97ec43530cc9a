"""Peer: pyzmq PUSH/PULL over ``ipc://`` with zero-copy frames.

Each object is pickled with protocol 5; its large buffers go out-of-band as separate frames
sent with ``copy=False`` (pyzmq still copies frames under its copy_threshold, 64 KiB), and
the receiver unpickles over the received frames without copying them again. One PULL
socket per receiver; high-water marks of 5 on each side bound the messages in flight to 10.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from typing import Any

from harness import END, Peer, split_rows
from workloads import Workload

HWM = 5


def _socket(kind: int) -> Any:
    import zmq

    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.SNDHWM if kind == zmq.PUSH else zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.LINGER, 10_000)
    return sock


_LINGERING: list[Any] = []


class _Sender:
    def __init__(self, urls: list[str]) -> None:
        import zmq

        while _LINGERING:
            _LINGERING.pop().close()
        self.socks = []
        for url in urls:
            sock = _socket(zmq.PUSH)
            sock.connect(url)
            sock.send(b"hello")  # the receiver waits for it before the start barrier
            self.socks.append(sock)

    def send(self, obj: Any) -> None:
        for sock, part in zip(self.socks, split_rows(obj, len(self.socks))):
            buffers: list[pickle.PickleBuffer] = []
            header = pickle.dumps(part, protocol=5, buffer_callback=buffers.append)
            sock.send_multipart([header, *(b.raw() for b in buffers)], copy=False)

    def close(self) -> None:
        for sock in self.socks:
            sock.send(b"")
        # Closing the PUSH socket right away sometimes lost the tail of the stream (seen with
        # 20,000 small messages: the receiver never got the last ones), so the sockets stay
        # open until the next repetition's sender is made, when the receivers have all.
        _LINGERING.extend(self.socks)


class _Receiver:
    def __init__(self, url: str) -> None:
        import zmq

        self.sock = _socket(zmq.PULL)
        self.sock.bind(url)
        if not self.sock.poll(60_000):
            raise TimeoutError("no hello from the zmq sender")
        self.sock.recv()
        self.count = 0

    def recv(self, timeout: float) -> Any:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"zmq recv timed out after {self.count} messages")
        frames = self.sock.recv_multipart(copy=False)
        self.count += 1
        if len(frames) == 1 and len(frames[0]) == 0:
            return END
        return pickle.loads(frames[0].bytes, buffers=[f.buffer for f in frames[1:]])

    def release(self) -> None:
        pass

    def close(self) -> None:
        self.sock.close(linger=0)


class ZmqPeer(Peer):
    name = "zmq"

    def setup(self, w: Workload) -> Any:
        return tempfile.mkdtemp(prefix="shb-zmq-")

    def teardown(self, handles: Any) -> None:
        shutil.rmtree(handles, ignore_errors=True)

    def sender(self, handles: Any, w: Workload, rep: int) -> Any:
        return _Sender([f"ipc://{handles}/r{rep}c{k}" for k in range(w.consumers)])

    def receiver(self, handles: Any, w: Workload, rep: int, shard: int) -> Any:
        return _Receiver(f"ipc://{handles}/r{rep}c{shard}")
