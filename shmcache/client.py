"""Client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio) for the worker socket.

Both speak ``shmcache.protocol`` and nothing else; neither imports the daemon (principle 6).
Shared semantics:

* connect lazily, on the first call;
* ``infer``, ``models`` and ``ping`` change nothing on the daemon, so when the connection breaks
  mid-call (the worker was restarted, say) they are resent once on a fresh connection, inside
  the caller's remaining timeout; any other op raises ``ConnectionFailed`` at once;
* a ``not_ready`` answer is retried with a short backoff (20 ms doubling to 200 ms) until the
  timeout, then ``NotReady`` is raised; ``AsyncClient``, which puts many requests on one worker
  at once, retries ``overloaded`` the same way;
* ``run`` takes ``onnxruntime.InferenceSession.run``'s arguments: a feed given as a list or a
  Python scalar becomes an array of the input's declared type (asked of the daemon once per
  model), while an ndarray or numpy scalar is sent as it is (a wrong dtype is an error, as in
  ONNX Runtime); ``run_options`` must be None;
* daemon errors come back as the exception class ``errors.error_from_code`` names.

A connection belongs to the process that opened it: after ``os.fork()`` the child closes its
copies of the parent's sockets and memfds (sending nothing on them) and connects afresh.
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
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from shmcache import errors, protocol
from shmcache.arena import MIN_BYTES, ClientArena, align
from shmcache.paths import default_socket_path

_BACKOFF_START = 0.020
_BACKOFF_MAX = 0.200
# AsyncClient's requests in flight on its one connection. A worker answers ``overloaded`` past
# its --max-inflight (default 64, shared by all its connections): 200 unbounded concurrent
# calls got 115 of them. 32 keeps a worker busy while leaving room for other clients.
_DEFAULT_MAX_IN_FLIGHT = 32
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
    # Initializers a call may feed in place of the stored value (optional inputs), as
    # onnxruntime's get_overridable_initializers(); empty from a daemon that does not say.
    overridable: list[TensorInfo] = field(default_factory=list)

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> ModelInfo:
        def tensors(items: Iterable[Mapping[str, Any]]) -> list[TensorInfo]:
            return [TensorInfo(t["name"], t["dtype"],
                               None if t["shape"] is None else list(t["shape"])) for t in items]

        try:
            return cls(obj["name"], obj["version"], tensors(obj["inputs"]), tensors(obj["outputs"]),
                       tensors(obj.get("overridable") or []))
        except (KeyError, TypeError) as exc:
            raise errors.Malformed(f"bad model description: {exc!r}") from exc


def _infer_fields(
    model: str,
    output_names: list[str] | None,
    input_feed: Mapping[str, Any],
    version: int | None,
) -> dict[str, Any]:
    if isinstance(output_names, (str, bytes)):
        # list("probs") would ask for outputs 'p', 'r', ...; onnxruntime raises TypeError too.
        raise TypeError(f"output_names must be a list of names or None, not {output_names!r} "
                        f"(for one output, pass [{output_names!r}])")
    # A feed not typed by then (unknown model or input) becomes numpy's default array; the
    # worker names what is wrong with it.
    inputs = {name: protocol.as_c_contiguous(np.asarray(v)) for name, v in input_feed.items()}
    outputs = list(output_names) if output_names is not None else None
    _check_names("input", list(input_feed))
    _check_names("output", outputs or [])
    return {"model": model, "inputs": inputs, "outputs": outputs, "version": version}


def _check_names(kind: str, names: Sequence[object]) -> None:
    """Say which argument breaks the request limits (protocol.MAX_REQUEST_ITEMS and _STR)
    before sending: the worker can only refuse the whole frame as unreadable msgpack."""
    if len(names) > protocol.MAX_REQUEST_ITEMS:
        raise errors.Malformed(f"{len(names)} {kind} names; a request carries at most "
                               f"{protocol.MAX_REQUEST_ITEMS}")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{kind} names must be str, got {type(name).__name__} {name!r:.80}")
        # Encoded only when it might be over (a UTF-8 character is at most 4 bytes): this
        # runs on every call.
        if (len(name) * 4 > protocol.MAX_REQUEST_STR
                and len(name.encode("utf-8", "surrogatepass")) > protocol.MAX_REQUEST_STR):
            raise errors.Malformed(f"{kind} name {name[:40]!r}... is over "
                                   f"{protocol.MAX_REQUEST_STR} bytes")


def _check_run_options(run_options: object) -> None:
    """Refuse what the daemon cannot honour: the model runs in a worker with the worker's own
    ``RunOptions`` (log levels, ``terminate``, config entries), and the protocol carries none."""
    if run_options is None:
        return
    # Duck-typed: importing onnxruntime would make the client as heavy as the worker.
    if hasattr(run_options, "add_run_config_entry"):
        raise ValueError("run_options is not supported by the shmcache daemon: the model runs in "
                         "a worker process with the worker's run options; pass None")
    raise TypeError(f"run_options must be None (shmcache does not support onnxruntime.RunOptions), "
                    f"got {type(run_options).__name__}")


def _is_typed(value: object) -> bool:
    # An ndarray or numpy scalar says its dtype; like onnxruntime, a wrong one is an error (the
    # worker's bad_dtype), never a silent cast.
    return isinstance(value, (np.ndarray, np.generic))


def _all_typed(input_feed: Mapping[str, Any]) -> bool:
    return all(_is_typed(v) for v in input_feed.values())


def _same_dtypes(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return {k: getattr(v, "dtype", None) for k, v in a.items()} == {
        k: getattr(v, "dtype", None) for k, v in b.items()}


def _declared_input_dtypes(models: list[ModelInfo]) -> dict[str, dict[str, np.dtype[Any]]]:
    """model -> input -> declared dtype, for the inputs whose type the wire can carry."""
    return {m.name: {t.name: np.dtype(t.dtype) for t in m.inputs + m.overridable
                     if t.dtype in protocol.ALLOWED_DTYPES}
            for m in models}


def _with_declared_dtypes(input_feed: Mapping[str, Any],
                          dtypes: Mapping[str, np.dtype[Any]]) -> dict[str, Any]:
    """Untyped feeds (lists, Python scalars) as arrays of their input's declared type, as
    onnxruntime converts them: ``np.asarray`` alone would make float64 of Python floats."""
    return {name: np.asarray(v, dtypes[name]) if not _is_typed(v) and name in dtypes else v
            for name, v in input_feed.items()}


def _writable(outputs: list[np.ndarray]) -> list[np.ndarray]:
    """Arrays the caller may change in place, as ONNX Runtime's are: an output that came
    inline is a view of the reply's read-only bytes until copied (arena outputs are copies
    already)."""
    return [a if a.flags.writeable else a.copy() for a in outputs]


class _Backoff:
    """Delays between retries of an answer that says "later" (``not_ready``, ``overloaded``):
    20 ms doubling to 200 ms, and None once the next one would end past the deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.delay = _BACKOFF_START

    def next_delay(self) -> float | None:
        delay = self.delay
        if time.monotonic() + delay >= self.deadline:
            return None
        self.delay = min(delay * 2, _BACKOFF_MAX)
        return delay


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
        self.pid = os.getpid()  # a forked child must not shut this socket down
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
        # Client.close() runs on another thread than the one calling: see close().
        self._state = threading.Lock()
        self.in_call = False
        self.closed = False
        self.refused = False  # the server refused a frame as a whole and closes this connection

    def close(self) -> None:
        """Close from any thread. A call in flight on the owning thread is woken, not left to
        poll a closed fd until its timeout (probe p24): the socket is shut down, the call sees
        EOF and closes the fds as it leaves, so no fd number is reused under its feet."""
        with self._state:
            self.closed = True
            if self.in_call and self.pid == os.getpid():
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already shut down, or the peer is gone: the call fails anyway
                return
        self._finalizer()

    def abandon(self) -> None:
        """In a forked child: close this process's copies of the fds and nothing else, since
        shutting the socket down or sending on it would break the parent's connection."""
        self.closed = True
        self._finalizer()

    def enter_call(self) -> bool:
        """Mark a call in flight, so that close() wakes it; False if closed already (the
        caller then uses a fresh connection: nothing was sent on this one)."""
        with self._state:
            if self.closed:
                return False
            self.in_call = True
            return True

    def request(self, op: str, fields: dict[str, object], deadline: float) -> dict[str, Any]:
        """Send one request (through the arena when worth it) and return its reply; the
        call must have been entered (``enter_call``), and is left here."""
        try:
            if op == "infer" and not self.arena_refused:
                layout = self._arena_layout(fields)
                if layout is not None and self._arena_ready(layout[-1], deadline):
                    return self._infer_through_arena(fields, layout, deadline)
            return self.call(protocol.make_request(next(self.ids), op, **fields), deadline)
        finally:
            self._leave_call()

    def _leave_call(self) -> None:
        with self._state:
            self.in_call = False
            closed = self.closed
        if closed:  # close() came during the call and left the fds to us
            self._finalizer()

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
                self.refused = True
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

    Fork: a child process never uses the connections it inherited (answers to the parent's
    requests would come to both, and the arena is the same memory); it closes its copies and
    connects afresh on its first call.
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
        self._input_dtypes: dict[str, dict[str, np.dtype[Any]]] = {}  # filled by _typed_feed
        _LIVE_CLIENTS.add(self)

    # -- public API --

    def run(
        self,
        model: str,
        output_names: list[str] | None,
        input_feed: Mapping[str, Any],
        run_options: object = None,
        *,
        version: int | None = None,
    ) -> list[np.ndarray]:
        """Like ``onnxruntime.InferenceSession.run``; ``output_names`` None means all.

        A feed given as a list or Python scalar becomes an array of the input's declared
        type; an ndarray (or numpy scalar) is sent as it is, and a wrong dtype raises
        ``BadDtype``. ``run_options`` must be None: the model runs in a worker with the
        worker's own options, so an ``onnxruntime.RunOptions`` raises ValueError and anything
        else TypeError. ``output_names`` given as a single string raises TypeError.
        """
        return self.run_with_version(model, output_names, input_feed, run_options,
                                     version=version)[0]

    def run_with_version(
        self,
        model: str,
        output_names: list[str] | None,
        input_feed: Mapping[str, Any],
        run_options: object = None,
        *,
        version: int | None = None,
    ) -> tuple[list[np.ndarray], int]:
        """``run`` plus the weight version that computed the answer."""
        _check_run_options(run_options)
        feed = self._typed_feed(model, input_feed)
        try:
            reply = self.request("infer", **_infer_fields(model, output_names, feed, version))
        except errors.BadDtype:
            if feed is input_feed:
                raise
            # The types we converted to were cached before a publish changed them: convert
            # again to what the daemon declares now, once.
            self._input_dtypes.pop(model, None)
            refreshed = self._typed_feed(model, input_feed)
            if _same_dtypes(refreshed, feed):
                raise
            reply = self.request("infer", **_infer_fields(model, output_names, refreshed, version))
        result = _writable(protocol.outputs_from_reply(reply)), _version_of(reply)
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
        backoff = _Backoff(deadline)
        while True:
            try:
                return protocol.check_reply(self._call(op, fields, deadline))
            except errors.NotReady:
                delay = backoff.next_delay()
                if delay is None:
                    raise
                time.sleep(delay)

    def close(self) -> None:
        """Close every thread's connection. A call in flight on another thread fails at once
        with ``ConnectionFailed`` ("client closed"), and is not resent; later calls connect
        afresh."""
        # A new threading.local first: a thread looking for its connection from now on
        # connects afresh instead of finding one that is being closed.
        self._local = threading.local()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            conn.close()
        self._input_dtypes.clear()  # a later call may reach another daemon

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --

    def _typed_feed(self, model: str, input_feed: Mapping[str, Any]) -> Mapping[str, Any]:
        """``input_feed`` itself when every feed is typed; else untyped feeds converted to the
        declared types, which the first such call for a model asks the daemon for."""
        if _all_typed(input_feed):
            return input_feed
        dtypes = self._input_dtypes.get(model)
        if dtypes is None:
            self._input_dtypes.update(_declared_input_dtypes(self.models()))
            dtypes = self._input_dtypes.get(model, {})  # unknown: the infer says so
        return _with_declared_dtypes(input_feed, dtypes)

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
                closed_by_client = conn is not None and conn.closed  # before _drop closes it
                self._drop(conn)
                if closed_by_client:  # not resent: the caller asked for the connection to go
                    raise errors.ConnectionFailed(
                        f"{self.socket_path}: client closed while the call was in flight") from exc
                if attempt + 1 == attempts or time.monotonic() >= deadline:
                    raise _connection_failed(self.socket_path, exc) from exc
            except (errors.Malformed, errors.FrameTooLarge):
                self._drop(conn)
                raise
            except errors.RemoteError:
                if conn is not None and conn.refused:  # e.g. the early door's not_ready to a
                    self._drop(conn)                   # frame it would not read: retry afresh
                raise
        raise AssertionError("unreachable")

    def _connection(self, deadline: float) -> _Connection:
        """This thread's connection, with a call entered on it (``_Connection.enter_call``)."""
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.enter_call():
            return conn
        timeout = min(self.connect_timeout, _remaining(deadline))
        conn = _Connection(self.socket_path, self.max_frame, timeout, self.spin,
                           self.shared_memory)
        conn.enter_call()  # before close() can see it, so that close() wakes this call
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

    def _forget_inherited_connections(self) -> None:
        """In a forked child: start with no connection, closing only our copies of the
        parent's fds (probe p6: sharing them gave 1-2 wrong answers per 100 calls)."""
        self._lock = threading.Lock()  # another parent thread may have held it at the fork
        conns, self._conns = list(self._conns), weakref.WeakSet()
        self._local = threading.local()
        for conn in conns:
            conn.abandon()


