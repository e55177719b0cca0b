"""The worker process: answer clients on the shared socket, report to the supervisor.

A worker is forked by the supervisor with two inherited sockets: the client-facing listening
socket (shared by every worker; a connection stays with the worker that accepted it, and the
worker holding fewest connections accepts first, see Acceptor) and its own
end of a control socketpair. It maps the models' segments, creates one ONNX Runtime session per
model after fork, warms each up, tells the supervisor it is ready, and only then accepts.

Control channel (same framing as the client protocol, ``shmcache.protocol``)::

    worker -> supervisor   {"op": "ready", "pid", "models": {name: version}}
                           {"op": "boot_failed", "reason"}        then exit WORKER_BOOT_ERROR
                           {"op": "beat", "served", "inflight", "connections", "requests"}
                                                          every HEARTBEAT seconds
                           {"op": "reply", "id", "ok", ...}       answer to a request below
    supervisor -> worker   {"op": "stats", "id"}
                           {"op": "activate"}   a standby starts accepting (see below)
                           {"op": "prepare", "id", "model", "version", "segment",
                            "background"?}
                               map the segment, create and warm a session, reply; the
                               version is served once the supervisor flips the table.
                               background: a standby catching up after a flip; the work
                               runs in a thread of lower priority (see prepare())
                           {"op": "drop", "model", "version"}   forget a version
                           {"op": "live", "model", "version"}   a version went live (its
                               publish flipped, or a kept one was loaded again): requests
                               pinned to it are served from now on

A *standby* worker boots, maps and warms every model like any other, then waits without
accepting: when an active worker dies the supervisor activates it, so the replacement is ready
in the time a message takes (its pages are the shared segment's, so a spare costs only its
private memory).

Which version serves a request is read from the shared version table (``shmcache.state``) at
dispatch, so a flip reaches every worker at the same instant. A request pinned to a version
is served only once that version is live: loaded at boot, current, or announced by ``live``.
A version still being prepared is not, however many workers have it warm: its publish may yet
fail, and a version that fails never goes live.

Shutdown (SIGTERM): stop accepting; stop reading from each connection; answer every request
already read; close each connection once it has nothing in flight; exit when all are closed or
the deadline passes. SIGQUIT exits at once. SIGINT is ignored: a terminal's Ctrl-C reaches the
whole process group, and stopping is the supervisor's decision.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from shmcache import errors, protocol
from shmcache.arena import WorkerArena
from shmcache.hugepages import transient_huge_pages
from shmcache.state import ConnectionBoard, VersionTable
from worker import aligned_maps
from worker.heap import IdleHeapTrimmer
from worker.runtime import ModelRuntime, SessionSettings
from worker.stats import RequestStats

log = logging.getLogger("shmcache.worker")

WORKER_OK = 0
WORKER_BOOT_ERROR = 3
WORKER_LOST_SUPERVISOR = 4
HEARTBEAT = 1.0
INLINE_BELOW = 0.0005  # seconds: a run expected to take less goes on the loop thread
SPIN_AFTER_BELOW = 0.002  # seconds: the loop stays hot only after answering calls this quick
PR_SET_PDEATHSIG = 1
BACKGROUND_NICE = 10  # added to a background prepare thread's nice value
# A publish's prepare still running after PRECEDENCE_AFTER seconds gets precedence: the
# inference threads' nice value is raised by PREPARE_PRECEDENCE (see Worker.prepare_first),
# and CFS gives the prepare ~4/5 of a shared core instead of half.
PRECEDENCE_AFTER = 0.6
PREPARE_PRECEDENCE = 6
ATTACH_TIMEOUT = 5.0  # seconds a client has to send its arena's fd after asking to attach
ACCEPT_STEP = 0.010  # seconds a worker waits before accepting, per connection it already has
ACCEPT_MAX_DELAY = 0.050
# A worker may hold 1/ACCEPT_SLACK more connections than the least-connected other before it
# holds back (none below 16 each), and accepts up to ACCEPT_BATCH a wake while within it.
ACCEPT_SLACK = 16
ACCEPT_BATCH = 64
ACCEPT_RETRY = 0.1  # seconds before accepting again after accept() failed (EMFILE, say)

T = TypeVar("T")


@dataclass
class WorkerConfig:
    """Everything a worker needs, built once by the supervisor and inherited through fork."""

    models: dict[str, list[str]]  # model name -> segment names of every loaded version
    version_table: str | None = None  # shared table of current versions; None: newest loaded
    slots: dict[str, int] = field(default_factory=dict)  # model name -> slot in the table
    board: str | None = None  # shared connection counts (Acceptor); None: none kept
    board_slot: int | None = None  # this worker's slot on it
    settings: SessionSettings = field(default_factory=SessionSettings)
    max_inflight: int = 64
    concurrency: int = 1  # sessions run at once; each already uses intra_op_threads
    max_frame: int = protocol.DEFAULT_MAX_FRAME
    graceful_timeout: float = 30.0
    stall_timeout: float = 30.0  # seconds a client may leave a frame half-sent (check_stall)
    warmup_parallel: int = 2
    supervisor_pid: int = 0
    spin: float = 0.00025  # seconds the loop stays hot after a request; 0 lets it sleep at once
    serving: bool = True  # False: a warm standby that accepts nothing until told "activate"
    huge_weights: bool = False  # map the weights ORT keeps 2 MiB at a time (worker.aligned_maps)


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies, even by SIGKILL (prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(WORKER_LOST_SUPERVISOR)


class Worker:
    def __init__(self, config: WorkerConfig, listener: socket.socket, control: socket.socket) -> None:
        self.config = config
        self.control_sock = control
        self.runtimes: dict[str, dict[int, ModelRuntime]] = {m: {} for m in config.models}
        # (model, version) -> a token for the prepare under way for it. A drop takes it out
        # (an abandoned publish): a session finished after its drop must not stay, mapping a
        # dead segment. A token, not a set entry: a version dropped and asked for again (a
        # restore paused by a publish, then resumed) has two prepares in flight, and the
        # first one's end must neither take the second's place nor clear its entry (it did:
        # the resumed restore failed as "dropped").
        self.preparing: dict[tuple[str, int], object] = {}
        self.live: dict[str, set[int]] = {m: set() for m in config.models}
        self.table = VersionTable.attach(config.version_table) if config.version_table else None
        self.inflight = 0  # requests read and not answered yet, running or queued
        self.running = 0  # of those, handed to an inference thread (or running inline)
        self.turns: collections.deque[ClientConnection] = collections.deque()  # have queued
        self.served = 0
        self.started = time.monotonic()
        self.connections: set[ClientConnection] = set()
        self.prepares_running = 0  # a publish's prepares (not a standby's catch-up)
        self.yielding = False  # the inference threads run niced, for a late prepare
        # Per thread on Linux: PRIO_PROCESS 0 is the calling (main) thread's own.
        self.yielding_nice = os.getpriority(os.PRIO_PROCESS, 0) + PREPARE_PRECEDENCE
        self.pool_tids: list[int] = []
        self.pool = self.new_pool()
        self.request_stats = RequestStats()
        self.heap = IdleHeapTrimmer(enabled=not config.settings.memory_arena)
        self.stopping = asyncio.Event()
        self.hot_until = 0.0
        self.spinning = False
        board = ConnectionBoard.attach(config.board) if config.board else None
        self.acceptor = Acceptor(self, listener, board, config.board_slot)
        self.control: ControlConnection | None = None

    def new_pool(self) -> ThreadPoolExecutor:
        """Inference threads that record their thread ids (nice is per thread on Linux)."""
        tids: list[int] = []
        self.pool_tids = tids

        def register() -> None:
            tids.append(threading.get_native_id())
            if self.yielding:  # started while a prepare runs: yields like the others
                renice_thread(tids[-1], self.yielding_nice)

        return ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="infer",
                                  initializer=register)

    @contextlib.contextmanager
    def prepare_first(self) -> Iterator[None]:
        """A publish's prepare still running after PRECEDENCE_AFTER gets precedence over
        inference: the inference threads run PREPARE_PRECEDENCE nicer until it is done.

        The flip waits for every active worker's session over the new segment, and ORT's
        re-pack of every weight gets half a core next to a busy inference thread. swap.py
        (256 MiB MLP, 2 workers x 1 thread, 3 clients, 2 cores; 10 publishes a run, runs
        alternated): without precedence the prepare took p50 0.77 / 0.85 s, max 1.08 / 0.91 s,
        p99 during swaps 1.05x / 1.54x steady state; with it, late, p50 0.79 / 0.77 s, max
        0.83 / 0.81 s, p99 1.74x / 1.78x. Precedence from the start (nice +3) took the p50 to
        0.60-0.71 s, but slowed every call during it to a third of its speed, 2.5 % of a
        swap's calls: their p99 came to 2.09x steady state on a quiet host. Late only, the
        calls of the usual prepare keep their half core, and a slow one is still cut short.

        An unprivileged process cannot lower a nice value again, so the niced threads are
        retired afterwards (each after its current run) and fresh ones take over. Only with
        one intra-op thread: with more, ORT's own pool threads run the model, and they
        belong to the served session."""
        if self.config.settings.intra_op_threads != 1:
            yield
            return
        late = asyncio.get_running_loop().call_later(PRECEDENCE_AFTER, self.yield_to_prepares)
        self.prepares_running += 1
        try:
            yield
        finally:
            late.cancel()
            self.prepares_running -= 1
            if self.prepares_running == 0 and self.yielding:
                self.yielding = False
                niced, self.pool = self.pool, self.new_pool()
                niced.shutdown(wait=False)

    def yield_to_prepares(self) -> None:
        if self.yielding or not self.prepares_running:
            return
        self.yielding = True
        log.debug("a prepare is running late: inference yields to it")
        for tid in list(self.pool_tids):
            renice_thread(tid, self.yielding_nice)

    # --- boot ---------------------------------------------------------------------------

    async def boot(self) -> None:
        """Open every model's runtime and warm it up, a bounded number at once."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(self.config.warmup_parallel)

        async def open_one(model: str, segment: str) -> None:
            async with gate:
                runtime = await loop.run_in_executor(None, self._open_and_warm, segment)
            self.runtimes[model][runtime.version] = runtime
            self.live[model].add(runtime.version)  # a worker boots with live versions only

        await asyncio.gather(*(open_one(m, s) for m, segs in self.config.models.items()
                               for s in segs))
        if aligned_maps.installed():
            # After every session exists, in one window: THP on while another model's session
            # is created would put its heap on huge pages (see shmcache.hugepages, step 3).
            await loop.run_in_executor(None, self.map_all_weights_huge,
                                       [r for v in self.runtimes.values() for r in v.values()])
        await fault_delay("SHMCACHE_FAULT_BOOT_DELAY")  # a model slower than boot_timeout

    def _open_and_warm(self, segment: str, strict: bool = False,
                       huge_pages: bool = False) -> ModelRuntime:
        started = time.perf_counter()
        # A publish: only the re-packs fault in (see shmcache.hugepages). Not at boot.
        window = transient_huge_pages() if huge_pages else contextlib.nullcontext(False)
        with window as huge, aligned_maps.gc_paused():
            runtime = ModelRuntime.open(segment, self.config.settings)
            if huge_pages:  # a publish: inside its window (at boot, boot() does it after)
                self.map_weights_huge(runtime)
        log.debug("session for %s v%d created in %.3fs (huge pages: %s)", runtime.model,
                  runtime.version, time.perf_counter() - started, "on" if huge else "off")
        try:
            runtime.warm_up()
        except Exception as exc:
            if strict:
                raise
            # Some models need real data (e.g. indices in range); they still serve.
            log.warning("warm-up of %s failed on synthesized inputs: %s", runtime.model, exc)
        return runtime

    def map_all_weights_huge(self, runtimes: list[ModelRuntime]) -> None:
        with transient_huge_pages():  # MADV_COLLAPSE is refused while THP is off for us
            for runtime in runtimes:
                self.map_weights_huge(runtime)

    def map_weights_huge(self, runtime: ModelRuntime) -> None:
        """2 MiB entries for ORT's mappings of the segment (shmcache.hugemap, step 3); the
        caller holds a transient_huge_pages() window."""
        if not aligned_maps.installed():
            return
        started = time.perf_counter()
        done, possible = aligned_maps.collapse_mapped(runtime.segment.name)
        log.info("%s v%d: %.0f of %.0f MiB of the weights ONNX Runtime maps are on 2 MiB pages "
                 "(%.3fs)", runtime.model, runtime.version, done / 2**20, possible / 2**20,
                 time.perf_counter() - started)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        transport, self.control = await loop.connect_accepted_socket(
            lambda: ControlConnection(self), sock=self.control_sock)
        try:
            await self.boot()
        except Exception as exc:
            self.control.send({"op": "boot_failed", "reason": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(0)  # let the transport flush
            log.error("worker %d failed to boot: %s", os.getpid(), exc)
            return WORKER_BOOT_ERROR
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGQUIT, os._exit, WORKER_OK)
        if self.config.serving:
            self.acceptor.start()
        self.control.send({"op": "ready", "pid": os.getpid(), "models": self.current_versions()})
        self.heap.note_activity()  # session creation's leftovers go back once idle
        beat = asyncio.ensure_future(self._heartbeat())
        await self.stopping.wait()
        beat.cancel()
        await self.drain()
        return WORKER_OK

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            self.heap.maybe_trim(self.inflight)
            if self.control is not None:
                self.control.send({"op": "beat", "served": self.served, "inflight": self.inflight,
                                   "connections": len(self.connections),
                                   "requests": self.request_stats.snapshot()})

    async def drain(self) -> None:
        """Graceful stop: no new connections or requests; answer what was read; then close."""
        self.acceptor.stop()
        for conn in list(self.connections):
            conn.finish()
        deadline = time.monotonic() + self.config.graceful_timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()

    # --- requests -----------------------------------------------------------------------

    def keep_hot(self) -> None:
        """Stay on the CPU a moment after a request instead of sleeping in epoll at once.

        A core that halts, even for 200 us, runs the next request 3x slower (measured on this
        2-core VM: the request path took 83 us after an idle gap, 28 us hot); a back-to-back
        client's next request usually arrives within tens of microseconds. While spinning, the
        loop polls with a zero timeout, so it still reads every socket at once. Called after
        a reply goes out, never while a model computes (its threads need the cores), and not
        after a call that computed for a while (``send``'s ``hot``): its client is no quicker to
        send the next one, and needs a core now to read the answer, which a spinning loop
        next to ORT's spinning pool thread delayed by 0.17 ms (256 MiB MLP, 2 cores).
        """
        self.hot_until = time.perf_counter() + self.config.spin
        if not self.spinning and self.config.spin > 0:
            self.spinning = True
            asyncio.get_running_loop().call_soon(self._spin)

    def _spin(self) -> None:
        if time.perf_counter() < self.hot_until and not self.stopping.is_set():
            asyncio.get_running_loop().call_soon(self._spin)
        else:
            self.spinning = False

    def handle(self, conn: ClientConnection, msg: dict[str, Any]) -> None:
        try:
            request = protocol.parse_request(msg, protocol.WORKER_OPS, conn.arena)
        except errors.RemoteError as exc:
            if exc.request_id is None:
                raise
            conn.send(protocol.error_reply(exc.request_id, exc))
            return
        try:
            if request.op == "ping":
                conn.send(protocol.ok_ping(request.id, True, pid=os.getpid(), **self.versions()))
            elif request.op == "models":
                conn.send(protocol.ok_models(request.id, [r.signature() for r in self.current_runtimes()]))
            elif request.op == protocol.ATTACH:
                conn.start_attach(request.id)
            else:
                self.start_infer(conn, request)
        except errors.RemoteError as exc:
            self.request_stats.record(*self.stats_labels(request), exc.code, 0.0)
            conn.send(protocol.error_reply(request.id, exc))
        except Exception as exc:  # a bug must cost one request, never the worker
            log.exception("request %d failed", request.id)
            conn.send(protocol.error_reply(request.id, exc))

    def stats_labels(self, request: protocol.Request) -> tuple[str, int]:
        """The model and version a refused request is counted under: only names and versions
        this worker serves. A client's made-up names would otherwise each add a series that
        rides on every heartbeat (100k of them outgrew the channel's frame limit and cost the
        worker its supervisor) and a Prometheus label."""
        versions = self.runtimes.get(request.model or "")
        if versions is None:
            return "", 0
        return request.model or "", request.version if request.version in versions else 0

    def versions(self) -> dict[str, Any]:
        return {"versions": self.current_versions()}

    def current_version(self, model: str) -> int:
        if self.table is not None and model in self.config.slots:
            return self.table.current(self.config.slots[model])
        return max(self.runtimes[model], default=0)

    def coming_back(self, model: str) -> list[int]:
        if self.table is not None and model in self.config.slots:
            return self.table.coming_back(self.config.slots[model])
        return []

    def current_versions(self) -> dict[str, int]:
        return {m: self.current_version(m) for m in self.runtimes}

    def runtime_for(self, request: protocol.Request) -> ModelRuntime:
        """The runtime a request uses: its pinned version, else the table's current one."""
        model = request.model or ""
        versions = self.runtimes.get(model)
        if versions is None:
            raise errors.UnknownModel(
                f"no model {model!r}; serving: {', '.join(sorted(self.runtimes))}")
        current = self.current_version(model)
        wanted = request.version if request.version is not None else current
        if wanted != current and wanted not in self.live[model] and wanted in versions:
            raise errors.NotReady(f"model {model!r} version {wanted} is not live yet "
                                  "(a publish is preparing it)")
        runtime = versions.get(wanted)
        if runtime is None:
            if request.version is not None and request.version in self.coming_back(model):
                raise errors.NotReady(
                    f"model {model!r} version {wanted} is being loaded again after a restart "
                    "(kept for rollback); retry in a few seconds")
            if request.version is not None:
                raise errors.NotFound(
                    f"model {model!r} version {request.version} is not available "
                    f"(loaded: {', '.join(map(str, sorted(versions)))})")
            raise errors.NotReady(f"model {model!r} version {wanted} is not loaded here yet")
        return runtime

    def current_runtimes(self) -> list[ModelRuntime]:
        return [v[self.current_version(m)] for m, v in self.runtimes.items()
                if self.current_version(m) in v]

    def start_infer(self, conn: ClientConnection, request: protocol.Request) -> None:
        runtime = self.runtime_for(request)
        runtime.check(request.inputs, request.outputs)
        if self.inflight >= self.config.max_inflight:
            raise errors.Overloaded(
                f"worker {os.getpid()} has {self.inflight} requests in flight "
                f"(limit {self.config.max_inflight}); retry later")
        self.inflight += 1
        conn.inflight += 1
        job = Job(conn, request, runtime, time.perf_counter(),
                  sum(a.nbytes for a in request.inputs.values()))
        if self.running < self.config.concurrency and not self.turns:
            self.dispatch(job)
        else:
            self.queue_for_its_turn(job)

    def queue_for_its_turn(self, job: Job) -> None:
        """Wait for a free inference thread, in turn with the other connections' requests:
        a connection that pipelines many does not make everyone else wait behind them all."""
        conn = job.conn
        if not conn.queued:
            self.turns.append(conn)
        conn.queued.append(job)

    def dispatch_next(self) -> None:
        """Start queued requests on free threads, one per connection in turn."""
        while self.running < self.config.concurrency and self.turns:
            conn = self.turns.popleft()
            job = conn.queued.popleft()
            if conn.queued:
                self.turns.append(conn)
            self.dispatch(job)

    def drop_queued(self, conn: ClientConnection) -> None:
        """A connection that closed takes its requests not yet started with it."""
        if conn.queued:
            self.inflight -= len(conn.queued)
            conn.queued.clear()
            self.turns.remove(conn)

    def dispatch(self, job: Job) -> None:
        self.running += 1
        loop = asyncio.get_running_loop()
        if self.run_inline(job):
            future: asyncio.Future[Any] = loop.create_future()
            try:
                future.set_result(job.runtime.run(job.request.inputs, job.request.outputs))
            except Exception as exc:
                future.set_exception(exc)
            self.finish_infer(job, future)
            return
        future = loop.run_in_executor(self.pool, job.runtime.run, job.request.inputs,
                                      job.request.outputs)
        future.add_done_callback(lambda f: self.finish_infer(job, f))

    def run_inline(self, job: Job) -> bool:
        """Run on the loop thread when nothing else is in flight and the run is expected to
        take well under a millisecond: two thread hand-offs cost 60-90 us a call on 2 cores
        (benchmarks/latency.py), more than such a model computes. The expected time is the
        typical run scaled by the inputs' size, so an unusually large batch goes to the pool.

        Not for longer runs, though it would save the 256 MiB MLP 0.2 ms a call (e5f4c5d ran
        anything under 50 ms here): while a run holds the loop, the worker reads nothing, so
        requests wait unread in their sockets instead of being refused ``overloaded`` past
        max_inflight, and one connection's pipelined requests all run before any other
        connection's turn. Not while a version is prepared either: the flip waits for the
        worker's reply."""
        if self.config.concurrency != 1 or self.inflight != 1 or self.preparing:
            return False
        return job.runtime.expected_seconds(job.input_bytes) < INLINE_BELOW

    def finish_infer(self, job: Job, future: asyncio.Future[Any]) -> None:
        conn, request, runtime, started, _ = job
        self.running -= 1
        self.inflight -= 1
        conn.inflight -= 1
        self.served += 1
        self.heap.note_activity()
        exc = future.exception()
        if exc is None:
            pairs, compute = future.result()
            try:
                reply = protocol.ok_infer(request.id, runtime.version, pairs, compute,
                                          conn.arena, request.out, self.config.max_frame)
            except Exception as unsendable:  # an output the wire cannot carry: this call's error
                exc = unsendable
        elapsed = time.perf_counter() - started
        self.request_stats.record(runtime.model, runtime.version,
                          "ok" if exc is None else getattr(exc, "code", "internal"), elapsed)
        if exc is None:
            runtime.observe(elapsed, job.input_bytes)
        else:
            if not isinstance(exc, errors.RemoteError):
                log.error("inference on %s failed: %s", runtime.model, exc)
            reply = protocol.error_reply(request.id, exc)
        # This call's own time, not the runtime's average (which starts at 1 s): a fast
        # model's first replies keep the loop hot too.
        conn.send(reply, hot=elapsed < SPIN_AFTER_BELOW)
        self.dispatch_next()
        conn.request_done()

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime": time.monotonic() - self.started,
            "served": self.served,
            "inflight": self.inflight,
            "connections": len(self.connections),
            "models": {m: {"version": self.current_version(m), "loaded": sorted(v),
                           "served": sum(r.served for r in v.values())}
                       for m, v in self.runtimes.items()},
        }

    async def prepare(self, model: str, version: int, segment: str,
                      background: bool = False) -> None:
        """Map and warm a new version off the loop; it serves once the table is flipped.

        ``background`` (a standby catching up after a flip, nothing waits for it): the session
        is created in a thread whose nice value is raised, so on a busy host the re-pack of
        every weight takes only idle CPU from the active workers. Only with one intra-op
        thread: ORT's pool threads are created by this thread and would inherit its nice value,
        and an unprivileged process cannot lower it again once the spare becomes active.
        """
        if model not in self.runtimes:
            raise errors.UnknownModel(f"no model {model!r}")
        if version in self.runtimes[model]:
            return  # mapped at boot: this worker started after the segment was built
        token = object()
        self.preparing[(model, version)] = token
        try:
            runtime = await self._prepare_runtime(model, segment, background)
        finally:
            # drop() took it out, or a newer prepare of the same version took its place
            dropped = self.preparing.get((model, version)) is not token
            if not dropped:
                del self.preparing[(model, version)]
        why = ""
        if dropped:
            why = f"{model} v{version} was dropped while it was prepared"
        elif runtime.version != version or runtime.model != model:
            why = (f"segment {segment!r} holds {runtime.model} v{runtime.version}, "
                   f"expected {model} v{version}")
        if why:
            release_in_thread(runtime, f"release-{model}-v{version}")
            del runtime  # the release thread waits for the last other reference
            raise errors.PublishFailed(why)
        self.runtimes[model][version] = runtime
        self.heap.note_activity()

    async def _prepare_runtime(self, model: str, segment: str, background: bool) -> ModelRuntime:
        loop = asyncio.get_running_loop()
        # Strict when the served version warms up: a new version that cannot is a regression.
        strict = any(r.warmed for r in self.runtimes[model].values())
        with contextlib.nullcontext() if background else self.prepare_first():
            if background and self.config.settings.intra_op_threads == 1:
                runtime = await in_niced_thread(self._open_and_warm, segment, strict, True)
            else:
                runtime = await loop.run_in_executor(None, self._open_and_warm, segment, strict,
                                                     True)
            await fault_delay("SHMCACHE_FAULT_PREPARE_DELAY")  # a wider window to act in
        return runtime

    async def activate(self) -> None:
        """A standby becomes an active worker: it starts accepting on the shared socket."""
        if not self.acceptor.serving and not self.stopping.is_set():
            self.acceptor.start()
            log.info("worker %d activated", os.getpid())

    def drop(self, model: str, version: int) -> None:
        """Forget a version; requests still running on it keep their reference until done.
        Its session and mapping are freed off the loop (release_when_unused)."""
        self.preparing.pop((model, version), None)
        self.live.get(model, set()).discard(version)
        if version != self.current_version(model):
            runtime = self.runtimes.get(model, {}).pop(version, None)
            if runtime is not None:
                release_in_thread(runtime, f"release-{model}-v{version}")


