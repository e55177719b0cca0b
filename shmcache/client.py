"""Client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio) for the worker socket.

Both speak ``shmcache.protocol`` and nothing else; neither imports the daemon (principle 6).
Shared semantics:

* connect lazily, on the first call;
* ``infer``, ``models`` and ``ping`` change nothing on the daemon, so when the connection breaks
  mid-call (the worker was restarted, say) they are resent once on a fresh connection, inside
  the caller's remaining timeout; any other op raises ``ConnectionFailed`` at once;
* a ``not_ready`` answer is retried with a short backoff (20 ms doubling to 200 ms) until the
  timeout, then ``NotReady`` is raised;
* daemon errors come back as the exception class ``errors.error_from_code`` names.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import os
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from shmcache import errors, protocol
from shmcache.arena import MIN_BYTES, ClientArena, align
from shmcache.paths import default_socket_path

_BACKOFF_START = 0.020
_BACKOFF_MAX = 0.200
# A thread keeps a receive buffer this big between calls; larger answers get a one-off buffer
# so one huge tensor does not pin hundreds of MiB per thread forever.
_KEEP_BUFFER = 1024 * 1024
_RECV_CHUNK = 64 * 1024

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output; dynamic dims are str (symbolic) or None; ``shape`` is None
    when the graph declares none (any rank)."""

    name: str
    dtype: str
    shape: list[int | str | None] | None


@dataclass(frozen=True)
class ModelInfo:
    """A model as the daemon serves it, at the weight version it currently answers with."""

    name: str
    version: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> ModelInfo:
        def tensors(items: Iterable[Mapping[str, Any]]) -> list[TensorInfo]:
            return [TensorInfo(t["name"], t["dtype"],
                               None if t["shape"] is None else list(t["shape"])) for t in items]

        try:
            return cls(obj["name"], obj["version"], tensors(obj["inputs"]), tensors(obj["outputs"]))
        except (KeyError, TypeError) as exc:
            raise errors.Malformed(f"bad model description: {exc!r}") from exc


def _infer_fields(
    model: str,
    output_names: list[str] | None,
    input_feed: Mapping[str, Any],
    version: int | None,
) -> dict[str, Any]:
    # Like onnxruntime: lists and scalars are accepted and become arrays.
    inputs = {name: protocol.as_c_contiguous(np.asarray(v)) for name, v in input_feed.items()}
    outputs = list(output_names) if output_names is not None else None
    return {"model": model, "inputs": inputs, "outputs": outputs, "version": version}


def _models_from_reply(reply: dict[str, Any]) -> list[ModelInfo]:
    models = reply.get("models")
    if not isinstance(models, list):
        raise errors.Malformed("models response has no models list")
    return [ModelInfo.from_wire(m) for m in models]


def _version_of(reply: dict[str, Any]) -> int:
    version = reply.get("version")
    if type(version) is not int:
        raise errors.Malformed(f"infer response has no int version: {version!r}")
    return version


def _connection_failed(path: str, exc: BaseException) -> errors.ConnectionFailed:
    return errors.ConnectionFailed(f"{path}: {exc}")


# --- blocking client -----------------------------------------------------------------------


