"""Prometheus metrics: what workers count, how the supervisor aggregates it, how it is served.

Three parts, one per process role:

* ``RequestStats`` lives in a worker and is updated once per request. It is plain dicts and
  lists (no prometheus_client objects, no locks: one thread records), and ``snapshot()`` is
  msgpack-serialisable so it rides on the worker's heartbeat to the supervisor.
* ``MetricsRegistry`` lives in the supervisor: a prometheus_client ``CollectorRegistry`` whose one
  collector renders the latest snapshot of every live worker, plus what the supervisor knows
  itself. Counters must never go backwards (Prometheus reads a drop as a counter reset and
  ``rate()`` then jumps), so a dead worker's last totals are folded into a ``retired`` sum.
* ``HttpEndpoint`` serves ``/metrics``, ``/healthz`` and ``/readyz`` from the supervisor's flat
  selector loop: non-blocking sockets, HTTP/1.0, one request per connection, no threads (the
  supervisor forks; STYLE.md principle 5).

Snapshot layout (version 1)::

    {"v": 1,
     "bounds": [5e-05, ..., 10.0],                       # upper bounds, seconds; +Inf implied
     "requests": [[model, version, outcome, count], ...],
     "latency":  [[model, version, [n_0, ..., n_inf], sum_seconds], ...]}   # per-bucket, not
                                                                            # cumulative
Staleness: a scrape shows the snapshots of the last heartbeat; requests a worker served after
its last heartbeat and before dying are not counted.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from supervisor.configfile import parse_address
from worker.stats import BUCKETS, SNAPSHOT_VERSION, RequestStats  # noqa: F401 - re-exported

WORKER_STATES = ("booting", "ready", "stopping")
MEMORY_KINDS = ("uss", "pss", "shared")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes


# --- supervisor side: aggregation ------------------------------------------------------------


@dataclass
class Totals:
    """Snapshots summed: counters by (model, version, outcome), histograms by (model, version)."""

    counts: dict[tuple[str, int, str], int] = field(default_factory=dict)
    buckets: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    sums: dict[tuple[str, int], float] = field(default_factory=dict)

    def add(self, snapshot: Mapping[str, Any]) -> None:
        for model, version, outcome, n in snapshot.get("requests", ()):
            key = (str(model), int(version), str(outcome))
            self.counts[key] = self.counts.get(key, 0) + int(n)
        for model, version, counts, total in snapshot.get("latency", ()):
            key2 = (str(model), int(version))
            have = self.buckets.setdefault(key2, [0] * len(counts))
            for i, n in enumerate(counts):
                have[i] += int(n)
            self.sums[key2] = self.sums.get(key2, 0.0) + float(total)


@dataclass
class WorkerView:
    snapshot: Mapping[str, Any] = field(default_factory=dict)
    inflight: int = 0
    connections: int = 0


@dataclass
class SupervisorView:
    ready: bool = False
    restarts: int = 0
    workers: dict[str, int] = field(default_factory=dict)  # state -> count
    segments: list[tuple[str, int, int]] = field(default_factory=list)  # model, version, bytes


class MetricsRegistry:
    """The supervisor's metrics; ``render()`` is what ``/metrics`` answers."""

    def __init__(self, memory_of: Callable[[int], Mapping[str, int]] | None = None,
                 bounds: tuple[float, ...] = BUCKETS) -> None:
        """``memory_of(pid)`` gives a worker's {"uss", "pss", "shared"} bytes at scrape time
        (the arbiter's ``memory_of``); None leaves the memory gauge out."""
        self.bounds = bounds
        self.memory_of = memory_of
        self.workers: dict[int, WorkerView] = {}
        self.retired = Totals()
        self.supervisor = SupervisorView()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def update_worker(self, pid: int, snapshot: Mapping[str, Any] | None = None, *,
                      inflight: int | None = None, connections: int | None = None) -> None:
        """Replace a live worker's totals with its latest snapshot (from a heartbeat)."""
        view = self.workers.setdefault(pid, WorkerView())
        if snapshot is not None:
            if list(snapshot.get("bounds", self.bounds)) != list(self.bounds):
                raise ValueError(f"worker {pid}: snapshot has other bucket bounds")
            view.snapshot = snapshot
        if inflight is not None:
            view.inflight = inflight
        if connections is not None:
            view.connections = connections

    def worker_gone(self, pid: int) -> None:
        """A worker exited: keep its last totals so the counters do not go backwards."""
        view = self.workers.pop(pid, None)
        if view is not None:
            self.retired.add(view.snapshot)

    def set_supervisor(self, *, ready: bool, restarts: int, workers: Mapping[str, int],
                       segments: Iterable[tuple[str, int, int]]) -> None:
        """What the supervisor knows itself: readiness, restarts, workers by state, and the
        (model, version, bytes) of every segment it owns."""
        self.supervisor = SupervisorView(ready, restarts, dict(workers), list(segments))

    def totals(self) -> Totals:
        out = Totals()
        out.add({"requests": [[m, v, o, n] for (m, v, o), n in self.retired.counts.items()],
                 "latency": [[m, v, b, self.retired.sums[(m, v)]]
                             for (m, v), b in self.retired.buckets.items()]})
        for view in self.workers.values():
            out.add(view.snapshot)
        return out

    def render(self) -> bytes:
        """The text exposition format (version 0.0.4)."""
        return generate_latest(self.registry)