class Job(NamedTuple):
    """One inference request, from when it is read until it is answered."""

    conn: ClientConnection
    request: protocol.Request
    runtime: ModelRuntime
    started: float  # perf_counter when read: its latency counts the wait for a thread
    input_bytes: int  # what the run is expected to cost by (ModelRuntime.expected_seconds)


class Acceptor:
    """Accepts on the listening socket every worker shares, least-connected worker first.

    The kernel wakes every worker polling the socket for each new connection, and whichever
    calls accept() first keeps that connection for its lifetime. Left to that race, the 3
    clients of benchmarks/swap.py landed on one of its 2 workers in about half the runs (the
    other idle; steady p50 100 ms instead of 57 ms). So a worker holding k connections more
    than the least-connected other worker (shmcache.state.ConnectionBoard) waits
    k x ACCEPT_STEP before it tries: that one takes the connection first, and one that is
    slow to wake, or stuck, only delays it. Workers holding as many accept at once: counting
    all held connections instead made every connection wait 50 ms once each worker held 5,
    and a burst of 300 connections took 7 s. Exact balance still made a burst take turns one
    connection a step: 300 idle connections opened at once kept a new client's first call
    waiting 1.5 s behind them (1500: 5.3 s). So past 16 connections each, a worker may be
    ahead by 1/ACCEPT_SLACK of what the others hold, and accepts in batches while it is.
    """

    def __init__(self, worker: Worker, listener: socket.socket,
                 board: ConnectionBoard | None = None, slot: int | None = None) -> None:
        self.worker = worker
        self.listener = listener
        self.board = board if slot is not None else None
        self.slot = slot or 0
        self.serving = False
        self.adopting = 0  # accepted, transport not made yet
        self.timer: asyncio.TimerHandle | None = None
        self.waited = 0.0  # held back for this pending connection so far

    def start(self) -> None:
        self.listener.setblocking(False)
        self.serving = True
        self.post()
        self._watch()

    def stop(self) -> None:
        self.serving = False
        self.post()
        asyncio.get_running_loop().remove_reader(self.listener.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def held(self) -> int:
        return len(self.worker.connections) + self.adopting

    def post(self) -> None:
        """Tell the other workers how many connections this one holds (whenever it changes)."""
        if self.board is not None:
            self.board.post(self.slot, self.held() if self.serving else None)

    def delay(self) -> float:
        held = self.held()
        if self.board is None:  # no board to compare with: hold back by what we hold
            return min(ACCEPT_MAX_DELAY, held * ACCEPT_STEP)
        fewest = self.board.fewest_elsewhere(self.slot)
        ahead = 0 if fewest is None else held - fewest - fewest // ACCEPT_SLACK
        return min(ACCEPT_MAX_DELAY, max(0, ahead) * ACCEPT_STEP)

    def _watch(self) -> None:
        if self.serving:
            asyncio.get_running_loop().add_reader(self.listener.fileno(), self._readable)

    def _readable(self) -> None:
        # Stop watching while we wait, or a level-triggered poll would call us in a loop.
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.listener.fileno())
        self.waited = 0.0
        self._accept_or_wait()

    def _accept_or_wait(self) -> None:
        """Accept now, or hold back; once held back, look again before taking it: a less
        connected worker that is late to wake (a busy host) gets another step, up to
        ACCEPT_MAX_DELAY in all (CI: 6 clients once went 4 and 2 after one late wake)."""
        self.timer = None
        delay = min(self.delay(), ACCEPT_MAX_DELAY - self.waited)
        if delay <= 0 or not self.serving:
            self._accept()
        else:
            self.waited += delay
            self.timer = asyncio.get_running_loop().call_later(delay, self._accept_or_wait)

    def _accept(self) -> None:
        """Accept one connection, and more while this worker is not ahead of the others."""
        self.timer = None
        for _ in range(ACCEPT_BATCH):
            if not self.serving:
                return
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break  # none left, or another worker took it
            except OSError as exc:  # out of fds, say: keep serving the connections we have
                log.warning("worker %d cannot accept: %s", os.getpid(), exc)
                self.timer = asyncio.get_running_loop().call_later(ACCEPT_RETRY, self._watch)
                return
            self.adopting += 1
            self.post()
            asyncio.ensure_future(self._adopt(sock))
            if self.delay() > 0:
                break  # ahead now: the next one is the others' first
        self._watch()

    async def _adopt(self, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: ClientConnection(self.worker), sock=sock)
        except OSError as exc:  # the client is already gone
            log.debug("accepted connection lost at once: %s", exc)
            sock.close()
        finally:
            self.adopting -= 1
            self.post()