class _Connection:
    """One socket, one request at a time: send a frame, read frames until our id comes back.

    With ``shared_memory``, calls that move at least ``arena.MIN_BYTES`` put their tensors in
    a memfd arena handed to the worker once (``shmcache.arena``); a worker that refuses the
    hand-off (an older one, say) gets every tensor inline, as before.
    """

    def __init__(self, path: str, max_frame: int, connect_timeout: float,
                 spin: float = 0.0, shared_memory: bool = True) -> None:
        self.max_frame = max_frame
        self.spin = spin
        self.ids = itertools.count(1)
        self.buf = bytearray(_RECV_CHUNK)
        self.filled = 0
        self.sock = _connect_unix(path, connect_timeout)
        self.arena: ClientArena | None = None
        self.arena_limit = 0  # the worker's largest arena, told when it accepts ours
        self.arena_refused = not shared_memory
        self.out_bytes: dict[str, int] = {}  # model -> arena bytes its last outputs took
        self._owned: list[socket.socket | ClientArena] = [self.sock]
        # Close quietly when the owning thread dies and its threading.local is cleared, so
        # short-lived threads do not leak sockets (nor ResourceWarnings) until Client.close().
        self._finalizer = weakref.finalize(self, _close_all, self._owned)

    def close(self) -> None:
        self._finalizer()

    def request(self, op: str, fields: dict[str, object], deadline: float) -> dict[str, Any]:
        """Send one request (through the arena when worth it) and return its reply."""
        if op == "infer" and not self.arena_refused:
            layout = self._arena_layout(fields)
            if layout is not None and self._arena_ready(layout[-1], deadline):
                return self._infer_through_arena(fields, layout, deadline)
        return self.call(protocol.make_request(next(self.ids), op, **fields), deadline)

    def call(self, msg: dict[str, Any], deadline: float) -> dict[str, Any]:
        self._send(protocol.encode_frame_parts(msg, self.max_frame), deadline)
        return self._await(msg["id"], deadline)

    def _await(self, rid: int, deadline: float) -> dict[str, Any]:
        while True:
            reply = self._recv_frame(deadline)
            if reply.get("id") == rid:
                return reply
            if reply.get("ok") is False and reply.get("id") in (None, 0):
                # The server refused our frame as a whole and will close the connection.
                protocol.check_reply(reply)
            # Any other id is not ours to answer; with one call at a time it cannot happen
            # unless the peer misbehaves, so drop it.

    # -- the arena --

    def _arena_layout(self, fields: dict[str, Any]) -> tuple[list[int], int, int, int] | None:
        """Input offsets, output region and total size for this call; None: send it inline."""
        inputs: dict[str, np.ndarray] = fields["inputs"]
        offsets, cursor = [], 0
        for arr in inputs.values():
            offsets.append(cursor)
            cursor = align(cursor + arr.nbytes)
        # Until a reply says how big this model's outputs are, guess as big as the inputs.
        out_len = self.out_bytes.get(str(fields["model"]), cursor)
        if cursor + out_len < MIN_BYTES:
            return None
        return offsets, cursor, out_len, cursor + out_len

    def _arena_ready(self, size: int, deadline: float) -> bool:
        """An attached arena of at least ``size`` bytes (attaching on first use); False when
        the worker refused ours, or ``size`` is over its limit (that call goes inline)."""
        if self.arena is None:
            self._attach(size, deadline)
        if self.arena is None or size > self.arena_limit:
            return False
        self.arena.ensure(size)  # the worker remaps when a request reaches past its map
        return True

    def _attach(self, size: int, deadline: float) -> None:
        arena = ClientArena(size)
        rid = next(self.ids)
        try:
            protocol.check_reply(self.call(protocol.make_request(rid, protocol.ATTACH), deadline))
            self.sock.settimeout(_remaining(deadline))
            self.sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [arena.fd]))])
            accepted = protocol.check_reply(self._await(rid, deadline))
        except BaseException as exc:
            arena.close()
            if not isinstance(exc, errors.RemoteError):
                raise
            self.arena_refused = True  # an older worker, or it does not like our memfd
            return
        self._owned.append(arena)
        self.arena = arena
        limit = accepted.get("limit")
        self.arena_limit = limit if type(limit) is int else arena.size

    def _infer_through_arena(self, fields: dict[str, Any], layout: tuple[list[int], int, int, int],
                             deadline: float) -> dict[str, Any]:
        assert self.arena is not None
        offsets, out_start, out_len, _ = layout
        wire = {}
        for (name, arr), offset in zip(fields["inputs"].items(), offsets):
            dtype, arr = protocol.wire_array(arr, f"input {name!r}")
            self.arena.write(offset, arr)
            wire[name] = protocol.tensor_ref(dtype, arr.shape, offset, arr.nbytes)
        msg = protocol.make_request(next(self.ids), "infer", **{**fields, "inputs": None})
        msg["inputs"] = wire
        msg["out"] = [out_start, out_len]
        reply = self.call(msg, deadline)
        self._copy_outputs_out(reply, str(fields["model"]))
        return reply

    def _copy_outputs_out(self, reply: dict[str, Any], model: str) -> None:
        """Make the reply self-contained: ``shm`` outputs become ``data`` (copies, since the
        next call reuses the region), and remember how much room the outputs needed."""
        assert self.arena is not None
        pairs = reply.get("outputs")
        if not isinstance(pairs, list):
            return
        needed = 0
        for pair in pairs:
            tensor = pair[1] if isinstance(pair, list) and len(pair) == 2 else None
            if not isinstance(tensor, dict):
                continue  # outputs_from_reply says what is wrong with it
            if "shm" in tensor:
                tensor["data"] = protocol.tensor_bytes(tensor, self.arena)
                del tensor["shm"]
            needed += align(len(tensor.get("data") or b""))
        self.out_bytes[model] = needed

    def _send(self, parts: list[bytes | memoryview], deadline: float) -> None:
        """Send a frame's parts with as few syscalls as possible (one for a small frame).

        Sending the 4-byte header on its own wakes the worker for a partial frame and costs a
        context switch each way: measured 100 us a call on 2 cores, twice the whole ping.
        """
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            self.sock.settimeout(_remaining(deadline))
            sent = self.sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def _recv_frame(self, deadline: float) -> dict[str, Any]:
        self._fill(protocol.HEADER.size, deadline)
        (size,) = protocol.HEADER.unpack_from(self.buf)
        if size > self.max_frame:
            raise errors.FrameTooLarge(f"response of {size} bytes exceeds max_frame={self.max_frame}")
        if size == 0:
            raise errors.Malformed("response frame of length 0")
        end = protocol.HEADER.size + size
        self._fill(end, deadline)
        with memoryview(self.buf) as view, view[protocol.HEADER.size : end] as body:
            reply = protocol.decode_body(body, self.max_frame)
        rest = self.filled - end
        if len(self.buf) > _KEEP_BUFFER:
            small = bytearray(max(_RECV_CHUNK, rest))
            small[:rest] = memoryview(self.buf)[end : self.filled]
            self.buf = small
        elif rest:
            self.buf[:rest] = self.buf[end : self.filled]
        self.filled = rest
        return reply

    def _fill(self, want: int, deadline: float) -> None:
        if want > len(self.buf):
            grown = bytearray(want)
            grown[: self.filled] = memoryview(self.buf)[: self.filled]
            self.buf = grown
        with memoryview(self.buf) as view:
            while self.filled < want:
                n = self._poll_into(view[self.filled :]) if self.spin else None
                if n is None:
                    self.sock.settimeout(_remaining(deadline))
                    n = self.sock.recv_into(view[self.filled :])
                if n == 0:
                    raise EOFError("connection closed by the daemon")
                self.filled += n

    def _poll_into(self, view: memoryview) -> int | None:
        """Read without sleeping for up to ``spin`` seconds; None if nothing came.

        A thread that blocks lets its core halt, and a halted core runs the reply's decoding
        about 2x slower on this VM (see Worker.keep_hot); a short spin keeps it warm.
        """
        until = time.perf_counter() + self.spin
        while True:
            try:
                return self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= until:
                    return None


