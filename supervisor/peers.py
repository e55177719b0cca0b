"""Non-blocking framed sockets for the supervisor's selector loop.

The supervisor has no event loop and no threads (it forks), so each socket it talks on (a
worker's control channel, a control client, a client let in before any worker is ready) is a
``Peer``: bytes in through ``shmcache.protocol.FrameDecoder``, frames out through a buffer that
drains when the socket is writable.
"""

from __future__ import annotations

import socket
from typing import Any

from shmcache import errors, protocol

RECV_CHUNK = 256 * 1024
MAX_BACKLOG = 16 * 2**20  # a peer that reads nothing cannot make the supervisor buffer more


class Peer:
    def __init__(self, sock: socket.socket, max_frame: int = 16 * 2**20,
                 requests: bool = False) -> None:
        """``requests``: the peer is a client (control or early door), whose frames are held
        to the protocol's request limits; a worker's channel is not."""
        sock.setblocking(False)
        self.sock = sock
        self.decoder = protocol.FrameDecoder(max_frame, requests)
        self.out = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[dict[str, Any]] | None:
        """Complete messages now readable; None when the peer is gone or spoke garbage."""
        try:
            data = self.sock.recv(RECV_CHUNK)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        try:
            return self.decoder.feed(data)
        except errors.RemoteError as exc:
            self.send(protocol.error_reply(None, exc))
            return None

    def send(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        if len(self.out) > MAX_BACKLOG:
            self.close()
            return
        self.out += protocol.encode_frame(msg)
        self.flush()

    def flush(self) -> None:
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            del self.out[:sent]

    @property
    def wants_write(self) -> bool:
        return bool(self.out) and not self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