class _Collector:
    """Turns a MetricsRegistry's state into metric families at each scrape."""

    def __init__(self, metrics: MetricsRegistry) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        totals = self.m.totals()
        yield from self.request_families(totals)
        sup = self.m.supervisor
        inflight = GaugeMetricFamily("shmcache_inflight_requests",
                                     "Requests a worker holds now", labels=["pid"])
        for pid, view in sorted(self.m.workers.items()):
            inflight.add_metric([str(pid)], view.inflight)
        yield inflight
        connections = GaugeMetricFamily("shmcache_client_connections",
                                        "Client connections a worker holds now", labels=["pid"])
        for pid, view in sorted(self.m.workers.items()):
            connections.add_metric([str(pid)], view.connections)
        yield connections
        yield CounterMetricFamily("shmcache_worker_restarts",
                                  "Workers replaced after dying unexpectedly", value=sup.restarts)
        segments = GaugeMetricFamily("shmcache_segment_bytes",
                                     "Size of each model segment in /dev/shm",
                                     labels=["model", "version"])
        for model, version, size in sup.segments:
            segments.add_metric([model, str(version)], size)
        yield segments
        yield self.memory_family()
        workers = GaugeMetricFamily("shmcache_workers", "Worker processes by state",
                                    labels=["state"])
        for state in sorted(set(WORKER_STATES) | set(sup.workers)):
            workers.add_metric([state], sup.workers.get(state, 0))
        yield workers
        yield GaugeMetricFamily("shmcache_ready", "1 when every model is warm on the target "
                                "number of workers", value=1 if sup.ready else 0)

    def request_families(self, totals: Totals) -> Iterator[Metric]:
        requests = CounterMetricFamily("shmcache_requests", "Requests answered",
                                       labels=["model", "version", "outcome"])
        for (model, version, outcome), n in sorted(totals.counts.items()):
            requests.add_metric([model, str(version), outcome], n)
        yield requests
        duration = HistogramMetricFamily("shmcache_request_duration_seconds",
                                         "Time from reading a request to answering it",
                                         labels=["model", "version"])
        for (model, version), counts in sorted(totals.buckets.items()):
            cumulative, running = [], 0
            for bound, n in zip([*map(float_label, self.m.bounds), "+Inf"], counts):
                running += n
                cumulative.append((bound, running))
            duration.add_metric([model, str(version)], cumulative,
                                sum_value=totals.sums[(model, version)])
        yield duration

    def memory_family(self) -> Metric:
        memory = GaugeMetricFamily("shmcache_worker_memory_bytes",
                                   "Worker memory: uss private, pss proportional, shared",
                                   labels=["pid", "kind"])
        if self.m.memory_of is not None:
            for pid in sorted(self.m.workers):
                info = self.m.memory_of(pid)
                for kind in MEMORY_KINDS:
                    if kind in info:
                        memory.add_metric([str(pid), kind], info[kind])
        return memory


def float_label(bound: float) -> str:
    return repr(float(bound))


# --- supervisor side: the HTTP endpoint ------------------------------------------------------

MAX_REQUEST = 8192  # request line + headers; a scraper sends a few hundred bytes
MAX_CONNECTIONS = 64
CONNECTION_TIMEOUT = 10.0  # a peer that neither finishes its request nor reads is dropped
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[], Response]


def standard_routes(metrics: MetricsRegistry, live: Callable[[], bool],
                    ready: Callable[[], bool]) -> dict[str, Route]:
    """/metrics, /healthz (200 while live) and /readyz (200 once ready, else 503)."""

    def probe(check: Callable[[], bool], yes: str, no: str) -> Route:
        return lambda: (200, "text/plain", yes.encode()) if check() else (
            503, "text/plain", no.encode())

    return {
        "/metrics": lambda: (200, METRICS_CONTENT_TYPE, metrics.render()),
        "/healthz": probe(live, "live\n", "not live\n"),
        "/readyz": probe(ready, "ready\n", "not ready\n"),
    }


@dataclass(eq=False)
class HttpConnection:
    sock: socket.socket
    opened: float = field(default_factory=time.monotonic)
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: memoryview | None = None  # set once the response is ready: then we only write

    def fileno(self) -> int:
        return self.sock.fileno()


