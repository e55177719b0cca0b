"""supervisor.metrics: worker-side counting, supervisor-side aggregation, scraped over a socket.

The endpoint is driven the way the arbiter drives it: a ``selectors`` loop in the test's own
thread calling ``key.data(key.fileobj)``; the HTTP client runs in a helper thread and the loop
runs until that client is done (a condition, not a sleep).
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.metrics import (
    BUCKETS,
    CONNECTION_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_REQUEST,
    HttpEndpoint,
    MetricsRegistry,
    RequestStats,
    standard_routes,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Harness:
    def __init__(self, metrics: MetricsRegistry, state: dict[str, bool],
                 extra: dict[str, object] | None = None) -> None:
        routes = standard_routes(metrics, lambda: state["live"], lambda: state["ready"])
        routes.update(extra or {})  # type: ignore[arg-type]
        self.endpoint = HttpEndpoint("127.0.0.1:0", routes)
        self.sel = selectors.DefaultSelector()
        self.endpoint.register(self.sel)

    def pump_until(self, done: threading.Event, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done.is_set():
            assert time.monotonic() < deadline, "client did not finish"
            for key, _ in self.sel.select(0.05):
                key.data(key.fileobj)

    def exchange(self, raw: bytes, *, byte_at_a_time: bool = False) -> bytes:
        """Send ``raw``, read to EOF, while this thread runs the endpoint's loop."""
        done, out = threading.Event(), bytearray()

        def client() -> None:
            try:
                with socket.create_connection(self.endpoint.address, timeout=10) as sock:
                    try:
                        if byte_at_a_time:
                            for i in range(len(raw)):
                                sock.sendall(raw[i:i + 1])
                        else:
                            sock.sendall(raw)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the server may answer and close before reading everything
                    while chunk := sock.recv(65536):
                        out.extend(chunk)
            except ConnectionResetError:
                pass
            finally:
                done.set()

        thread = threading.Thread(target=client)
        thread.start()
        self.pump_until(done)
        thread.join()
        return bytes(out)

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return parse_response(self.exchange(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode()))

    def scrape(self) -> Samples:
        status, headers, body = self.get("/metrics")
        assert status == 200
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(body.decode())
                for s in family.samples}

    def close(self) -> None:
        self.endpoint.close()
        self.sel.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.0 "), raw[:100]
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split()[1]), headers, body


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


@pytest.fixture
def state() -> dict[str, bool]:
    return {"live": True, "ready": False}


@pytest.fixture
def metrics() -> MetricsRegistry:
    return MetricsRegistry(memory_of=lambda pid: {"uss": pid * 10, "pss": pid * 20,
                                                  "shared": pid * 30, "rss": 1})


@pytest.fixture
def harness(metrics: MetricsRegistry, state: dict[str, bool]) -> Iterator[Harness]:
    h = Harness(metrics, state)
    yield h
    h.close()


# --- RequestStats ----------------------------------------------------------------------------


def test_request_stats_counts_and_buckets() -> None:
    stats = RequestStats()
    stats.record("m", 1, "ok", 0.001)  # exactly on a bound: that bucket ("le")
    stats.record("m", 1, "ok", 0.0011)
    stats.record("m", 1, "overloaded", 0.00001)
    stats.record("m", 2, "ok", 60.0)  # beyond the last bound: +Inf
    snap = msgpack.unpackb(msgpack.packb(stats.snapshot()))  # travels on the heartbeat
    assert snap["v"] == 1 and snap["bounds"] == list(BUCKETS)
    assert sorted(map(tuple, snap["requests"])) == [("m", 1, "ok", 2), ("m", 1, "overloaded", 1),
                                                    ("m", 2, "ok", 1)]
    rows = {(m, v): (counts, total) for m, v, counts, total in snap["latency"]}
    counts, total = rows[("m", 1)]
    assert len(counts) == len(BUCKETS) + 1
    assert counts[BUCKETS.index(0.001)] == 1 and counts[BUCKETS.index(0.0025)] == 1
    assert counts[0] == 1 and sum(counts) == 3
    assert total == pytest.approx(0.00211)
    assert rows[("m", 2)][0][-1] == 1