class FramedConnection(asyncio.Protocol):
    """Frames in, frames out; a frame-level error closes the connection (msgpack Unpacker rule)."""

    def __init__(self, max_frame: int, requests: bool = False) -> None:
        self.decoder = protocol.FrameDecoder(max_frame, requests)
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
            for msg in messages:
                self.on_message(msg)
        except errors.RemoteError as exc:  # FrameTooLarge / Malformed: stream is untrustworthy
            self.send(protocol.error_reply(None, exc))
            self.close_now()
        except Exception:  # a bug costs this connection, said out loud (uvloop would be silent)
            log.exception("closing a connection after an unexpected error reading from it")
            self.close_now()

    def on_message(self, msg: dict[str, Any]) -> None:
        raise NotImplementedError

    def after_send(self, hot: bool) -> None:
        """Hook for subclasses: the client connection keeps its worker hot after replying."""

    def send(self, msg: dict[str, Any], hot: bool = True) -> None:
        """``hot``: the loop may stay on the CPU after this reply (Worker.keep_hot)."""
        self.after_send(hot)
        if self.transport is not None and not self.transport.is_closing():
            parts = protocol.encode_frame_parts(msg)
            if len(parts) == 1:
                self.transport.write(parts[0])  # small frames come joined: one plain write
            else:
                self.transport.writelines(parts)

    def close_now(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ClientConnection(FramedConnection):
    """One client's connection. Reading stops while any of these holds: the client does not
    read its answers (write buffer full), an arena hand-off is under way, the connection is
    finishing, or frames it sent wait unparsed in ``backlog`` because it already has
    ``per_connection`` requests read and unanswered. So one pipelining client takes at most
    half the worker's in-flight limit, and its requests waiting for a thread take turns with
    everyone else's (``Worker.queue_for_its_turn``): 64 pipelined requests of 10 MB once
    filled a worker and kept another client's one-row call waiting 3 s."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker.config.max_frame, requests=True)
        self.worker = worker
        self.inflight = 0
        self.finishing = False
        self.arena: WorkerArena | None = None
        self.attaching: socket.socket | None = None  # our dup of the socket while an fd comes
        self.attach_timer: asyncio.TimerHandle | None = None
        self.queued: collections.deque[Job] = collections.deque()  # read, waiting for a thread
        self.backlog: collections.deque[dict[str, Any]] = collections.deque()  # not parsed yet
        self.draining = False
        self.write_paused = False
        self.reading = True
        # Half the worker's in-flight limit: the other half stays for everyone else.
        self.per_connection = max(1, worker.config.max_inflight // 2)
        self.last_progress = 0.0  # loop time of the last bytes read (or of reading resumed)
        self.stall_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.worker.connections.add(self)
        self.worker.acceptor.post()
        if self.worker.stopping.is_set():  # accepted just before the stop: nothing read yet
            self.finish()

    def data_received(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.last_progress = loop.time()
        super().data_received(data)
        if self.stall_timer is None and self.decoder.pending() and self.transport is not None:
            self.stall_timer = loop.call_later(self.worker.config.stall_timeout, self.check_stall)

    def check_stall(self) -> None:
        """A frame half-sent and then nothing for stall_timeout seconds while we read: close.
        The partial frame holds up to max_frame bytes of this worker's memory, and the client
        is gone or stuck; one that is merely slow keeps sending, and time we spend not
        reading it (back-pressure, an arena hand-off) is not counted against it."""
        self.stall_timer = None
        if self.transport is None or self.transport.is_closing() or not self.decoder.pending():
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self.last_progress if self.reading else 0.0
        left = self.worker.config.stall_timeout - idle
        if left > 0:
            self.stall_timer = loop.call_later(left, self.check_stall)
            return
        pending = self.decoder.pending()
        log.warning("closing a connection that sent %d bytes of a frame and then nothing for "
                    "%.0fs", pending, idle)
        self.send(protocol.error_reply(None, errors.Malformed(
            f"request incomplete: {pending} bytes of a frame, then nothing for "
            f"{self.worker.config.stall_timeout:g}s; the connection is closed")))
        self.close_now()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        self.worker.connections.discard(self)
        self.worker.acceptor.post()
        self.transport = None
        self.backlog.clear()  # nobody left to answer
        self.worker.drop_queued(self)
        self.stop_attaching()
        self.set_arena(None)

    def eof_received(self) -> bool:
        """The client half-closed: what it sent is still answered, then the connection
        closes (True keeps our side open for the answers)."""
        self.finish()
        return True

    def update_reading(self) -> None:
        """Read while nothing in the class docstring says not to."""
        if self.transport is None:
            return
        want = not (self.finishing or self.attaching is not None or self.write_paused
                    or self.backlog)
        if want != self.reading:
            self.reading = want
            if want:
                self.last_progress = asyncio.get_running_loop().time()  # its stall starts now
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    # --- arena hand-off (shmcache.arena draws it) ---

    def start_attach(self, rid: int) -> None:
        """Stop reading the stream, say "send it", and wait for one byte carrying an fd.

        uvloop reads with plain recv, which would drop the fd, so the byte is read by our own
        recvmsg on a dup of the socket while the transport's reading is paused.
        """
        if self.attaching is not None or self.transport is None:
            raise errors.Malformed("attach already in progress")
        self.attaching = socket.socket(fileno=os.dup(self.transport.get_extra_info("socket").fileno()))
        self.update_reading()
        self.attaching.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.attaching.fileno(), self.receive_arena, rid)
        self.attach_timer = loop.call_later(ATTACH_TIMEOUT, self.attach_timed_out)
        self.send(protocol.ok_result(rid, send_fd=True))

    def receive_arena(self, rid: int) -> None:
        assert self.attaching is not None
        try:
            data, fds = recv_fds(self.attaching)
        except BlockingIOError:
            return
        except errors.Malformed as exc:  # too many fds: say so, then hang up
            self.send(protocol.error_reply(rid, exc))
            data, fds = b"", []
        except (ConnectionResetError, BrokenPipeError) as exc:  # the client's doing: quiet
            log.debug("arena hand-off failed: %s", exc)
            data, fds = b"", []
        except OSError as exc:
            log.warning("arena hand-off failed: %s", exc)
            data, fds = b"", []
        self.stop_attaching()
        if not data:  # the client hung up, or the hand-off failed
            self.close_now()
            return
        try:
            if len(fds) != 1:
                raise errors.Malformed(f"attach expects exactly one fd, got {len(fds)}")
            arena = WorkerArena.adopt(fds.pop(), self.arena_limit)
            self.set_arena(arena)
            self.send(protocol.ok_result(rid, size=arena.size, limit=self.arena_limit))
        except errors.RemoteError as exc:
            self.send(protocol.error_reply(rid, exc))
        finally:
            for fd in fds:
                os.close(fd)
        self.update_reading()

    def attach_timed_out(self) -> None:
        log.info("a client asked to attach an arena and sent no fd within %ss", ATTACH_TIMEOUT)
        self.stop_attaching()
        self.close_now()

    def stop_attaching(self) -> None:
        if self.attaching is not None:
            asyncio.get_running_loop().remove_reader(self.attaching.fileno())
            if self.attach_timer is not None:
                self.attach_timer.cancel()
            self.attaching.close()  # our dup only; the transport's socket stays open
            self.attaching = None

    @property
    def arena_limit(self) -> int:
        """Largest arena a client may hand us: a frame's worth of inputs and of outputs."""
        return 2 * self.worker.config.max_frame

    def set_arena(self, arena: WorkerArena | None) -> None:
        if self.arena is not None:
            self.arena.close()
        self.arena = arena

    def on_message(self, msg: dict[str, Any]) -> None:
        if self.finishing:
            return
        if self.backlog or self.inflight >= self.per_connection:
            self.backlog.append(msg)  # the rest of what one read brought; reading stops
            self.update_reading()
            return
        self.worker.handle(self, msg)

    def request_done(self) -> None:
        """One of this connection's requests was answered: start what waits behind it."""
        if self.draining:  # answered inline, inside the loop below: it carries on
            return
        self.draining = True
        try:
            while self.backlog and self.inflight < self.per_connection \
                    and self.transport is not None:
                self.worker.handle(self, self.backlog.popleft())
        finally:
            self.draining = False
        self.update_reading()
        self.maybe_close()

    def after_send(self, hot: bool) -> None:
        if self.worker.inflight == 0 and hot:
            self.worker.keep_hot()

    # Back-pressure: a client that does not read its answers stops being read from.
    def pause_writing(self) -> None:
        self.write_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.update_reading()

    def finish(self) -> None:
        """Read nothing more; close once every request already read has been answered."""
        self.finishing = True
        self.update_reading()
        self.maybe_close()

    def maybe_close(self) -> None:
        if self.finishing and self.inflight == 0 and not self.backlog:
            self.close_now()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class ControlConnection(FramedConnection):
    def __init__(self, worker: Worker) -> None:
        super().__init__(protocol.DEFAULT_MAX_FRAME)
        self.worker = worker

    def on_message(self, msg: dict[str, Any]) -> None:
        op, rid = msg.get("op"), msg.get("id")
        if op == "stats":
            self.send({"op": "reply", "id": rid, "ok": True, **self.worker.stats()})
        elif op == "prepare":
            asyncio.ensure_future(self.answer_prepare(rid, msg))
        elif op == "live":
            self.worker.live.setdefault(str(msg.get("model")), set()).add(
                int(msg.get("version", -1)))
        elif op == "drop":
            self.worker.drop(str(msg.get("model")), int(msg.get("version", -1)))
        elif op == "activate":
            asyncio.ensure_future(self.worker.activate())
        else:
            self.reply_error(rid, errors.UnsupportedOp(f"unknown control op {op!r}"))

    async def answer_prepare(self, rid: object, msg: dict[str, Any]) -> None:
        try:
            await self.worker.prepare(str(msg["model"]), int(msg["version"]), str(msg["segment"]),
                                      background=bool(msg.get("background")))
        except Exception as exc:  # any failure vetoes the publish; the worker keeps serving
            self.reply_error(rid, exc)
            return
        self.send({"op": "reply", "id": rid, "ok": True, "prepared": msg["version"]})

    def reply_error(self, rid: object, exc: BaseException) -> None:
        code = exc.code if isinstance(exc, errors.RemoteError) else "internal"
        self.send({"op": "reply", "id": rid, "ok": False,
                   "error": {"code": code, "message": f"{type(exc).__name__}: {exc}"}})

    def connection_lost(self, exc: Exception | None) -> None:
        # The supervisor is gone (or closed our channel): nobody coordinates us any more.
        log.warning("worker %d lost its supervisor; exiting", os.getpid())
        os._exit(WORKER_LOST_SUPERVISOR)


def recv_fds(sock: socket.socket, max_fds: int = 4) -> tuple[bytes, list[int]]:
    """One byte and the fds that came with it (close-on-exec). More than ``max_fds`` (the
    kernel closed the rest) -> ``Malformed``, after closing the ones that arrived."""
    data, ancdata, flags, _ = sock.recvmsg(
        1, socket.CMSG_SPACE(max_fds * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += memoryview(payload)[:usable].cast("i").tolist()
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise errors.Malformed(f"attach expects exactly one fd, got more than {max_fds}")
    return data, fds


async def fault_delay(variable: str) -> None:
    """Fault injection for tests: sleep as many seconds as ``variable`` says, if set."""
    delay = float(os.environ.get(variable, "0"))
    if delay:
        await asyncio.sleep(delay)


def renice_thread(tid: int, nice: int) -> None:
    """Set thread ``tid``'s nice value (best effort: it may have exited)."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, nice))
    except OSError:
        pass


async def in_niced_thread(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a new thread that first raises its own nice value by BACKGROUND_NICE
    (Linux: nice is per thread, set through the thread id); the result, awaited."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            renice_thread(threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0)
                          + BACKGROUND_NICE)
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name="prepare-background", daemon=True).start()
    return await done


RELEASE_POLL = 0.005  # seconds between looks at whether a dropped version is still in use
RELEASE_PATIENCE = 600.0  # seconds after which a release stops waiting for other holders


def release_in_thread(runtime: ModelRuntime, name: str) -> None:
    """Hand ``runtime`` to a thread of its own that frees it once unused (the caller must
    hold no other reference)."""
    box = [runtime]
    del runtime
    threading.Thread(target=release_when_unused, args=(box,), daemon=True, name=name).start()


def release_when_unused(box: list[Any]) -> None:
    """Hold the last reference to a dropped runtime and let it go here, in a thread of its own.

    Freeing a session and unmapping its segment is not free: 16-26 ms per worker for the
    256 MiB MLP, and 100-140 ms in whichever process drops the last mapping of a segment
    already unlinked (the kernel frees its pages then); measured during benchmarks/swap.py.
    On the event loop that stalls every request the worker holds; here only the session's
    destructor holds the GIL (7-13 ms idle), the unmapping does not (ModelRuntime.close).
    Not at a raised nice value: a thread holding the GIL at low priority stalls the loop
    longer (swap.py: calls of 300-400 ms around the flips when it was niced). Requests still
    running on the version (pinned ones, or in flight at the flip) hold references of their
    own: wait for them, so that the last reference to go is this one. ``box`` carries the
    runtime in, so that the thread's own copy of its arguments does not hold it too.
    """
    runtime = box.pop()
    deadline = time.monotonic() + RELEASE_PATIENCE
    # Two references are ours: this frame's name and getrefcount's argument.
    while sys.getrefcount(runtime) > 2 and time.monotonic() < deadline:
        time.sleep(RELEASE_POLL)
    if sys.getrefcount(runtime) == 2:
        runtime.close()


def run_worker(config: WorkerConfig, listener: socket.socket, control: socket.socket) -> int:
    """Entry point in the forked child. Creates the event loop and sessions here, after fork."""
    import uvloop

    if config.supervisor_pid:
        die_with_parent(config.supervisor_pid)
    # The supervisor's commands are not ours: sent to the whole group (Ctrl-C, a terminal's
    # hangup, `systemctl kill -s HUP`, which signals every process of the unit), a HUP killed
    # every worker and TTIN/TTOU stopped them. The supervisor tells its workers what to do.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if config.huge_weights:  # before the first session: its mappings are the ones placed
        why = aligned_maps.install()
        if why is not None:
            log.info("the weights stay on 4 KiB pages: %s", why)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(config, listener, control)
    try:
        return loop.run_until_complete(worker.serve())
    finally:
        worker.pool.shutdown(wait=False, cancel_futures=True)
