"""Non-blocking framed sockets for the supervisor's selector loop.

The supervisor has no event loop and no threads (it forks), so each socket it talks on (a
worker's control channel, a control client, a client let in before any worker is ready) is a
``Peer``: bytes in through ``shmcache.protocol.FrameDecoder``, frames out through a buffer that
drains when the socket is writable.

A Peer never closes its socket on its own: its owner registered the fd with a selector, and a
socket closed under the selector's feet frees the fd number while the selector still holds it,
so the next accepted socket's ``register`` raised and took the supervisor down (a client that
hung up before reading its answer did it). A send that fails or a peer that reads nothing
``abandon()``s instead: no more sends, and a shutdown that the owner's next read sees as the end,
after which the owner unregisters and ``close()``s it.
"""

from __future__ import annotations

import socket
from typing import Any

from shmcache import errors, protocol

RECV_CHUNK = 256 * 1024
MAX_BACKLOG = 16 * 2**20  # a peer that reads nothing cannot make the supervisor buffer more


class Peer:
    def __init__(self, sock: socket.socket, max_frame: int = 16 * 2**20,
                 requests: bool = False, too_large: errors.RemoteError | None = None) -> None:
        """``requests``: the peer is a client (control or early door), whose frames are held
        to the protocol's request limits; a worker's channel is not. ``too_large``: the error
        a frame over ``max_frame`` is answered with, instead of FrameTooLarge (the early door
        reads little, and a client should retry, not shrink its request)."""
        sock.setblocking(False)
        self.sock = sock
        self.too_large = too_large
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
        except errors.FrameTooLarge as exc:
            self.send(protocol.error_reply(None, self.too_large or exc))
            return None
        except errors.RemoteError as exc:
            self.send(protocol.error_reply(None, exc))
            return None

    def send(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        if len(self.out) > MAX_BACKLOG:
            self.abandon()
            return
        self.out += protocol.encode_frame(msg)
        self.flush()

    def flush(self) -> None:
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the peer is gone
                self.abandon()
                return
            del self.out[:sent]

    @property
    def wants_write(self) -> bool:
        return bool(self.out) and not self.closed

    def abandon(self) -> None:
        """Send nothing more; the owner's next read returns None (see the module docstring)."""
        if not self.closed:
            self.closed = True
            self.out.clear()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """The owner's: unregister from the selector first."""
        self.closed = True
        self.sock.close()  # idempotent