# --- the registry over HTTP ------------------------------------------------------------------


def worker_stats(n_ok: int, n_err: int = 0, seconds: float = 0.002) -> RequestStats:
    stats = RequestStats()
    for _ in range(n_ok):
        stats.record("emb", 1, "ok", seconds)
    for _ in range(n_err):
        stats.record("emb", 1, "bad_shape", seconds)
    return stats


def test_counters_sum_workers_and_move_as_requests_are_recorded(
        harness: Harness, metrics: MetricsRegistry) -> None:
    a, b = worker_stats(3, 1), worker_stats(2)
    metrics.update_worker(101, a.snapshot(), inflight=2, connections=3)
    metrics.update_worker(102, b.snapshot(), inflight=0)
    ok = key("shmcache_requests_total", model="emb", version="1", outcome="ok")
    first = harness.scrape()
    assert first[ok] == 5
    assert first[key("shmcache_requests_total", model="emb", version="1",
                     outcome="bad_shape")] == 1
    bucket = key("shmcache_request_duration_seconds_bucket", model="emb", version="1",
                 le="0.0025")
    assert first[bucket] == 6
    assert first[key("shmcache_request_duration_seconds_bucket", model="emb", version="1",
                     le="0.001")] == 0
    assert first[key("shmcache_request_duration_seconds_count", model="emb", version="1")] == 6
    assert first[key("shmcache_request_duration_seconds_sum", model="emb",
                     version="1")] == pytest.approx(0.012)
    assert first[key("shmcache_inflight_requests", pid="101")] == 2
    assert first[key("shmcache_client_connections", pid="101")] == 3
    assert first[key("shmcache_client_connections", pid="102")] == 0

    for _ in range(4):
        a.record("emb", 1, "ok", 0.5)
    metrics.update_worker(101, a.snapshot())
    second = harness.scrape()
    assert second[ok] == 9
    assert second[key("shmcache_request_duration_seconds_bucket", model="emb", version="1",
                      le="0.5")] == 10
    assert second[key("shmcache_inflight_requests", pid="101")] == 2  # kept when not given
    assert second[key("shmcache_client_connections", pid="101")] == 3


def test_dead_worker_totals_are_kept_so_counters_never_go_backwards(
        harness: Harness, metrics: MetricsRegistry) -> None:
    ok = key("shmcache_requests_total", model="emb", version="1", outcome="ok")
    count = key("shmcache_request_duration_seconds_count", model="emb", version="1")
    metrics.update_worker(101, worker_stats(7).snapshot())
    metrics.update_worker(102, worker_stats(2).snapshot())
    assert harness.scrape()[ok] == 9
    metrics.worker_gone(101)
    metrics.worker_gone(101)  # twice: no double counting
    after = harness.scrape()
    assert after[ok] == 9 and after[count] == 9
    assert key("shmcache_inflight_requests", pid="101") not in after
    metrics.update_worker(101, worker_stats(1).snapshot())  # pid reused by a fresh worker
    assert harness.scrape()[ok] == 10


def test_supervisor_values_and_memory(harness: Harness, metrics: MetricsRegistry) -> None:
    metrics.update_worker(7)
    metrics.set_supervisor(ready=True, restarts=3, workers={"ready": 2, "booting": 1},
                           segments=[("emb", 1, 4096), ("emb", 2, 8192)])
    s = harness.scrape()
    assert s[key("shmcache_ready")] == 1
    assert s[key("shmcache_worker_restarts_total")] == 3
    assert s[key("shmcache_workers", state="ready")] == 2
    assert s[key("shmcache_workers", state="stopping")] == 0  # every state always present
    assert s[key("shmcache_segment_bytes", model="emb", version="2")] == 8192
    assert s[key("shmcache_worker_memory_bytes", pid="7", kind="pss")] == 140
    assert key("shmcache_worker_memory_bytes", pid="7", kind="rss") not in s


