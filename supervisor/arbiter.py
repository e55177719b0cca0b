"""The arbiter: the daemon's main process and nothing else (after gunicorn's arbiter.py).

It binds the sockets, has each model's segment built (by a helper process, ``supervisor.build``),
forks the workers, and keeps them alive. The main loop is flat::

    wait on the selector (signal pipe, worker channels, control clients, early clients)
      -> dispatch: handle_<signal>, on_worker_message, on_control_request, answer_early_client
      -> tick: reap_workers, reap_builds, murder_stale_workers, manage_workers, notify

Handlers change desired state; ``manage_workers`` does the work. Signal handlers only queue:
Python's C-level handler writes the signal number to a pipe (``signal.set_wakeup_fd``) and the
loop reads it — no logging or I/O in a handler (gunicorn issues 2564, 2816, 3004).

Signals:

    =========  ===========================================================================
    TERM, INT  graceful stop: stop accepting; workers answer what they have read, within
               graceful_timeout; then KILL; unlink segments and sockets; exit 0
    QUIT       fast stop: workers exit at once; unlink segments and sockets; exit 0
    HUP        reload: replace the workers one at a time, each new one ready before an old
               one stops, so no request fails
    TTIN       one worker more
    TTOU       one worker fewer (never below 1)
    CHLD       (wakes the loop to reap)
    =========  ===========================================================================

Exit codes: EXIT_OK 0; EXIT_STARTUP 78 (EX_CONFIG: a startup check failed: configuration,
model, socket, /dev/shm; the CLI exits 78 for a configuration error too); EXIT_BOOT_LOOP 3
(workers failed to boot repeatedly; same value as worker.WORKER_BOOT_ERROR). None of these is
mended by starting again, so the unit does not restart on them (RestartPreventExitStatus); any
other failure (1: an uncaught exception, a signal) is restarted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
import os
import resource
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import uvloop  # noqa: F401 - imported once here so each forked worker starts ~50 ms sooner

from shmcache import errors, protocol, registry
from shmcache.model import model_digest
from shmcache.segment import OwnedSegment, Segment
from shmcache.state import ConnectionBoard, VersionTable
from worker.heap import load_glibc, trim_heap
from supervisor.config import ConfigError, ServeConfig
from supervisor.memlock import LockedSegment, MemoryLockError, lock_segment
from supervisor.metrics import HttpEndpoint, MetricsRegistry, standard_routes
from supervisor.notify import Notifier
from supervisor.peers import Peer
from supervisor.publish import PublishJob
from supervisor.versions import Manifest, ModelState, Version

log = logging.getLogger("shmcache.supervisor")

EXIT_OK = 0
EXIT_STARTUP = 78  # sysexits.h EX_CONFIG
EXIT_BOOT_LOOP = 3
WORKER_BOOT_ERROR = 3  # keep in step with worker.server.WORKER_BOOT_ERROR (not imported: ORT)
FAST_STOP_SECONDS = 5.0
ANSWERING_WITHIN = 3.5  # seconds: three missed heartbeats and the watchdog stops being fed
AWAY_AFTER = 2.0  # seconds between ticks past which the supervisor itself was stopped or starved
TICK = 0.25
MAX_SOCKET_PATH = 107  # bytes in a Unix socket's path (sun_path, less its NUL)
ACCEPT_PAUSE = 0.1  # seconds a listener rests after accept() failed (out of fds, say)
MAX_CONTROL_PEERS = 64  # control connections held at once; more are closed as they come
MAX_EARLY_PEERS = 256  # clients answered by the early door at once, likewise
EARLY_MAX_FRAME = 2**20  # the early door answers not_ready to anything: it need not read more
CONTROL_OPS = frozenset({"ping", "status", "health", "publish", "publish_status", "rollback"})

SIGNALS = {
    signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit", signal.SIGHUP: "hup",
    signal.SIGTTIN: "ttin", signal.SIGTTOU: "ttou", signal.SIGCHLD: "chld",
}


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (systemd's default soft limit is 1024): each
    client holds a connection to a worker, and the workers inherit this. The supervisor's own
    client connections are capped (MAX_EARLY_PEERS, MAX_CONTROL_PEERS) well below it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)


def read_back(owned: OwnedSegment) -> tuple[bool, bytes | None, bytes | None]:
    """Whether a segment the builder just wrote loads pre-packed blobs, its pre-pack key and
    the digest of the file it was built from. If it cannot be read back: blobs assumed (a
    spare too many is the safe mistake), key and digest unknown (the cache is then left as
    it is, and the manifest records no digest)."""
    try:
        with Segment.attach(owned.name) as segment:
            return segment.holds_blobs, segment.header.key, segment.header.source
    except errors.SegmentError as exc:
        log.warning("cannot read back %s: %s", owned.name, exc)
        return True, None, None


class StartupError(errors.ShmcacheError):
    """A check before serving failed; the message says what and how to fix it."""


@dataclass
class WorkerHandle:
    pid: int
    peer: Peer
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    state: str = "booting"  # booting -> ready -> stopping
    last_beat: float = field(default_factory=time.monotonic)
    served: int = 0
    inflight: int = 0
    connections: int = 0  # client connections it holds
    versions: dict[str, int] = field(default_factory=dict)
    retiring: bool = False  # to be replaced by a reload
    standby: bool = False  # warm, not accepting, until activated to replace an active worker
    board_slot: int | None = None  # its slot on the connection board, if it got one
    boot_timed_out: bool = False  # killed for boot_timeout: its exit is a boot failure
    # a standby's prepares after a flip: control id -> (model, version)
    catching_up: dict[int, tuple[str, int]] = field(default_factory=dict)

    @property
    def role(self) -> str:
        return "standby" if self.standby else "active"


@dataclass
class PendingStatus:
    """A `status` request waiting for fresh counters from every worker (or a deadline)."""

    peer: Peer
    request_id: int
    waiting: set[int]
    deadline: float


@dataclass
class Build:
    model: str
    path: Path
    segment: str
    version: int
    proc: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)
    job: PublishJob | None = None  # set when the build is a publish
    output: bytearray = field(default_factory=bytearray)  # stdout not yet split into lines
    result: dict[str, Any] = field(default_factory=dict)

    def take_lines(self, data: bytes) -> list[dict[str, Any]]:
        """Complete JSON lines from the builder's stdout (progress, then the result)."""
        self.output += data
        *lines, rest = self.output.split(b"\n")
        self.output = bytearray(rest)
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except ValueError:
                continue
        return parsed


def release_startup_heap() -> None:
    """The supervisor's heap after start-up (config, manifest, builders' output) back to the
    OS once: it stays mostly idle from here on, and a hugetlb-tuned glibc (shmcache.hugepages)
    keeps up to 2 MiB of the heap's top otherwise."""
    libc = load_glibc()
    if libc is not None:
        trim_heap(libc)


