"""Per-worker request counts and latency histograms, recorded on the request path.

Plain dicts and lists (no prometheus_client objects, no locks: the event-loop thread records),
so ``snapshot()`` is msgpack-serialisable and rides on the worker's heartbeat to the supervisor,
which renders it for Prometheus (``supervisor.metrics``). Snapshot layout (version 1)::

    {"v": 1,
     "bounds": [5e-05, ..., 10.0],                       # upper bounds, seconds; +Inf implied
     "requests": [[model, version, outcome, count], ...],
     "latency":  [[model, version, [n_0, ..., n_inf], sum_seconds], ...]}   # per bucket
"""

from __future__ import annotations

import bisect
from typing import Any

SNAPSHOT_VERSION = 1
# 50 µs .. 10 s in 1-2.5-5 steps: a small CPU model answers in tens of µs over the socket,
# a large one in seconds; 17 buckets keep a histogram series small.
BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

class RequestStats:
    """Per-worker request counts and latency histograms, recorded on the request path."""

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts: dict[tuple[str, int, str], int] = {}
        self.latency: dict[tuple[str, int], list[float]] = {}  # bucket counts..., then sum

    def record(self, model: str, version: int, outcome: str, seconds: float) -> None:
        """Count one finished request (``outcome``: "ok" or an error code such as "overloaded")."""
        key = (model, version, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        row = self.latency.get((model, version))
        if row is None:
            row = self.latency[(model, version)] = [0] * (len(self.bounds) + 2)
        # bisect_left: a value equal to a bound belongs in that bucket (Prometheus "le").
        row[bisect.bisect_left(self.bounds, seconds)] += 1
        row[-1] += seconds

    def snapshot(self) -> dict[str, Any]:
        """Totals since the worker started, in the layout drawn in the module docstring."""
        return {
            "v": SNAPSHOT_VERSION,
            "bounds": list(self.bounds),
            "requests": [[m, v, o, n] for (m, v, o), n in self.counts.items()],
            "latency": [[m, v, [int(n) for n in row[:-1]], row[-1]]
                        for (m, v), row in self.latency.items()],
        }