def test_snapshot_with_other_bounds_is_refused(metrics: MetricsRegistry) -> None:
    with pytest.raises(ValueError, match="bucket bounds"):
        metrics.update_worker(1, RequestStats(bounds=(0.1, 1.0)).snapshot())


# --- the endpoint ----------------------------------------------------------------------------


def test_readyz_follows_readiness_and_healthz_liveness(harness: Harness,
                                                       state: dict[str, bool]) -> None:
    assert harness.get("/readyz")[0] == 503
    assert harness.get("/healthz")[0] == 200
    state["ready"] = True
    assert harness.get("/readyz")[:1] == (200,)
    assert harness.get("/readyz?verbose=1")[2] == b"ready\n"
    state["live"] = False
    assert harness.get("/healthz")[0] == 503


def test_unknown_path_method_and_garbage(harness: Harness) -> None:
    assert harness.get("/nope")[0] == 404
    status, headers, _ = parse_response(harness.exchange(b"POST /metrics HTTP/1.0\r\n\r\n"))
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert parse_response(harness.exchange(b"hello\r\n\r\n"))[0] == 400
    status, headers, body = parse_response(harness.exchange(b"HEAD /healthz HTTP/1.0\r\n\r\n"))
    assert status == 200 and body == b""


def test_oversize_request_is_refused_and_closed(harness: Harness) -> None:
    raw = b"GET /metrics HTTP/1.0\r\n" + b"X-Pad: " + b"a" * (MAX_REQUEST + 100) + b"\r\n\r\n"
    status, _, _ = parse_response(harness.exchange(raw))
    assert status == 431
    assert not harness.endpoint.conns


def test_request_arriving_one_byte_at_a_time(harness: Harness) -> None:
    raw = harness.exchange(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n", byte_at_a_time=True)
    assert parse_response(raw)[0] == 200


def test_large_response_is_written_across_many_writable_events(
        metrics: MetricsRegistry, state: dict[str, bool]) -> None:
    body = bytes(range(256)) * 40000  # 10 MB: far more than one socket buffer
    h = Harness(metrics, state, {"/big": lambda: (200, "application/octet-stream", body)})
    try:
        assert h.get("/big")[2] == body
        assert not h.endpoint.conns
    finally:
        h.close()


def test_stalled_connection_is_expired(harness: Harness) -> None:
    with socket.create_connection(harness.endpoint.address, timeout=10) as sock:
        sock.sendall(b"GET /metr")
        deadline = time.monotonic() + 10
        while not any(c.inbuf for c in harness.endpoint.conns):
            assert time.monotonic() < deadline
            for k, _ in harness.sel.select(0.05):
                k.data(k.fileobj)
        harness.endpoint.expire(time.monotonic() + CONNECTION_TIMEOUT / 2)
        assert harness.endpoint.conns  # not yet
        harness.endpoint.expire(time.monotonic() + CONNECTION_TIMEOUT + 1)
        assert not harness.endpoint.conns
        assert sock.recv(10) == b""  # closed without an answer


def test_idle_connections_cannot_turn_a_probe_away(harness: Harness) -> None:
    """At MAX_CONNECTIONS the oldest connection goes, not the newcomer: 64 idle connections
    once turned away every scrape and probe for as long as they were held."""
    hogs = []
    try:
        for _ in range(MAX_CONNECTIONS + 10):
            hogs.append(socket.create_connection(harness.endpoint.address, timeout=10))
            for k, _ in harness.sel.select(0.01):
                k.data(k.fileobj)
        assert len(harness.endpoint.conns) == MAX_CONNECTIONS
        status, _, body = parse_response(harness.exchange(b"GET /healthz HTTP/1.0\r\n\r\n"))
        assert status == 200 and body
        assert hogs[0].recv(10) == b""  # the oldest hog was closed
    finally:
        for s in hogs:
            s.close()


def test_close_releases_the_port(metrics: MetricsRegistry, state: dict[str, bool]) -> None:
    h = Harness(metrics, state)
    address = h.endpoint.address
    h.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()
