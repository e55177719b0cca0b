"""One publish of a new weight version, as a small state machine the arbiter drives.

    building --(builder ok)--> preparing --(every live worker prepared)--> committed
        |                          |
        +----(any failure)---------+----> failed: nothing flipped, new segment unlinked

* building: ``python -m supervisor.build --candidate`` checks the file against the served
  model (signature, weight names, dtypes, shapes, integrity), writes the new sealed segment and
  a durable copy of the weights under the state directory.
* preparing: every live worker maps the segment, creates and warms a session, and replies. A
  worker that boots meanwhile is asked once it is ready; a worker that dies, an error, or the
  deadline fails the publish.
* commit: manifest first (durable), then one store into the version table (the flip), then the
  reply. A request dispatched after the flip, in any worker, uses the new version.

The publisher's connection is the publish's lifeline: if it closes before the flip (the CLI was
killed), the publish is abandoned and the daemon keeps serving the old version.

A *restore* is the same machine without a publisher and without the flip: after a restart, each
kept version the manifest records is built and prepared everywhere again, in the background,
so that ``rollback`` still finds it. Its commit only marks the version loaded. A worker that
dies meanwhile does not fail it (its replacement is asked to prepare once ready); anything
else does, and then the version is only lost for rollback, never served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.peers import Peer


@dataclass
class PublishJob:
    model: str
    version: int
    candidate: Path
    segment: str
    file: Path  # durable copy of the new version's weights
    peer: Peer | None  # the publisher; None for a restore
    request_id: int
    deadline: float
    phase: str = "building"  # building -> preparing -> committed | failed
    started: float = field(default_factory=time.monotonic)
    built_at: float = 0.0
    size: int = 0  # bytes of the new segment
    written: int = 0  # of which written so far (builder progress)
    waiting: dict[int, int] = field(default_factory=dict)  # worker pid -> control request id
    prepared: set[int] = field(default_factory=set)
    error: str = ""

    @property
    def restore(self) -> bool:
        return self.peer is None

    @property
    def kind(self) -> str:
        return "restore" if self.restore else "publish"

    def timings(self, flipped_at: float) -> dict[str, float]:
        return {
            "write": self.built_at - self.started,
            "prepare": flipped_at - self.built_at,
            "total": flipped_at - self.started,
        }

    def progress(self) -> dict[str, object]:
        return {"model": self.model, "version": self.version, "kind": self.kind,
                "phase": self.phase,
                "elapsed": time.monotonic() - self.started, "size": self.size,
                "written": self.written,
                "prepared": len(self.prepared), "waiting": len(self.waiting),
                "error": self.error}