class Arbiter:
    def __init__(self, config: ServeConfig, *, notifier: Notifier | None = None) -> None:
        self.cfg = config
        self.instance = registry.instance_id(config.socket)
        self.notifier = notifier or Notifier()
        self.sel = selectors.DefaultSelector()
        self.models: dict[str, ModelState] = {
            spec.name: ModelState(spec.name, slot, spec.path)
            for slot, spec in enumerate(config.models)}
        self.table: VersionTable | None = None
        self.board: ConnectionBoard | None = None
        self.manifest = Manifest(config.state_dir)
        self.publishes: dict[str, PublishJob] = {}
        self.restores_tried: set[tuple[str, int]] = set()  # (model, version) restored or tried
        self.restores_paused: set[str] = set()  # models whose restore waits for a publish
        self.initial: dict[str, tuple[int, Path]] = {}  # model -> version and file to start with
        self.prepare_ids: dict[int, tuple[str, int]] = {}  # control id -> (model, worker pid)
        self.metrics = MetricsRegistry(memory_of=memory_of)
        self.http: HttpEndpoint | None = None
        self.locks: dict[str, LockedSegment] = {}  # segment name -> its locked mapping
        self.builds: dict[str, Build] = {}
        self.workers: dict[int, WorkerHandle] = {}
        self.target = config.workers
        self.phase = "starting"  # starting -> building -> running -> stopping -> done
        self.stop_deadline = 0.0
        self.exit_code = EXIT_OK
        self.boot_failures = 0
        self.restarts = 0
        self.ready_announced = False
        self.reloading = False
        self.spares_wanted: int | None = None  # standby count last logged
        self.listener: socket.socket | None = None
        self.ctl_listener: socket.socket | None = None
        self.ctl_peers: set[Peer] = set()
        self.pending_status: list[PendingStatus] = []
        self.next_control_id = 1
        self.early_peers: set[Peer] = set()
        self.accept_paused: dict[socket.socket, float] = {}  # listener -> resume at (monotonic)
        self.last_tick = time.monotonic()
        self.polled_at = time.monotonic()  # when the loop last read what is pending
        self.started = time.time()
        self.last_watchdog = 0.0
        self.sig_r, self.sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # --- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; returns the process exit code."""
        try:
            self.start()
            while self.phase != "done":
                self.wait_and_dispatch()
                self.tick()
        except (StartupError, ConfigError) as exc:
            log.error("%s", exc)
            self.exit_code = EXIT_STARTUP
        finally:
            self.cleanup()
        return self.exit_code

    def start(self) -> None:
        self.install_signals()
        raise_fd_limit()
        # What the daemon writes (the state directory's published versions and caches, the
        # builder's files) is as private as its segments: 0600, or 0640 with a group. The
        # unit's UMask=0027 covered this only under systemd.
        os.umask(0o027 if self.cfg.group is not None else 0o077)
        self.check_group()
        self.check_models()
        self.check_socket_free(self.cfg.socket)
        self.check_socket_free(self.cfg.control_socket)
        self.load_manifest()
        self.adopt_intact_segments()
        self.sweep_orphans()
        gid = self.cfg.group_id()
        self.table = VersionTable.create(
            registry.segment_name(self.instance, "_state", 0), list(self.models),
            mode=0o640 if gid is not None else 0o600, gid=gid)
        self.board = ConnectionBoard.create(
            registry.segment_name(self.instance, "_board", 0),
            mode=0o640 if gid is not None else 0o600, gid=gid)
        for state in self.models.values():
            if state.current:
                self.table.flip(state.slot, state.current)
        self.listener = self.bind(self.cfg.socket, 0o660, backlog=1024)
        self.ctl_listener = self.bind(self.cfg.control_socket, 0o600, backlog=64)
        self.sel.register(self.ctl_listener, selectors.EVENT_READ, self.accept_control)
        self.start_metrics()
        self.open_early_door()
        log.info("listening on %s (control %s), instance %s, pid %d", self.cfg.socket,
                 self.cfg.control_socket, self.instance, os.getpid())
        if self.cfg.optimization == "disabled" and self.cfg.prepack:
            # Pre-packed blobs come from ONNX Runtime's offline pass, which "disabled" skips.
            log.warning("--optimization disabled: no pre-packed weights (workers run with "
                        "pre-packing off, MatMul/Gemm about 1.8x slower); basic or above "
                        "pre-packs them once for every worker")
        self.phase = "building"
        self.start_builds()

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self.sig_w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, lambda signum, frame: None)  # the wakeup fd is the queue
        self.sel.register(self.sig_r, selectors.EVENT_READ, self.drain_signals)

    def check_models(self) -> None:
        for spec in self.cfg.models:
            if not spec.path.exists():
                raise StartupError(f"model {spec.name!r}: file {str(spec.path)!r} does not exist")
            if not spec.path.is_file() or not os.access(spec.path, os.R_OK):
                raise StartupError(f"model {spec.name!r}: {str(spec.path)!r} is not a readable file")

    def check_group(self) -> None:
        """--group: the sockets and segments are given to it, which only its members (or root)
        may do; say so before anything is created rather than fail half-way."""
        gid = self.cfg.group_id()
        if gid is None or os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
            return
        raise StartupError(f"group = {self.cfg.group!r}: uid {os.geteuid()} is not a member, "
                           "so it cannot give the sockets and segments to that group")

    def check_socket_free(self, path: Path) -> None:
        """Refuse to steal a live daemon's socket; remove a dead one's leftover socket file,
        and nothing else: a regular file given as --socket by mistake was once unlinked."""
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise StartupError(
                f"socket path {path} is {len(os.fsencode(path))} bytes; a Unix socket's path "
                f"can be at most {MAX_SOCKET_PATH} (the control socket adds "
                f"{len(os.fsencode(self.cfg.control_socket)) - len(os.fsencode(self.cfg.socket))}"
                f" to --socket)")
        directory = path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create socket directory {directory}: {exc.strerror}") from exc
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StartupError(f"socket directory {directory} is not writable by uid {os.geteuid()}")
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise StartupError(f"{path} exists and is not a socket; not replacing it "
                               "(choose another --socket)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.warning("removing stale socket %s (no daemon behind it)", path)
            path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise StartupError(f"cannot probe existing socket {path}: {exc}") from exc
        finally:
            probe.close()
        raise StartupError(f"another shmcache daemon is already serving on {path}; "
                           "stop it first or choose another --socket")

    def load_manifest(self) -> None:
        try:
            self.manifest.load()
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        for state in self.models.values():
            state.served = self.manifest.served(state.name)

    def initial_version(self, state: ModelState) -> tuple[int, Path]:
        """The last committed version survives restarts; else version 1 of the given file.

        A committed version built from the configured model file, which has been replaced
        since, is gone: the file's new contents serve under a new number (recorded at once),
        never under the old one. Worked out once per start."""
        if state.name not in self.initial:
            self.initial[state.name] = self.committed_or_first(state)
        return self.initial[state.name]

    def committed_or_first(self, state: ModelState) -> tuple[int, Path]:
        recorded = self.manifest.recorded(state.name)
        if recorded is not None and self.manifest.is_own_copy(recorded[1]):
            if not recorded[1].is_file():
                raise StartupError(
                    f"model {state.name!r}: {recorded[1]}, the copy of committed "
                    f"v{recorded[0]}, is missing. {self.reset_advice(state)}")
            return recorded  # the builder checks its digest (a mismatch is damage)
        # The configured file (as configured now: its path may have changed too): it keeps
        # its number only while it holds what that number served.
        version = recorded[0] if recorded is not None else 1
        expected = self.manifest.digest(state.name, version)
        if expected is None:
            return version, state.path  # nothing recorded to compare (older manifests)
        digest = bytes.fromhex(model_digest(state.path))
        if digest == expected:
            return version, state.path
        renumbered = self.manifest.highest(state.name) + 1
        log.warning("model %r: %s is not what v%d served (replaced, or another path "
                    "configured); serving it as v%d", state.name, state.path, version, renumbered)
        self.manifest.record_current(state.name, renumbered, state.path, digest)
        return renumbered, state.path

    def reset_advice(self, state: ModelState) -> str:
        return (f"Put the file back, or delete \"version\" and \"file\" (not \"issued\") from "
                f"{state.name!r} in {self.manifest.path} to serve {state.path}")

    def adopt_intact_segments(self) -> None:
        """After a crash, re-attach the committed and kept versions' segments that are sealed
        and intact, and built from the file the manifest names for them."""
        found = [f for f in registry.list_objects(self.instance) if f.orphan and f.sealed]
        for state in self.models.values():
            current = self.initial_version(state)
            wanted = dict([current, *self.kept_to_restore(state)])
            for item in found:
                if item.model != state.name or item.version not in wanted \
                        or item.version in state.versions:
                    continue
                version, file = item.version, wanted[item.version]
                try:
                    with Segment.attach(item.name, verify=True) as segment:
                        blobs, key = segment.holds_blobs, segment.header.key
                        source = segment.header.source
                except errors.SegmentError as exc:
                    log.warning("not re-attaching %s: %s", item.name, exc)
                    continue
                # Hashed only for a segment worth adopting, and only without a record.
                expected = self.manifest.digest(state.name, version) \
                    or bytes.fromhex(model_digest(file))
                if source != expected:
                    # Same model and version, other weights: the configured file changed
                    # since the crash (or the segment predates the record).
                    log.info("not re-attaching %s: built from another file than %s",
                             item.name, file)
                    continue
                try:
                    owned = registry.adopt(item.name)
                except errors.SegmentError as exc:  # swept meanwhile: built again instead
                    log.warning("not re-attaching %s: %s", item.name, exc)
                    continue
                state.versions[version] = Version(version, owned, file, blobs, key, source)
                if version == current[0]:
                    state.make_current(version)
                log.info("re-attached intact segment %s for %s v%d%s (digest verified)",
                         item.name, state.name, version,
                         "" if version == current[0] else " (kept)")

    def kept_to_restore(self, state: ModelState) -> list[tuple[int, Path]]:
        """The kept versions the manifest records for ``state`` that a restart loads again,
        as many as ``--keep`` allows, in rollback order (what a commit would keep)."""
        committed = self.manifest.committed(state.name)
        if committed is None:
            return []
        # A configured file kept with no digest to check it by may hold anything by now.
        kept = {v: f for v, f in self.manifest.kept(state.name)
                if self.manifest.is_own_copy(f) or self.manifest.digest(state.name, v)}
        ranked = state.rollback_order(kept, state.current or self.initial_version(state)[0])
        return [(v, kept[v]) for v in ranked[: self.cfg.keep]]

    def start_metrics(self) -> None:
        if not self.cfg.metrics_address:
            return
        try:
            self.http = HttpEndpoint(self.cfg.metrics_address, standard_routes(
                self.metrics, lambda: self.phase in ("building", "running"), lambda: self.ready))
        except OSError as exc:
            raise StartupError(f"metrics address {self.cfg.metrics_address}: {exc}") from exc
        self.http.register(self.sel)
        log.info("metrics on http://%s:%d/metrics", *self.http.address)

    def sweep_orphans(self) -> None:
        for item in registry.sweep_orphans(self.instance):
            log.info("swept orphaned segment %s (%d bytes, creator pid %s dead)",
                     item.name, item.size, item.pid)
        for file in self.manifest.sweep_partial_copies():
            log.info("swept %s, a weight copy a killed publish left half-written", file)

    def bind(self, path: Path, mode: int, backlog: int) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o777 & ~mode)  # no window in which the socket is more open
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        gid = self.cfg.group_id()
        if gid is not None and mode & 0o070:
            try:
                os.chown(path, -1, gid)
            except OSError as exc:  # a group this user is not in
                sock.close()
                path.unlink(missing_ok=True)
                raise StartupError(f"cannot give {path} to group {self.cfg.group!r}: "
                                   f"{exc.strerror}") from exc
        sock.listen(backlog)
        sock.setblocking(False)
        return sock

    # --- the loop ---------------------------------------------------------------------------

    def wait_and_dispatch(self) -> None:
        self.update_write_interest()
        events = self.sel.select(TICK)
        self.polled_at = time.monotonic()
        for key, _ in events:
            key.data(key.fileobj)

    def update_write_interest(self) -> None:
        for peer in [w.peer for w in self.workers.values()] + list(self.ctl_peers) + list(self.early_peers):
            if peer.closed:
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.wants_write else 0)
            try:
                key = self.sel.get_key(peer)
                if key.events != events:
                    self.sel.modify(peer, events, key.data)
            except KeyError:
                pass

    def tick(self) -> None:
        self.excuse_workers_for_our_absence()
        self.resume_accepting()
        self.reap_workers()
        self.reap_builds()
        if self.phase == "running":
            self.murder_stale_workers()
            self.manage_workers()
        if self.phase == "stopping":
            self.advance_stop()
        self.update_early_door()
        self.answer_status()
        self.expire_publishes()
        self.update_metrics()
        self.feed_watchdog()

    def drain_signals(self, _: object) -> None:
        try:
            data = os.read(self.sig_r, 256)
        except BlockingIOError:
            return
        for signum in data:
            name = SIGNALS.get(signal.Signals(signum))
            if name:
                getattr(self, f"handle_{name}")()

    # --- signal handlers: change desired state only -------------------------------------------

    def handle_term(self) -> None:
        self.begin_stop(graceful=True, why="SIGTERM")

    def handle_int(self) -> None:
        self.begin_stop(graceful=True, why="SIGINT")

    def handle_quit(self) -> None:
        self.begin_stop(graceful=False, why="SIGQUIT")

    def handle_hup(self) -> None:
        if self.phase != "running":
            return
        log.info("SIGHUP: reloading, replacing %d worker(s) one at a time", len(self.workers))
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                             "STATUS=reloading workers")
        self.reloading = True
        for w in list(self.workers.values()):
            if w.standby:
                self.stop_worker(w)  # not serving: replaced once the reload is done
            elif w.state != "stopping":
                w.retiring = True

    def handle_ttin(self) -> None:
        self.target += 1
        log.info("SIGTTIN: workers %d -> %d", self.target - 1, self.target)

    def handle_ttou(self) -> None:
        if self.target > 1:
            self.target -= 1
            log.info("SIGTTOU: workers %d -> %d", self.target + 1, self.target)

    def handle_chld(self) -> None:
        pass  # reaping happens in tick()

    # --- building segments ------------------------------------------------------------------

    def start_builds(self) -> None:
        pending = [m for m in self.models.values() if not m.current and m.name not in self.builds]
        for state in pending[: max(0, self.cfg.build_parallel - len(self.builds))]:
            version, path = self.initial_version(state)
            if path != state.path:
                log.info("model %r: serving committed version %d from %s", state.name, version, path)
            self.start_build(state.name, path, version, self.expect_digest(state.name, version))

    def expect_digest(self, model: str, version: int) -> list[str]:
        """Builder flags for a restart's build of a recorded version: the file must still be
        what it was when that version was loaded (a kept or committed copy bit-flipped, or the
        configured file replaced, must not serve under the old number)."""
        recorded = self.manifest.digest(model, version)
        return [] if recorded is None else ["--expect-digest", recorded.hex()]

    def start_build(self, model: str, path: Path, version: int, extra: list[str] | None = None,
                    job: PublishJob | None = None) -> Build:
        name = job.segment if job else registry.segment_name(self.instance, model, version)
        gid = self.cfg.group_id()
        cmd = [sys.executable, "-m", "supervisor.build", "--model-path", str(path),
               "--model-name", model, "--segment", name, "--version", str(version),
               "--owner-pid", str(os.getpid()), "--mode", "640" if gid is not None else "600"]
        if gid is not None:
            cmd += ["--gid", str(gid)]
        if self.cfg.optimization != "disabled":
            # ORT optimizes (and pre-packs) once, here; --no-prepack keeps the optimized graph,
            # so level "all"'s reordered Conv weights are shared, not rebuilt in every worker.
            cmd += ["--prepack-cache", str(self.cfg.state_dir / "cache"),
                    "--opt-level", self.cfg.optimization]
            if not self.cfg.prepack:
                cmd.append("--no-save-prepacked")
        if self.cfg.huge_pages:
            cmd.append("--huge-pages")
        proc = subprocess.Popen(cmd + (extra or []), stdout=subprocess.PIPE, env=child_env())
        build = Build(model, path, name, version, proc, job=job)
        assert proc.stdout is not None
        # Drained as it comes: a builder blocked on a full pipe would never finish.
        os.set_blocking(proc.stdout.fileno(), False)
        self.sel.register(proc.stdout, selectors.EVENT_READ, lambda _, b=build: self.read_build(b))
        self.builds[f"publish:{model}" if job else model] = build
        log.info("building segment for model %r v%d from %s", model, version, path)
        return build

    def reap_builds(self) -> None:
        for model, build in list(self.builds.items()):
            if build.proc.poll() is None:
                continue
            del self.builds[model]
            self.finish_build(build)
        if self.phase == "building":
            self.start_builds()
            if not self.builds and all(m.current for m in self.models.values()):
                self.phase = "running"
                log.info("all %d model(s) in shared memory; starting %d worker(s)",
                         len(self.models), self.target)
                for state in self.models.values():
                    self.manifest.record_serving(state)
                    self.start_restore(state)

    def read_build(self, build: Build) -> None:
        assert build.proc.stdout is not None
        try:
            data = os.read(build.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        for msg in build.take_lines(data + (b"\n" if not data else b"")):
            if "progress" in msg and build.job is not None:
                build.job.written, build.job.size = int(msg["progress"]), int(msg["total"])
            elif "ok" in msg:
                build.result = msg
        if not data:
            self.close_build_output(build)

    def close_build_output(self, build: Build) -> None:
        if build.proc.stdout is not None and not build.proc.stdout.closed:
            try:
                self.sel.unregister(build.proc.stdout)
            except (KeyError, ValueError):
                pass
            build.proc.stdout.close()

    def finish_build(self, build: Build) -> None:
        while build.proc.stdout is not None and not build.proc.stdout.closed:
            self.read_build(build)  # the rest of what it printed before exiting
        result = build.result
        if not result.get("ok"):
            registry.remove(build.segment)  # whatever the helper left under our name
            why = result.get("message") or f"builder exited with status {build.proc.returncode}"
            if build.job is not None:
                self.fail_publish(build.job, f"{result.get('error', 'error')}: {why}")
            elif result.get("error") == "FileChanged" and self.manifest.is_own_copy(build.path):
                self.fail_startup(f"model {build.model!r}: the committed copy {build.path} is "
                                  f"damaged: {why}. "
                                  f"{self.reset_advice(self.models[build.model])}")
            else:
                self.fail_startup(f"model {build.model!r} ({build.path}): {why}")
            return
        owned = OwnedSegment(build.segment, int(result["size"]))
        log.info("model %r v%d in segment %s (%.1f MiB, %s) after %.2fs", build.model,
                 build.version, build.segment, owned.size / 2**20,
                 "pre-packed" if result.get("prepacked") else
                 "optimized graph" if result.get("optimized") else "plain",
                 time.monotonic() - build.started)
        if result.get("fallback") and self.cfg.prepack:
            log.warning("model %r v%d: pre-packing impossible, serving plain shared weights with "
                        "pre-packing off (slower MatMul/Gemm): %s", build.model, build.version,
                        result["fallback"])
        elif result.get("fallback"):
            log.warning("model %r v%d: ORT could not save its optimized graph; serving the "
                        "original graph (level %s may build private copies of reordered "
                        "weights in each worker): %s", build.model, build.version,
                        self.cfg.optimization, result["fallback"])
        if not self.lock(owned, build.job):
            owned.unlink()
            return
        state = self.models[build.model]
        blobs, key, digest = read_back(owned)
        if build.job is not None:
            state.versions[build.version] = Version(build.version, owned, build.job.file, blobs,
                                                    key, digest)
            self.start_prepare(build.job, owned.size)
            return
        state.versions[build.version] = Version(build.version, owned, build.path, blobs, key,
                                                digest)
        state.make_current(build.version)
        assert self.table is not None
        self.table.flip(state.slot, build.version)

    def lock(self, owned: OwnedSegment, job: PublishJob | None) -> bool:
        """--lock-memory: keep the segment resident. A failure at start stops the daemon with
        the fix; during a publish it fails that publish and the served version stays."""
        if not self.cfg.lock_memory:
            return True
        try:
            self.locks[owned.name] = lock_segment(owned.name, owned.size)
        except MemoryLockError as exc:
            if job is not None:
                self.fail_publish(job, str(exc))
            else:
                self.fail_startup(str(exc))
            return False
        return True

    def release(self, segment: OwnedSegment) -> None:
        """Unlock (if locked) and unlink a segment; its pages return once workers unmap it."""
        lock = self.locks.pop(segment.name, None)
        if lock is not None:
            lock.unlock()
        segment.unlink()

    def fail_startup(self, why: str) -> None:
        log.error("cannot start: %s", why)
        self.exit_code = EXIT_STARTUP
        self.begin_stop(graceful=False, why="startup failure")

    # --- workers ------------------------------------------------------------------------------

    def manage_workers(self) -> None:
        """Reconcile the workers with the target count and any reload in progress, then keep
        the configured number of warm standbys. A standby boots only when no active worker
        does: a spare must never slow the workers that serve."""
        self.manage_active_workers()
        standbys = [w for w in self.workers.values() if w.standby and w.state != "stopping"]
        booting = any(w.state == "booting" and not w.standby for w in self.workers.values())
        wanted = self.cfg.spares(self.loads_blobs())
        if wanted != self.spares_wanted and any(s.versions for s in self.models.values()):
            log.info("keeping %d standby worker(s): %s", wanted,
                     "configured" if self.cfg.standby is not None else
                     "a served segment holds pre-packed blobs (a cold worker re-packs them)"
                     if wanted else "no served segment holds pre-packed blobs")
            self.spares_wanted = wanted
        if not self.reloading and not booting:
            for _ in range(wanted - len(standbys)):
                self.spawn_worker(standby=True)
        for w in standbys[wanted:]:  # the last version with blobs was dropped
            self.stop_worker(w)

    def loads_blobs(self) -> bool:
        """Whether a cold worker would re-pack weights: some loaded version holds blobs."""
        return any(v.blobs for state in self.models.values() for v in state.versions.values())

    def activate_standby(self) -> bool:
        """Promote a ready standby to active: a replacement ready as fast as a message goes.
        A standby still preparing the version just flipped to is passed over."""
        for w in self.workers.values():
            if w.standby and w.state == "ready" and not w.retiring and not w.catching_up:
                w.standby = False
                w.peer.send({"op": "activate"})
                log.info("activated standby worker %d", w.pid)
                self.close_early_door()
                self.ask_pending_prepares(w)
                return True
        return False

    def manage_active_workers(self) -> None:
        live = [w for w in self.workers.values() if w.state != "stopping" and not w.standby]
        fresh = [w for w in live if not w.retiring]
        retiring = [w for w in live if w.retiring]
        booting = [w for w in fresh if w.state == "booting"]
        if retiring:
            # A reload: each new worker ready before an old one stops, so capacity never dips
            # below the target. (Counting new workers still booting stopped the second old one
            # as soon as its replacement was forked: 1 of 2 ready for the length of a boot.)
            ready_fresh = [w for w in fresh if w.state == "ready"]
            never_ready = [w for w in retiring if w.state != "ready"]
            if never_ready:  # serves no one: nothing to wait for
                self.stop_worker(never_ready[0])
            elif len(ready_fresh) + len(retiring) > self.target:
                self.stop_worker(retiring[0])
            elif not booting and len(fresh) < self.target:
                self.spawn_worker()
            return
        if self.reloading and not booting:
            self.reloading = False
            log.info("reload complete")
            self.notify_ready()
        for _ in range(self.target - len(fresh)):
            if not self.activate_standby():
                self.spawn_worker()
        if len(fresh) > self.target:
            newest = sorted(fresh, key=lambda w: w.started)[self.target :]
            for w in newest:
                self.stop_worker(w)

    def spawn_worker(self, standby: bool = False) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Our signals stay blocked across fork: a TERM that reached the child before it reset
        # its handlers would run ours there, be "queued" into nothing, and the child would
        # boot and wait for a stop that already came. Blocked, it stays pending in the child
        # until run_worker restores the default action and unblocks it.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        slot = self.free_board_slot()
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:  # child: never returns
                ours.close()
                self.become_worker(theirs, serving=not standby, board_slot=slot)
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        theirs.close()
        handle = WorkerHandle(pid, Peer(ours), standby=standby, board_slot=slot)
        self.workers[pid] = handle
        self.sel.register(handle.peer, selectors.EVENT_READ, lambda p, h=handle: self.on_worker_readable(h))
        log.info("spawned %s worker %d", handle.role, pid)

    def free_board_slot(self) -> int | None:
        """The lowest slot no live worker has (a dead one's was cleared when reaped)."""
        if self.board is None:
            return None
        taken = {w.board_slot for w in self.workers.values()}
        return next((i for i in range(self.board.count) if i not in taken), None)

    def become_worker(self, control: socket.socket, serving: bool,
                      board_slot: int | None) -> None:
        code = WORKER_BOOT_ERROR
        try:
            signal.set_wakeup_fd(-1)
            self.close_inherited()
            from worker.runtime import SessionSettings, spinning_pays
            from worker.server import WorkerConfig, run_worker

            config = WorkerConfig(
                # Not a version still loading: its publish or restore may yet drop it, and
                # asks this worker to prepare it once it is ready.
                models={m.name: m.segments(but=self.job_version(m.name))
                        for m in self.models.values()},
                version_table=self.table.name if self.table else None,
                slots={m.name: m.slot for m in self.models.values()},
                board=self.board.name if self.board else None, board_slot=board_slot,
                settings=SessionSettings(
                    intra_op_threads=self.cfg.intra_threads(), optimization=self.cfg.optimization,
                    memory_arena=not self.cfg.release_memory,
                    allow_spinning=spinning_pays(self.target, self.cfg.intra_threads())),
                max_inflight=self.cfg.max_inflight, max_frame=self.cfg.max_frame,
                graceful_timeout=self.cfg.graceful_timeout, stall_timeout=self.cfg.stall_timeout,
                warmup_parallel=self.cfg.warmup_parallel, supervisor_pid=os.getppid(),
                spin=self.cfg.spin, serving=serving, huge_weights=self.cfg.huge_pages)
            assert self.listener is not None
            code = run_worker(config, self.listener, control)
        except BaseException:  # noqa: BLE001 - a worker must never return into the arbiter
            logging.getLogger("shmcache.worker").exception("worker %d crashed", os.getpid())
        finally:
            os._exit(code)

    def close_inherited(self) -> None:
        """In a new worker: drop every descriptor that belongs to the supervisor's job."""
        for w in self.workers.values():
            w.peer.close()
        for peer in self.ctl_peers | self.early_peers:
            peer.close()
        if self.ctl_listener is not None:
            self.ctl_listener.close()
        if self.http is not None:
            self.http.close_after_fork()  # before sel.close: the epoll set is shared
        self.locks = {}  # the child's copies of the locked mappings go with it
        self.sel.close()
        os.close(self.sig_r)
        os.close(self.sig_w)
        self.notifier.close()

    def stop_worker(self, w: WorkerHandle, sig: int = signal.SIGTERM) -> None:
        if w.state != "stopping":
            log.info("stopping worker %d (%s)", w.pid, signal.Signals(sig).name)
        w.state = "stopping"
        signal_worker(w, sig)

    def on_worker_readable(self, w: WorkerHandle) -> None:
        peer = w.peer
        messages = peer.read()
        if messages is None:
            self.drop_peer(peer)
            return
        for msg in messages:
            self.on_worker_message(w, msg)

    def on_worker_message(self, w: WorkerHandle, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        w.last_beat = time.monotonic()
        if op == "ready":
            w.state = "ready" if w.state == "booting" else w.state
            w.versions = dict(msg.get("models") or {})
            self.boot_failures = 0
            log.info("%s worker %d ready in %.2fs", w.role, w.pid, time.monotonic() - w.started)
            if not w.standby:
                self.close_early_door()
                self.ask_pending_prepares(w)
        elif op == "beat":
            w.served = int(msg.get("served", 0))
            w.inflight = int(msg.get("inflight", 0))
            w.connections = int(msg.get("connections", 0))
            self.metrics.update_worker(w.pid, msg.get("requests"), inflight=w.inflight,
                                       connections=w.connections)
        elif op == "reply" and msg.get("id") in self.prepare_ids:
            self.on_prepared(w, msg)
        elif op == "reply" and msg.get("id") in w.catching_up:
            self.on_caught_up(w, msg)
        elif op == "boot_failed":
            log.error("worker %d failed to boot: %s", w.pid, msg.get("reason"))
        elif op == "reply" and msg.get("ok"):
            w.served = int(msg.get("served", w.served))
            w.inflight = int(msg.get("inflight", w.inflight))
            w.connections = int(msg.get("connections", w.connections))
            for pending in self.pending_status:
                pending.waiting.discard(w.pid)
            self.answer_status()

    def reap_workers(self) -> None:
        for pid, w in list(self.workers.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            del self.workers[pid]
            if self.board is not None and w.board_slot is not None:
                self.board.post(w.board_slot, None)  # it cannot say so itself any more
            self.drop_peer(w.peer)
            self.metrics.worker_gone(pid)
            for job in list(self.publishes.values()):
                if pid not in job.waiting:
                    continue
                if job.restore or w.state == "stopping":
                    # Not a veto: we stopped it (SIGTTOU, a reload, a stale worker), or a
                    # restore, which asks the replacement once it is ready. One fewer to wait for.
                    del job.waiting[pid]
                    self.maybe_commit(job)
                else:
                    self.fail_publish(job, f"worker {pid} died while preparing "
                                           f"({describe_status(status)})")
            self.on_worker_exit(w, status)

    def on_worker_exit(self, w: WorkerHandle, status: int) -> None:
        how = describe_status(status)
        if w.state == "stopping":
            log.info("worker %d stopped (%s)", w.pid, how)
            return
        if w.state == "booting":
            self.boot_failures += 1
            why = "killed after boot_timeout" if w.boot_timed_out else f"died while booting ({how})"
            log.error("worker %d %s; %d boot failure(s) in a row", w.pid, why,
                      self.boot_failures)
            if self.boot_failures >= self.cfg.max_boot_failures:
                log.error("workers failed to boot %d times in a row; giving up",
                          self.boot_failures)
                self.exit_code = EXIT_BOOT_LOOP
                self.begin_stop(graceful=False, why="worker boot loop")
            return
        self.restarts += 1
        log.warning("worker %d died (%s); replacing it", w.pid, how)

    def excuse_workers_for_our_absence(self) -> None:
        """After the supervisor itself was stopped (SIGSTOP, a frozen cgroup, a paused VM) or
        starved, every heartbeat it has not read yet looks late: restart the clocks instead
        of killing workers that served all along (they did: 16,912 calls during an 8 s stop,
        and were then all killed as silent)."""
        now = time.monotonic()
        away = now - self.last_tick
        self.last_tick = now
        if away < AWAY_AFTER:
            return
        log.warning("the supervisor did not run for %.1fs; not holding it against the workers",
                    away)
        for w in self.workers.values():
            w.last_beat = max(w.last_beat, now)
            if w.state == "booting":  # boot_timeout counts time we were there to see
                w.started += away

    def murder_stale_workers(self) -> None:
        now = time.monotonic()
        if now - self.polled_at > AWAY_AFTER:  # stopped mid-tick: beats may wait unread
            return
        for w in list(self.workers.values()):
            if w.state == "ready" and now - w.last_beat > self.cfg.heartbeat_timeout:
                log.error("worker %d silent for %.0fs; killing it", w.pid, now - w.last_beat)
                self.restarts += 1  # hung is as unexpected as dead; its exit reads as a stop
                self.stop_worker(w, signal.SIGKILL)
            elif (w.state == "booting" and not w.boot_timed_out
                  and now - w.started > self.cfg.boot_timeout):
                self.kill_slow_booter(w, now)

    def kill_slow_booter(self, w: WorkerHandle, now: float) -> None:
        """A worker that never got ready is killed but stays "booting", so its exit counts
        towards max_boot_failures: a model that always takes longer than boot_timeout to
        load would otherwise be retried for ever, each try logged as a plain stop."""
        log.error("worker %d not ready after %.0fs (boot_timeout); killing it",
                  w.pid, now - w.started)
        w.boot_timed_out = True
        signal_worker(w, signal.SIGKILL)

    def ready_workers(self) -> list[WorkerHandle]:
        """Ready workers that accept requests (a standby is ready but not accepting)."""
        return [w for w in self.workers.values() if w.state == "ready" and not w.standby]

    @property
    def ready(self) -> bool:
        """Every model warm on the target number of workers (what READY=1 promises)."""
        return self.phase == "running" and len(self.ready_workers()) >= self.target

    # --- readiness, early clients, watchdog --------------------------------------------------

    def feed_watchdog(self) -> None:
        if not self.ready_announced and self.ready and not self.reloading:
            self.ready_announced = True
            log.info("ready: %d worker(s), models %s", len(self.ready_workers()),
                     ", ".join(f"{m.name} v{m.version}" for m in self.models.values()))
            self.notify_ready()
            release_startup_heap()
        interval = self.notifier.watchdog_interval()
        if interval is None or self.phase not in ("building", "running"):
            return
        now = time.monotonic()
        healthy = self.phase == "building" or self.workers_answering(now)
        if healthy and now - self.last_watchdog >= interval:
            self.last_watchdog = now
            self.notifier.notify("WATCHDOG=1")

    def workers_answering(self, now: float) -> bool:
        """Some ready worker heard from within ANSWERING_WITHIN: the watchdog must not vouch
        for a daemon whose workers are all gone or hung (the MLServer "healthy with all workers
        down" complaint in RESEARCH.md). One hung worker among healthy ones is ours to replace
        (heartbeat_timeout); requiring every worker to answer made systemd restart the whole
        service for it, with the healthy workers and their clients."""
        return any(now - w.last_beat < ANSWERING_WITHIN for w in self.ready_workers())

    def notify_ready(self) -> None:
        self.notifier.notify("READY=1", "STATUS=" + self.status_line())

    def status_line(self) -> str:
        models = ", ".join(f"{m.name} v{m.version}" for m in self.models.values())
        return f"{len(self.ready_workers())}/{self.target} workers ready; {models}"

    def open_early_door(self) -> None:
        """Until a worker is ready, the supervisor itself answers ping (not ready) and infer
        (``not_ready``), so a client learns the daemon is up at once (issue: up first, ready
        later) instead of hanging in the listen backlog."""
        assert self.listener is not None
        try:
            self.sel.register(self.listener, selectors.EVENT_READ, self.accept_early)
        except KeyError:
            pass

    def close_early_door(self) -> None:
        if self.listener is None:
            return
        try:
            self.sel.unregister(self.listener)
        except (KeyError, ValueError):
            pass
        for peer in list(self.early_peers):
            self.drop_peer(peer)  # their next call reconnects and reaches a worker

    def update_early_door(self) -> None:
        if self.phase in ("building", "running") and not self.ready_workers():
            if self.listener is not None and self.listener not in self.accept_paused:
                self.open_early_door()

    def accept_early(self, listener: socket.socket) -> None:
        peer = self.accept(listener, self.early_peers, EARLY_MAX_FRAME, MAX_EARLY_PEERS,
                           too_large=errors.NotReady(
                               "shmcache is starting; no worker is ready yet"))
        if peer is not None:
            self.sel.register(peer, selectors.EVENT_READ, self.on_early_readable)

    def on_early_readable(self, peer: Peer) -> None:
        for request in self.read_requests(peer, protocol.DEFAULT_OPS):
            if request.op == "ping":
                peer.send(protocol.ok_ping(request.id, False, pid=os.getpid(), phase=self.phase))
            else:
                peer.send(protocol.error_reply(request.id, errors.NotReady(
                    f"shmcache is starting ({self.phase}); no worker is ready yet")))

    def read_requests(self, peer: Peer, ops: frozenset[str]) -> Iterator[protocol.Request]:
        """The well-formed requests now readable from ``peer``; bad ones are answered here and
        a malformed frame (or a closed peer) drops the connection (STYLE.md: msgpack rule)."""
        messages = peer.read()
        if messages is None:
            self.drop_peer(peer)
            return
        for msg in messages:
            try:
                yield protocol.parse_request(msg, ops=ops)
            except errors.RemoteError as exc:
                peer.send(protocol.error_reply(exc.request_id, exc))
                if exc.request_id is None:
                    self.drop_peer(peer)
                    return

    # --- control socket -------------------------------------------------------------------------

    def accept_control(self, listener: socket.socket) -> None:
        peer = self.accept(listener, self.ctl_peers, 64 * 2**20, MAX_CONTROL_PEERS)
        if peer is not None:
            self.sel.register(peer, selectors.EVENT_READ, self.on_control_readable)

    def accept(self, listener: socket.socket, into: set[Peer], max_frame: int, limit: int,
               too_large: errors.RemoteError | None = None) -> Peer | None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return None
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: it crashed the supervisor once
            self.pause_accepting(listener, exc)
            return None
        if len(into) >= limit:
            sock.close()  # the client sees its connection closed: a retryable error
            return None
        peer = Peer(sock, max_frame, requests=True, too_large=too_large)
        into.add(peer)
        return peer

    def pause_accepting(self, listener: socket.socket, exc: OSError) -> None:
        """Rest a listener that cannot accept: it stays readable, so the loop would spin."""
        log.warning("cannot accept on %s: %s; retrying in %.1fs", listener.getsockname(), exc,
                    ACCEPT_PAUSE)
        try:
            self.sel.unregister(listener)
        except (KeyError, ValueError):
            pass
        self.accept_paused[listener] = time.monotonic() + ACCEPT_PAUSE

    def resume_accepting(self) -> None:
        now = time.monotonic()
        for listener, until in list(self.accept_paused.items()):
            if now < until or self.phase in ("stopping", "done"):
                continue
            del self.accept_paused[listener]
            if listener is self.ctl_listener:
                self.sel.register(listener, selectors.EVENT_READ, self.accept_control)
            # the client socket: update_early_door() opens it again while no worker is ready

    def on_control_readable(self, peer: Peer) -> None:
        for request in self.read_requests(peer, CONTROL_OPS):
            try:
                if request.op == "status":
                    self.ask_status(peer, request.id)
                elif request.op == "publish":
                    self.start_publish(peer, request)
                else:
                    peer.send(self.on_control_request(request))
            except errors.RemoteError as exc:
                peer.send(protocol.error_reply(request.id, exc))

    def on_control_request(self, request: protocol.Request) -> dict[str, Any]:
        if request.op == "ping":
            return protocol.ok_ping(request.id, self.ready, phase=self.phase)
        if request.op == "health":
            return protocol.ok_result(request.id, live=self.phase in ("building", "running"),
                                      ready=self.ready, phase=self.phase)
        if request.op == "publish_status":
            job = self.publishes.get(str(request.raw.get("model")))
            return protocol.ok_result(request.id, **(job.progress() if job else {"phase": "idle"}))
        if request.op == "rollback":
            return self.rollback(request)
        raise errors.UnsupportedOp(f"{request.op!r} is not available")

    def ask_status(self, peer: Peer, request_id: int) -> None:
        """Ask every worker for fresh counters; answer when all replied or after a second."""
        waiting = set()
        for w in self.workers.values():
            if w.state == "ready":
                w.peer.send({"op": "stats", "id": self.next_control_id})
                self.next_control_id += 1
                waiting.add(w.pid)
        self.pending_status.append(PendingStatus(peer, request_id, waiting, time.monotonic() + 1.0))
        self.answer_status()

    def answer_status(self) -> None:
        now = time.monotonic()
        for pending in list(self.pending_status):
            pending.waiting &= set(self.workers)
            if not pending.waiting or now > pending.deadline:
                self.pending_status.remove(pending)
                pending.peer.send(protocol.ok_result(pending.request_id, **self.status()))

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "pid": os.getpid(),
            "phase": self.phase,
            "ready": self.ready,
            "socket": str(self.cfg.socket),
            "uptime": time.time() - self.started,
            "target_workers": self.target,
            "restarts": self.restarts,
            "workers": [dict(pid=w.pid, state=w.state, role=w.role, uptime=now - w.started,
                             served=w.served,
                             inflight=w.inflight, connections=w.connections, versions=w.versions, **memory_of(w.pid))
                        for w in sorted(self.workers.values(), key=lambda w: w.started)],
            "models": [dict(name=m.name, version=m.current, segment=m.segment.name,
                            size=m.segment.size, path=str(m.versions[m.current].file),
                            kept=sorted(v for v in m.versions
                                        if v != m.current and v != self.job_version(m.name)),
                            publishing=self.job_version(m.name, "publish"),
                            restoring=self.job_version(m.name, "restore"))
                       for m in self.models.values() if m.current],
        }

    def job_version(self, model: str, kind: str | None = None) -> int | None:
        """The version a publish or restore of ``model`` (of ``kind``, if given) is loading."""
        job = self.publishes.get(model)
        return job.version if job is not None and kind in (None, job.kind) else None

    def drop_peer(self, peer: Peer) -> None:
        try:
            self.sel.unregister(peer)
        except (KeyError, ValueError):
            pass
        peer.close()
        self.ctl_peers.discard(peer)
        self.early_peers.discard(peer)
        for job in list(self.publishes.values()):
            if job.peer is peer:
                self.fail_publish(job, "the publisher disconnected before the flip")

    # --- publishing ---------------------------------------------------------------------------

    def start_publish(self, peer: Peer, request: protocol.Request) -> None:
        """Control op ``publish``: build, prepare everywhere, flip; the reply comes at the end."""
        raw = request.raw
        model, path = str(raw.get("model") or ""), Path(str(raw.get("path") or ""))
        state = self.models.get(model)
        if self.phase != "running":
            raise errors.NotReady(f"cannot publish while {self.phase}")
        if state is None or not state.current:
            raise errors.UnknownModel(f"no model {model!r}; serving: {', '.join(self.models)}")
        running = self.publishes.get(model)
        if running is not None and not running.restore:
            raise errors.Busy(f"a publish of {model!r} (v{running.version}) is already "
                              f"{running.phase}; wait for it to finish")
        if not path.is_file():
            raise errors.PublishFailed(f"{path}: no such file (the path is read by the daemon)")
        if running is not None:
            self.pause_restores(state)
        version = state.attempted = state.next_version(self.manifest.highest(model))
        job = PublishJob(model, version, path, registry.segment_name(self.instance, model, version),
                         self.manifest.version_file(model, version), peer, request.id,
                         deadline=time.monotonic() + self.cfg.boot_timeout)
        self.publishes[model] = job
        served = state.versions[state.current]
        extra = ["--served-segment", state.segment.name, "--persist-to", str(job.file),
                 "--served-file", str(served.file)]
        if served.digest is not None and not served.file.is_relative_to(self.manifest.dir):
            # a configured file, which may be replaced on disk; our own copies are not
            extra += ["--served-digest", served.digest.hex()]
        if raw.get("allow_signature_change"):
            extra.append("--allow-signature-change")
        self.start_build(model, path, version, extra, job)

    def start_restore(self, state: ModelState) -> None:
        """After a restart, load the next kept version the manifest records again, as a
        restore (supervisor.publish): one at a time per model, each tried once. The workers
        learn which versions are still coming back, to tell a pinned request to retry."""
        self.start_next_restore(state)
        if self.table is not None:
            self.table.set_coming_back(state.slot, self.versions_coming_back(state))

    def versions_coming_back(self, state: ModelState) -> list[int]:
        """Kept versions not loaded yet whose restore is running, paused or still to try."""
        job = self.publishes.get(state.name)
        loading = job.version if job is not None and job.restore else None
        return [v for v, _ in self.kept_to_restore(state)
                if v == loading or (v not in state.versions
                                    and (state.name, v) not in self.restores_tried)]

    def start_next_restore(self, state: ModelState) -> None:
        if self.phase != "running" or state.name in self.publishes \
                or state.name in self.restores_paused:
            return
        for version, file in self.kept_to_restore(state):
            if version in state.versions or (state.name, version) in self.restores_tried:
                continue
            self.restores_tried.add((state.name, version))
            job = PublishJob(state.name, version, file,
                             registry.segment_name(self.instance, state.name, version), file,
                             None, 0, deadline=time.monotonic() + self.cfg.boot_timeout)
            self.publishes[state.name] = job
            log.info("loading kept version %s v%d again for rollback", state.name, version)
            self.start_build(state.name, file, version, self.expect_digest(state.name, version),
                             job=job)
            return

    def pause_restores(self, state: ModelState) -> None:
        """A publish does not wait for a kept version to load again: the restore stops, and
        resumes if the publish fails. If it commits, the manifest's kept versions are counted
        from the new one, and what it no longer names is not restored."""
        job = self.publishes[state.name]
        self.restores_paused.add(state.name)
        self.restores_tried.discard((state.name, job.version))
        self.fail_publish(job, "a publish came first (resumed if it fails)")

    def resume_restores(self, state: ModelState) -> None:
        self.restores_paused.discard(state.name)
        self.start_restore(state)

    def start_prepare(self, job: PublishJob, size: int) -> None:
        """Ask every active worker to prepare. Standbys do not take part: a third session
        creation on a busy host would delay the flip; they catch up after it."""
        job.phase, job.built_at, job.size = "preparing", time.monotonic(), size
        for w in self.workers.values():
            if w.standby:
                continue
            if w.state == "ready":
                self.ask_prepare(job, w)
            elif w.state == "booting":
                job.waiting[w.pid] = 0  # asked once it reports ready
        self.maybe_commit(job)

    def ask_prepare(self, job: PublishJob, w: WorkerHandle) -> None:
        rid = self.send_prepare(job, w)
        self.prepare_ids[rid] = (job.model, w.pid)
        job.waiting[w.pid] = rid

    def ask_pending_prepares(self, w: WorkerHandle) -> None:
        """A worker that just became active (booted, or a standby activated) must prepare
        every version still preparing: the flip waits for every active worker."""
        for job in self.publishes.values():
            if job.phase == "preparing":
                self.ask_prepare(job, w)

    def send_prepare(self, job: PublishJob, w: WorkerHandle, background: bool = False) -> int:
        """Send the control op ``prepare`` for ``job``'s segment; its request id."""
        rid = self.next_control_id
        self.next_control_id += 1
        # A restore is not waited for: like a standby's catch-up, it takes only idle CPU.
        w.peer.send({"op": "prepare", "id": rid, "model": job.model, "version": job.version,
                     "segment": job.segment, "background": background or job.restore})
        return rid

    def on_prepared(self, w: WorkerHandle, msg: dict[str, Any]) -> None:
        model, pid = self.prepare_ids.pop(msg["id"])
        job = self.publishes.get(model)
        if job is None or job.waiting.get(pid) != msg["id"]:
            return  # a stale answer to an abandoned publish
        del job.waiting[pid]
        if not msg.get("ok"):
            error = msg.get("error") or {}
            self.fail_publish(job, f"worker {pid} could not prepare v{job.version}: "
                                   f"{error.get('message', 'unknown error')}")
            return
        job.prepared.add(pid)
        self.maybe_commit(job)

    def maybe_commit(self, job: PublishJob) -> None:
        """Flip once every live worker has the new version warm (none waiting, none missing)."""
        live = {w.pid for w in self.workers.values()
                if w.state in ("booting", "ready") and not w.standby}
        if job.phase != "preparing" or job.waiting or not live <= job.prepared:
            return
        state = self.models[job.model]
        if job.restore:
            self.finish_restore(job, state)
            return
        previous = state.current
        try:
            self.commit_durably(state, job.version)
        except errors.PublishFailed as exc:
            self.fail_publish(job, str(exc))
            return
        self.flip(state, job.version)
        self.announce_live(job)
        flipped = time.monotonic()
        job.phase = "committed"
        del self.publishes[job.model]
        timings = job.timings(flipped)
        log.info("published %s v%d (was v%d): write %.2fs, prepare %.2fs, total %.2fs",
                 job.model, job.version, previous, timings["write"], timings["prepare"],
                 timings["total"])
        assert job.peer is not None  # a publish's
        job.peer.send(protocol.ok_result(job.request_id, model=job.model, version=job.version,
                                         previous=previous, timings=timings))
        self.drop_surplus_versions(state)
        self.prune_cache()
        self.catch_up_standbys(job)
        self.resume_restores(state)

    def commit_durably(self, state: ModelState, version: int) -> None:
        """Record ``version`` as current in the manifest, before the flip is visible: a crash
        after the flip must not lose it. A manifest that cannot be written (a full disk)
        leaves everything as it was, the old version serving; it took the daemon down."""
        current, served = state.current, dict(state.served)
        state.make_current(version)
        try:
            self.manifest.commit(state)
        except OSError as exc:
            state.current, state.served = current, served
            raise errors.PublishFailed(
                f"cannot record {state.name} v{version} in {self.manifest.path}: {exc}; "
                f"v{current} keeps serving") from exc

    def announce_live(self, job: PublishJob) -> None:
        """Requests pinned to the version are served from now on (worker.server)."""
        for w in self.workers.values():
            w.peer.send({"op": "live", "model": job.model, "version": job.version})

    def finish_restore(self, job: PublishJob, state: ModelState) -> None:
        job.phase = "committed"
        del self.publishes[job.model]
        self.announce_live(job)
        log.info("kept version %s v%d loaded again in %.2fs; rollback can flip to it",
                 job.model, job.version, time.monotonic() - job.started)
        self.catch_up_standbys(job)
        self.start_restore(state)

    def flip(self, state: ModelState, version: int) -> None:
        """The one write that switches every active worker's next dispatch to ``version``.
        Their versions in ``status`` follow at once, not at their next heartbeat."""
        assert self.table is not None
        self.table.flip(state.slot, version)
        for w in self.ready_workers():
            w.versions[state.name] = version

    def catch_up_standbys(self, job: PublishJob) -> None:
        """After a flip, every standby prepares the new version, at low priority (nothing waits
        for it); until it has, it is not activated (a dead worker gets a cold replacement).
        A standby still booting maps the segments it was spawned with, which may lack the new
        one: replace it."""
        for w in list(self.workers.values()):
            if not w.standby or w.state == "stopping":
                continue
            if w.state == "booting":
                self.stop_worker(w)
                continue
            w.catching_up[self.send_prepare(job, w, background=True)] = (job.model, job.version)

    def on_caught_up(self, w: WorkerHandle, msg: dict[str, Any]) -> None:
        model, version = w.catching_up.pop(msg["id"])
        if msg.get("ok"):
            log.info("standby worker %d prepared %s v%d", w.pid, model, version)
            if self.models[model].current == version:
                w.versions[model] = version  # what it serves once activated
            return
        # e.g. a later publish already dropped that version's segment
        error = msg.get("error") or {}
        log.warning("standby worker %d could not prepare %s v%d (%s); replacing it", w.pid,
                    model, version, error.get("message", "unknown error"))
        self.stop_worker(w)

    def fail_publish(self, job: PublishJob, why: str) -> None:
        """Nothing flips; the new version is forgotten everywhere and its segment unlinked."""
        if self.publishes.get(job.model) is not job:
            return
        del self.publishes[job.model]
        job.phase, job.error = "failed", why
        if job.restore:
            log.warning("kept version %s v%d could not be loaded again (no rollback to it): %s",
                        job.model, job.version, why)
        else:
            log.error("publish of %s v%d failed: %s", job.model, job.version, why)
        build = self.builds.pop(f"publish:{job.model}", None)
        if build is not None:
            build.proc.kill()
            build.proc.wait()
            self.close_build_output(build)
        for w in self.workers.values():
            w.peer.send({"op": "drop", "model": job.model, "version": job.version})
        version = self.models[job.model].versions.pop(job.version, None)
        if version is not None:
            self.release(version.segment)
        registry.remove(job.segment)
        if job.file not in self.manifest.referenced_files():
            job.file.unlink(missing_ok=True)
        if job.peer is None:
            self.start_restore(self.models[job.model])  # the next kept version, if any
            return
        job.peer.send(protocol.error_reply(job.request_id, errors.PublishFailed(
            f"{job.model} v{job.version} was not published (v{self.models[job.model].current} "
            f"still serves): {why}")))
        self.resume_restores(self.models[job.model])

    def expire_publishes(self) -> None:
        now = time.monotonic()
        for job in list(self.publishes.values()):
            if now > job.deadline:
                self.fail_publish(job, f"not prepared on every worker within "
                                       f"{self.cfg.boot_timeout:.0f}s")

    def prune_cache(self) -> None:
        """Delete the pre-packs no loaded version was built from. Each publish adds one (2x
        the model for a pre-packed MLP: 817 MiB after ten publishes of a 68 MiB model), and a
        restart needs only the loaded versions'. Not while a build runs: it may be reading its
        entry; a version whose key is unknown keeps everything."""
        cache = self.cfg.state_dir / "cache"
        keys = [v.key for state in self.models.values() for v in state.versions.values()]
        if self.builds or not cache.is_dir() or None in keys:
            return
        keep = {key.hex() for key in keys if key is not None}
        for entry in cache.iterdir():
            if entry.is_dir() and not entry.name.startswith(".") and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                log.info("pruned pre-pack %s (no loaded version uses it)", entry.name[:16])

    def drop_surplus_versions(self, state: ModelState) -> None:
        """Unlink versions neither current nor kept; memory returns when workers unmap them."""
        for number in state.surplus(self.cfg.keep):
            version = state.versions.pop(number)
            for w in self.workers.values():
                w.peer.send({"op": "drop", "model": state.name, "version": number})
            self.release(version.segment)
            if version.file not in self.manifest.referenced_files() and \
                    version.file.is_relative_to(self.manifest.dir):
                version.file.unlink(missing_ok=True)
            log.info("dropped %s v%d (segment %s unlinked)", state.name, number,
                     version.segment.name)
        self.manifest.commit(state)

    def rollback(self, request: protocol.Request) -> dict[str, Any]:
        model = str(request.raw.get("model") or "")
        state = self.models.get(model)
        if state is None or not state.current:
            raise errors.UnknownModel(f"no model {model!r}")
        if model in self.publishes:
            job = self.publishes[model]
            raise errors.Busy(f"{model!r} v{job.version} is still loading after the restart; "
                              "retry in a few seconds" if job.restore else
                              f"a publish of {model!r} is in progress")
        to = request.raw.get("to")
        target = state.rollback_target(int(to) if isinstance(to, int) else None)
        if target is None:
            kept = sorted(v for v in state.versions if v != state.current)
            raise errors.NotFound(
                f"{model}: no kept version {'to roll back to' if to is None else to} "
                f"(current v{state.current}, kept: {kept or 'none'})")
        previous = state.current
        self.commit_durably(state, target)
        self.flip(state, target)
        log.info("rolled %s back from v%d to v%d", model, previous, target)
        return protocol.ok_result(request.id, model=model, version=target, previous=previous)

    def update_metrics(self) -> None:
        self.metrics.set_supervisor(
            ready=self.ready, restarts=self.restarts,
            workers=dict(Counter(w.state for w in self.workers.values())),
            segments=[(m.name, v.number, v.segment.size) for m in self.models.values()
                      for v in m.versions.values()])
        if self.http is not None:
            self.http.expire()

    # --- stopping -----------------------------------------------------------------------------

    def begin_stop(self, *, graceful: bool, why: str) -> None:
        if self.phase in ("stopping", "done"):
            if not graceful:  # a second, impatient signal
                self.stop_deadline = min(self.stop_deadline, time.monotonic())
            return
        log.info("%s: %s stop", why, "graceful" if graceful else "fast")
        self.notifier.notify("STOPPING=1", f"STATUS=stopping ({why})")
        self.phase = "stopping"
        self.close_early_door()
        if self.listener is not None:
            self.listener.close()  # workers hold their own copies until they stop accepting
            self.listener = None
        self.cfg.socket.unlink(missing_ok=True)  # new clients fail fast instead of queueing
        for job in list(self.publishes.values()):
            self.fail_publish(job, "the daemon is stopping")
        for build in self.builds.values():
            build.proc.kill()
        seconds = self.cfg.graceful_timeout if graceful else FAST_STOP_SECONDS
        self.stop_deadline = time.monotonic() + seconds + 1.0
        for w in self.workers.values():
            self.stop_worker(w, signal.SIGTERM if graceful else signal.SIGQUIT)

    def advance_stop(self) -> None:
        for model, build in list(self.builds.items()):
            if build.proc.poll() is not None:
                del self.builds[model]
                registry.remove(build.segment)
                self.close_build_output(build)
        if not self.workers and not self.builds:
            self.phase = "done"
            return
        if time.monotonic() > self.stop_deadline:
            for w in self.workers.values():
                log.warning("worker %d did not stop in time; killing it", w.pid)
                self.stop_worker(w, signal.SIGKILL)
            self.stop_deadline = time.monotonic() + 5.0

    def cleanup(self) -> None:
        """Last step of every exit path: nothing of ours stays in /dev/shm or on disk."""
        for w in list(self.workers.values()):
            try:
                os.kill(w.pid, signal.SIGKILL)
                os.waitpid(w.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for build in self.builds.values():
            build.proc.kill()
            build.proc.wait()
            registry.remove(build.segment)
        for lock in self.locks.values():
            lock.unlock()
        for m in self.models.values():
            for v in m.versions.values():
                v.segment.unlink()
        if self.table is not None:
            self.table.unlink()
        if self.board is not None:
            self.board.unlink()
        if self.http is not None:
            self.http.close()
        if self.listener is not None:
            self.listener.close()
            self.cfg.socket.unlink(missing_ok=True)
        if self.ctl_listener is not None:
            self.ctl_listener.close()
            self.cfg.control_socket.unlink(missing_ok=True)
        log.info("stopped")


def describe_status(status: int) -> str:
    """A waitpid status in words: 'exit 3' or 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        return "exit 0" if code == 0 else f"exit {code}" + (
            " (boot error)" if code == WORKER_BOOT_ERROR else "")
    return f"status {status}"


def memory_of(pid: int) -> dict[str, int]:
    """Shared versus private memory of a worker (psutil: USS private, PSS proportional)."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {"rss": 0, "uss": 0, "pss": 0, "shared": 0}
    return {"rss": info.rss, "uss": info.uss, "pss": info.pss, "shared": info.rss - info.uss}


def signal_worker(w: WorkerHandle, sig: int) -> None:
    """Signal ``w``, which may have exited already (it is reaped on the next tick)."""
    try:
        os.kill(w.pid, sig)
    except ProcessLookupError:
        pass


def child_env() -> dict[str, str]:
    """The builder must import this very checkout of shmcache, wherever it was started from."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def serve(config: ServeConfig) -> int:
    """Run a daemon in this process until it stops; the CLI's `serve`."""
    if not config.models:
        raise errors.ShmcacheError("no models to serve")
    return Arbiter(config.validate()).run()