def _close_all(owned: list[socket.socket | ClientArena]) -> None:
    for item in owned:
        item.close()


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("deadline passed")
    return left


def _connect_unix(path: str, timeout: float) -> socket.socket:
    """Connect, riding out EAGAIN: a Unix socket with a full backlog refuses a non-blocking
    connect with EAGAIN instead of waiting, and Python's timeout mode is non-blocking."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() + delay > deadline:
                raise socket.timeout(f"connect to {path}: backlog full") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        except BaseException:
            sock.close()
            raise


class Client:
    """Blocking client for the shmcache worker socket.

    Thread safety: a ``Client`` may be shared by any number of threads.  Each thread gets its
    own connection (``threading.local``), so calls from different threads never wait on each
    other or on a lock, and each connection carries one call at a time, which keeps the hot
    path to one ``sendall`` and one or two ``recv_into``.  ``close()`` closes every thread's
    connection; a thread that uses the client afterwards simply reconnects.  ``last_version``
    and ``last_compute_seconds`` are per thread too: the weight version of the calling thread's
    last ``run``, and how long its model ran in the worker.

    ``spin`` (seconds, default 200 us) is how long a call polls for its answer before it
    sleeps: answers from small models arrive within it, and a thread that slept wakes on a
    cold core. Set 0 to never spin.

    ``shared_memory`` (default on): a call whose tensors come to at least 256 KiB passes them
    through a memfd the connection shares with its worker instead of the socket
    (``shmcache.arena``): each byte is copied once on each side instead of four times, and
    no 64 KiB read wakes anybody. Each thread's connection keeps its arena, as big as its
    largest call, until it closes.
    """

    def __init__(
        self,
        socket_path: PathLike | None = None,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_frame: int = protocol.DEFAULT_MAX_FRAME,
        spin: float = 0.0002,
        shared_memory: bool = True,
    ) -> None:
        self.socket_path = os.fspath(socket_path if socket_path is not None else default_socket_path())
        self.spin = spin
        self.shared_memory = shared_memory
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: weakref.WeakSet[_Connection] = weakref.WeakSet()

    # -- public API --

    def run(
        self,
        model: str,
        output_names: list[str] | None,
        input_feed: Mapping[str, Any],
        *,
        version: int | None = None,
    ) -> list[np.ndarray]:
        """Like ``onnxruntime.InferenceSession.run``; ``output_names`` None means all."""
        return self.run_with_version(model, output_names, input_feed, version=version)[0]

    def run_with_version(
        self,
        model: str,
        output_names: list[str] | None,
        input_feed: Mapping[str, Any],
        *,
        version: int | None = None,
    ) -> tuple[list[np.ndarray], int]:
        """``run`` plus the weight version that computed the answer."""
        reply = self.request("infer", **_infer_fields(model, output_names, input_feed, version))
        result = protocol.outputs_from_reply(reply), _version_of(reply)
        self._local.last_version = result[1]
        self._local.last_compute = protocol.compute_of(reply)
        return result

    @property
    def last_version(self) -> int | None:
        """Weight version of this thread's last successful ``run``; None before the first."""
        return getattr(self._local, "last_version", None)

    @property
    def last_compute_seconds(self) -> float | None:
        """How long the model ran in the worker for this thread's last successful ``run``
        (the rest of the call's time is queueing and transport); None if not reported."""
        return getattr(self._local, "last_compute", None)

    def models(self) -> list[ModelInfo]:
        """The models the daemon serves."""
        return _models_from_reply(self.request("models"))

    def ping(self) -> dict[str, Any]:
        """Liveness and readiness: ``ready``, ``pid`` and any extra info the daemon adds."""
        reply = self.request("ping")
        return {k: v for k, v in reply.items() if k not in ("v", "id", "ok")}

    def request(self, op: str, **fields: object) -> dict[str, Any]:
        """Send any op (e.g. a control op from the CLI) and return the successful response map."""
        deadline = time.monotonic() + self.timeout
        delay = _BACKOFF_START
        while True:
            try:
                return protocol.check_reply(self._call(op, fields, deadline))
            except errors.NotReady:
                if time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --

    def _call(self, op: str, fields: dict[str, object], deadline: float) -> dict[str, Any]:
        attempts = 2 if op in protocol.IDEMPOTENT_OPS else 1
        for attempt in range(attempts):
            conn = None
            try:
                conn = self._connection(deadline)
                return conn.request(op, fields, deadline)
            except (socket.timeout, TimeoutError) as exc:
                self._drop(conn)  # a late answer would arrive on it; start clean
                raise errors.Timeout(f"no answer to {op!r} within {self.timeout}s") from exc
            except (OSError, EOFError) as exc:
                self._drop(conn)
                if attempt + 1 == attempts or time.monotonic() >= deadline:
                    raise _connection_failed(self.socket_path, exc) from exc
            except (errors.Malformed, errors.FrameTooLarge):
                self._drop(conn)
                raise
        raise AssertionError("unreachable")

    def _connection(self, deadline: float) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            timeout = min(self.connect_timeout, _remaining(deadline))
            conn = _Connection(self.socket_path, self.max_frame, timeout, self.spin,
                               self.shared_memory)
            self._local.conn = conn
            with self._lock:
                self._conns.add(conn)
        return conn

    def _drop(self, conn: _Connection | None) -> None:
        if conn is not None:
            conn.close()
            with self._lock:
                self._conns.discard(conn)
        self._local.conn = None