class HttpEndpoint:
    """A non-blocking HTTP/1.0 server driven by someone else's selector loop.

    Wiring: ``register(sel)`` puts the listener and, later, each connection in ``sel`` with a
    callable as ``key.data`` that takes the file object, the arbiter's convention
    (``key.data(key.fileobj)``). A connection first waits to read its request, then to write
    its response, then is closed; ``expire()`` on each tick drops connections that stall.
    """

    def __init__(self, address: str, routes: Mapping[str, Route]) -> None:
        host, port = parse_address(address, "metrics_address")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((host, port))
            self.listener.listen(64)
            self.listener.setblocking(False)
        except OSError:
            self.listener.close()
            raise
        self.routes = dict(routes)
        self.sel: selectors.BaseSelector | None = None
        self.conns: set[HttpConnection] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when 0 was asked for."""
        host, port = self.listener.getsockname()[:2]
        return host, port

    def register(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        sel.register(self.listener, selectors.EVENT_READ, lambda _: self.on_accept())

    def on_accept(self) -> None:
        """Accept every pending connection; past MAX_CONNECTIONS the oldest one goes. (Closing
        the new one instead let 64 idle connections, reopened every 10 s, turn away every
        scrape and probe: a scraper sends its request at once, an idle hog never does.)"""
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return  # out of descriptors: leave it in the backlog, retry next event
                raise
            if len(self.conns) >= MAX_CONNECTIONS:
                self.close(min(self.conns, key=lambda c: c.opened))
            sock.setblocking(False)
            conn = HttpConnection(sock)
            self.conns.add(conn)
            if self.sel is not None:
                self.sel.register(conn, selectors.EVENT_READ, lambda c: self.on_event(c))

    def on_event(self, conn: HttpConnection) -> None:
        """One callback for both directions: a connection waits on only one at a time."""
        if conn.outbuf is None:
            self.on_readable(conn)
        else:
            self.on_writable(conn)

    def on_readable(self, conn: HttpConnection) -> None:
        try:
            data = conn.sock.recv(MAX_REQUEST + 1 - len(conn.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        if not data:
            self.close(conn)  # the peer gave up before finishing its request
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.inbuf.find(b"\n\n")
        if end < 0:
            if len(conn.inbuf) > MAX_REQUEST:
                self.respond(conn, (431, "text/plain", b"request too large\n"))
            return
        self.respond(conn, self.answer(bytes(conn.inbuf[:end])))

    def answer(self, head: bytes) -> Response:
        lines = head.split(b"\n", 1)[0].strip().split()
        if len(lines) != 3 or not lines[2].startswith(b"HTTP/"):
            return 400, "text/plain", b"bad request\n"
        method, target = lines[0], lines[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"only GET\n"
        route = self.routes.get(target.decode("latin-1"))
        if route is None:
            return 404, "text/plain", b"not found\n"
        status, ctype, body = route()
        return status, ctype, b"" if method == b"HEAD" else body

    def respond(self, conn: HttpConnection, response: Response) -> None:
        status, ctype, body = response
        head = (f"HTTP/1.0 {status} {REASONS.get(status, 'Unknown')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                + ("Allow: GET, HEAD\r\n" if status == 405 else "")
                + "Connection: close\r\n\r\n").encode("latin-1")
        conn.outbuf = memoryview(head + body)
        conn.inbuf.clear()
        if self.sel is not None:
            self.sel.modify(conn, selectors.EVENT_WRITE, lambda c: self.on_event(c))
        self.on_writable(conn)  # usually all fits in the socket buffer at once

    def on_writable(self, conn: HttpConnection) -> None:
        assert conn.outbuf is not None
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.close(conn)

    def expire(self, now: float | None = None) -> None:
        """Drop connections older than CONNECTION_TIMEOUT (slow or stuck peers hold fds)."""
        now = time.monotonic() if now is None else now
        for conn in [c for c in self.conns if now - c.opened > CONNECTION_TIMEOUT]:
            self.close(conn)

    def close_after_fork(self) -> None:
        """In a forked worker: close our copies of the sockets without touching the selector,
        whose epoll set is shared with the supervisor (EPOLL_CTL_DEL here would remove the
        supervisor's interest too)."""
        for c in self.conns:
            c.sock.close()
        self.conns.clear()
        self.listener.close()
        self.sel = None

    def close(self, conn: HttpConnection | None = None) -> None:
        """Close one connection, or (no argument) the listener and every connection."""
        targets = [conn] if conn is not None else list(self.conns)
        for c in targets:
            self.conns.discard(c)
            if self.sel is not None:
                try:
                    self.sel.unregister(c)
                except (KeyError, ValueError):
                    pass
            c.sock.close()
        if conn is None:
            if self.sel is not None:
                try:
                    self.sel.unregister(self.listener)
                except (KeyError, ValueError):
                    pass
            self.listener.close()