# Every live Client, for the one at-fork hook below: hooks cannot be unregistered, so one per
# Client would keep each alive (and run for it) forever.
_LIVE_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _forget_connections_after_fork() -> None:
    for client in list(_LIVE_CLIENTS):
        client._forget_inherited_connections()


os.register_at_fork(after_in_child=_forget_connections_after_fork)


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

    At most ``max_in_flight`` requests (default 32) are on the connection at once; more tasks
    wait their turn, within their timeout. A worker holds a bounded number of requests for all
    its connections (``--max-inflight``) and refuses the rest with ``overloaded``, which is
    retried with the ``not_ready`` backoff until the timeout, then raised.
    """

    def __init__(
        self,
        socket_path: PathLike | None = None,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_frame: int = protocol.DEFAULT_MAX_FRAME,
        max_in_flight: int = _DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.socket_path = os.fspath(socket_path if socket_path is not None else default_socket_path())
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        self.max_in_flight = max_in_flight
        self.last_version: int | None = None
        self.last_compute_seconds: float | None = None  # see Client.last_compute_seconds
        self._ids = itertools.count(1)
        self._proto: _ClientProtocol | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._slots = asyncio.Semaphore(max_in_flight)  # binds to a loop on first use
        self._input_dtypes: dict[str, dict[str, np.dtype[Any]]] = {}  # see Client._typed_feed
        self._dtypes_lock = asyncio.Lock()

    async def connect(self) -> None:
        """Connect now instead of on the first call (to fail fast at startup)."""
        await self._connection(time.monotonic() + self.connect_timeout)

    async def run(
        self,
        model: str,
        output_names: list[str] | None,
        input_feed: Mapping[str, Any],
        run_options: object = None,
        *,
        version: int | None = None,
    ) -> list[np.ndarray]:
        """Like ``onnxruntime.InferenceSession.run``; ``output_names`` None means all. Feeds,
        ``run_options`` and ``output_names`` are checked as by ``Client.run``."""
        return (await self.run_with_version(model, output_names, input_feed, run_options,
                                            version=version))[0]

    async def run_with_version(
        self,
        model: str,
        output_names: list[str] | None,
        input_feed: Mapping[str, Any],
        run_options: object = None,
        *,
        version: int | None = None,
    ) -> tuple[list[np.ndarray], int]:
        """``run`` plus the weight version that computed the answer."""
        _check_run_options(run_options)
        feed = await self._typed_feed(model, input_feed)
        try:
            reply = await self.request("infer", **_infer_fields(model, output_names, feed, version))
        except errors.BadDtype:
            if feed is input_feed:
                raise
            self._input_dtypes.pop(model, None)  # as Client.run_with_version: convert again once
            refreshed = await self._typed_feed(model, input_feed)
            if _same_dtypes(refreshed, feed):
                raise
            reply = await self.request("infer",
                                       **_infer_fields(model, output_names, refreshed, version))
        result = _writable(protocol.outputs_from_reply(reply)), _version_of(reply)
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
        backoff = _Backoff(deadline)
        while True:
            try:
                return protocol.check_reply(await self._call(op, fields, deadline))
            except (errors.NotReady, errors.Overloaded):  # overloaded: refused before running
                delay = backoff.next_delay()
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Close the connection; requests still in flight fail with ConnectionFailed.

        They are failed here, not by ``connection_lost``, so that they are not resent: the
        caller asked for the connection to go away.  A later call connects afresh.
        """
        proto, self._proto = self._proto, None
        self._input_dtypes.clear()  # a later call may reach another daemon
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

    async def _typed_feed(self, model: str, input_feed: Mapping[str, Any]) -> Mapping[str, Any]:
        """As ``Client._typed_feed``; concurrent first calls for a model ask the daemon once."""
        if _all_typed(input_feed):
            return input_feed
        dtypes = self._input_dtypes.get(model)
        if dtypes is None:
            async with self._dtypes_lock:
                if model not in self._input_dtypes:
                    self._input_dtypes.update(_declared_input_dtypes(await self.models()))
            dtypes = self._input_dtypes.get(model, {})  # unknown: the infer says so
        return _with_declared_dtypes(input_feed, dtypes)

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
        async with self._slots:  # waiting for a slot counts against the caller's deadline
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