# --- asyncio client ------------------------------------------------------------------------


class _ConnectionLost(Exception):
    """Internal: the connection a request was sent on broke before its answer came."""


class _ClientProtocol(asyncio.Protocol):
    """Demultiplex answers by id onto the futures of the requests in flight."""

    def __init__(self, max_frame: int) -> None:
        self.decoder = protocol.FrameDecoder(max_frame)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.decoder.feed(data)
        except errors.RemoteError as exc:
            self.fail_all(exc)
            if self.transport is not None:
                self.transport.close()
            return
        for reply in replies:
            rid = reply.get("id")
            fut = self.pending.pop(rid, None) if type(rid) is int else None
            if fut is not None:
                if not fut.done():
                    fut.set_result(reply)
            elif reply.get("ok") is False and rid in (None, 0):
                # The daemon refused a frame as a whole and closes; say why to everyone waiting.
                try:
                    protocol.check_reply(reply)
                except errors.RemoteError as exc:
                    self.fail_all(exc)
            # Otherwise: the answer to a request that already timed out; nobody waits for it.

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self.fail_all(_ConnectionLost(str(exc or "connection closed by the daemon")))

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def drain(self) -> None:
        await self._writable.wait()

    def fail_all(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)


class AsyncClient:
    """asyncio client: one connection, many requests in flight, answers matched by id.

    Safe for any number of tasks on one event loop (not across loops or threads).  A reader
    (the protocol's ``data_received``) resolves each request's future by id, so answers may
    come back in any order.  If the connection breaks, every waiting request fails; each
    idempotent one is resent once on a fresh connection before ``ConnectionFailed`` is raised.
    """

    def __init__(
        self,
        socket_path: PathLike | None = None,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_frame: int = protocol.DEFAULT_MAX_FRAME,
    ) -> None:
        self.socket_path = os.fspath(socket_path if socket_path is not None else default_socket_path())
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        self.last_version: int | None = None
        self.last_compute_seconds: float | None = None  # see Client.last_compute_seconds
        self._ids = itertools.count(1)
        self._proto: _ClientProtocol | None = None
        self._connect_lock: asyncio.Lock | None = None

    async def connect(self) -> None:
        """Connect now instead of on the first call (to fail fast at startup)."""
        await self._connection(time.monotonic() + self.connect_timeout)

    async def run(
        self,
        model: str,
        output_names: list[str] | None,
        input_feed: Mapping[str, Any],
        *,
        version: int | None = None,
    ) -> list[np.ndarray]:
        """Like ``onnxruntime.InferenceSession.run``; ``output_names`` None means all."""
        return (await self.run_with_version(model, output_names, input_feed, version=version))[0]

    async def run_with_version(
        self,
        model: str,
        output_names: list[str] | None,
        input_feed: Mapping[str, Any],
        *,
        version: int | None = None,
    ) -> tuple[list[np.ndarray], int]:
        """``run`` plus the weight version that computed the answer."""
        reply = await self.request("infer", **_infer_fields(model, output_names, input_feed, version))
        result = protocol.outputs_from_reply(reply), _version_of(reply)
        self.last_version = result[1]
        self.last_compute_seconds = protocol.compute_of(reply)
        return result

    async def models(self) -> list[ModelInfo]:
        """The models the daemon serves."""
        return _models_from_reply(await self.request("models"))

    async def ping(self) -> dict[str, Any]:
        """Liveness and readiness: ``ready``, ``pid`` and any extra info the daemon adds."""
        reply = await self.request("ping")
        return {k: v for k, v in reply.items() if k not in ("v", "id", "ok")}

    async def request(self, op: str, **fields: object) -> dict[str, Any]:
        """Send any op and return the successful response map."""
        deadline = time.monotonic() + self.timeout
        delay = _BACKOFF_START
        while True:
            try:
                return protocol.check_reply(await self._call(op, fields, deadline))
            except errors.NotReady:
                if time.monotonic() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    async def close(self) -> None:
        """Close the connection; requests still in flight fail with ConnectionFailed.

        They are failed here, not by ``connection_lost``, so that they are not resent: the
        caller asked for the connection to go away.  A later call connects afresh.
        """
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.fail_all(errors.ConnectionFailed("client closed"))
            if proto.transport is not None:
                proto.transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- internals --

    async def _call(self, op: str, fields: dict[str, object], deadline: float) -> dict[str, Any]:
        attempts = 2 if op in protocol.IDEMPOTENT_OPS else 1
        for attempt in range(attempts):
            try:
                return await _with_deadline(self._call_once(op, fields, deadline), deadline)
            except TimeoutError as exc:
                raise errors.Timeout(f"no answer to {op!r} within {self.timeout}s") from exc
            except (OSError, _ConnectionLost) as exc:
                if attempt + 1 == attempts or time.monotonic() >= deadline:
                    raise _connection_failed(self.socket_path, exc) from exc
        raise AssertionError("unreachable")

    async def _call_once(self, op: str, fields: dict[str, object], deadline: float) -> dict[str, Any]:
        proto = await self._connection(deadline)
        rid = next(self._ids)
        parts = protocol.encode_frame_parts(protocol.make_request(rid, op, **fields), self.max_frame)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        proto.pending[rid] = fut
        try:
            assert proto.transport is not None
            proto.transport.writelines(parts)
            await proto.drain()
            return await fut
        finally:
            proto.pending.pop(rid, None)  # timed out or cancelled: a late answer is dropped

    async def _connection(self, deadline: float) -> _ClientProtocol:
        proto = self._proto
        if proto is not None and not proto.closed:
            return proto
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:  # many tasks see the break at once; connect once
            proto = self._proto
            if proto is not None and not proto.closed:
                return proto
            loop = asyncio.get_running_loop()
            timeout = min(self.connect_timeout, max(deadline - time.monotonic(), 0.0))
            _, proto = await _with_deadline(
                loop.create_unix_connection(lambda: _ClientProtocol(self.max_frame), self.socket_path),
                time.monotonic() + timeout,
            )
            self._proto = proto
            return proto


async def _with_deadline(aw: Awaitable[Any], deadline: float) -> Any:
    async with asyncio.timeout_at(asyncio.get_running_loop().time() + (deadline - time.monotonic())):
        return await aw
