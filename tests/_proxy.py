"""A small TCP proxy owned by a test, to inject faults between client and broker.

It runs in gevent greenlets of the test process. ``stall()`` turns it into a
faithful black hole (holds bytes both ways, hides FIN/RST), ``resume()``
lets traffic flow again, ``cut()`` resets every live connection, and
``refuse`` makes it reset new connections at once.

With ``rewrite=`` it reads what the broker sends frame by frame and passes
each frame's payload through ``rewrite(frame_type, channel, payload)``
(re-framed, so a payload may change length; None drops the frame), and ``inject(data)`` sends raw
bytes to the clients between two frames: a broker that misbehaves on cue.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.socket

#: rewrite(frame_type, channel, payload) -> payload to send instead, or None to drop the frame.
Rewrite = Callable[[int, int, bytes], "bytes | None"]


class Proxy:
    def __init__(self, target: tuple[str, int], rewrite: Rewrite | None = None,
                 receive_buffer: int | None = None) -> None:
        """``receive_buffer`` caps the kernel's buffer for what clients send (so a stall holds little)."""
        self.target = target
        self.rewrite = rewrite
        self._send_lock = gevent.lock.RLock()
        self.listener = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if receive_buffer is not None:  # accepted sockets inherit it
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self.flowing = gevent.event.Event()
        self.flowing.set()
        self.refuse = False
        self.pairs: list[tuple[Any, Any]] = []
        self.greenlets: list[gevent.Greenlet] = []
        self.accepted = 0
        self._acceptor = gevent.spawn(self._accept)

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            self.accepted += 1
            if self.refuse:
                _reset(client)
                continue
            try:
                upstream = gevent.socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            self.pairs.append((client, upstream))
            self.greenlets.append(gevent.spawn(self._pump, client, upstream))
            self.greenlets.append(gevent.spawn(self._pump, upstream, client, self.rewrite))

    def _pump(self, source: Any, sink: Any, rewrite: Rewrite | None = None) -> None:
        pending = b""
        try:
            while True:
                data = source.recv(65536)
                self.flowing.wait()  # a stalled proxy holds what it read
                if not data:
                    break
                if rewrite is None:
                    sink.sendall(data)
                    continue
                pending += data
                frames = []
                while len(pending) >= 8:
                    frame_type, channel, size = struct.unpack_from("!BHI", pending)
                    if len(pending) < 8 + size:
                        break
                    payload = rewrite(frame_type, channel, pending[7:7 + size])
                    if payload is not None:
                        frames.append(struct.pack("!BHI", frame_type, channel, len(payload)) + payload + b"\xce")
                    pending = pending[8 + size:]
                with self._send_lock:
                    sink.sendall(b"".join(frames))
        except OSError:
            pass
        finally:
            if self.flowing.is_set():
                for sock in (source, sink):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def inject(self, data: bytes) -> None:
        """Send ``data`` to every client, between two frames of what the broker sends (needs ``rewrite``)."""
        with self._send_lock:
            for client, _ in self.pairs:
                client.sendall(data)

    def stall(self) -> None:
        """Black hole: nothing passes, nothing is closed."""
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def cut(self) -> None:
        """Reset every live connection (RST to the client)."""
        for client, upstream in self.pairs:
            _reset(client)
            _reset(upstream)
        self.pairs.clear()

    def close(self) -> None:
        self.flowing.set()
        self.cut()
        self._acceptor.kill()
        gevent.killall(self.greenlets)
        self.listener.close()


def _reset(sock: Any) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
