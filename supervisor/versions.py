"""What the daemon knows of each model's versions, and the manifest that makes them durable.

A model has one current version and up to ``keep`` earlier ones (for rollback), each in its own
sealed segment that every worker has loaded. The manifest in the state directory records, per
model, the last *committed* version and the file holding its weights, so a restart — after a
clean stop or a crash — serves that version rather than the file the daemon was first given,
and the kept ones, which a restart loads again (in the background) for rollback.

Manifest (``<state_dir>/manifest.json``, replaced atomically: write, fsync, rename, fsync dir)::

    {"layout": 1,
     "models": {"<model>": {"version": 7, "file": "models/<model>/v7.onnx",
                            "kept": {"6": "models/<model>/v6.onnx"},
                            "issued": 7,
                            "digests": {"7": "<sha256 hex>", "6": "<sha256 hex>"},
                            "served": {"7": 12, "6": 11}}}}

``served`` orders the versions by when each last became current (ModelState.served): what
is kept, and where a plain rollback goes, follow it. ``digests`` are the SHA-256 of each
version's file when it was loaded (the segment header's ``source``): a file that no longer
matches never serves under that version's number. A version's file is a copy under the state
directory, except for a version built from the configured model file, which the operator may
replace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shmcache.segment import OwnedSegment

MANIFEST = "manifest.json"
LAYOUT = 1
DIGEST_BYTES = 32  # SHA-256
MAX_VERSION = 2**31 - 1  # a number the wire, the version table and the segment names carry


def version_number(value: object) -> int | None:
    """A version number read from the manifest (an int, or a digit string as a key), or
    None if it is not one: a hand-edited file must not crash the daemon or reach the wire."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        return None
    return value


@dataclass
class Version:
    number: int
    segment: OwnedSegment
    file: Path  # the weights this version was built from (persisted copy once published)
    blobs: bool = False  # its graph loads pre-packed blobs: slow to create a session over
    key: bytes | None = None  # its pre-pack's cache key (segment header); None: unknown
    digest: bytes | None = None  # SHA-256 of the file it was built from; None: unknown


@dataclass
class ModelState:
    name: str
    slot: int
    path: Path  # as configured
    current: int = 0
    versions: dict[int, Version] = field(default_factory=dict)
    attempted: int = 0  # highest version a publish started: numbers are never reused
    # version -> when it last became current (a counter; higher is more recent): what is
    # kept and where a plain rollback goes follow what served, not the numbers
    served: dict[int, int] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.current

    @property
    def segment(self) -> OwnedSegment:
        return self.versions[self.current].segment

    def next_version(self, floor: int = 0) -> int:
        return max([floor, self.current, self.attempted, *self.versions]) + 1

    def segments(self, but: int | None = None) -> list[str]:
        """Every loaded version's segment but version ``but``, oldest first (what a new
        worker maps)."""
        return [self.versions[v].segment.name for v in sorted(self.versions) if v != but]

    def make_current(self, version: int) -> None:
        self.current = version
        self.served[version] = max(self.served.values(), default=0) + 1

    def rollback_order(self, versions: Iterable[int], current: int) -> list[int]:
        """``versions`` (not ``current``) in the order they are worth keeping: older than
        ``current`` first, the one that served most recently first (where a plain rollback
        goes); then newer ones (left behind by a rollback), likewise. After v3 was rolled
        back to v1 and v4 published, v1 comes before v3."""
        return sorted((v for v in versions if v != current), reverse=True,
                      key=lambda v: (v < current, self.served.get(v, 0), v))

    def surplus(self, keep: int) -> list[int]:
        """Versions that are neither current nor among the ``keep`` first in rollback order."""
        return self.rollback_order(self.versions, self.current)[keep:]

    def rollback_target(self, to: int | None) -> int | None:
        """``to`` if loaded; else the older version that served most recently."""
        if to is not None:
            return to if to in self.versions and to != self.current else None
        ranked = self.rollback_order(self.versions, self.current)
        return ranked[0] if ranked and ranked[0] < self.current else None


class Manifest:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.path = state_dir / MANIFEST
        self.data: dict[str, Any] = {"layout": LAYOUT, "models": {}}

    def load(self) -> Manifest:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return self
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.path}: unreadable manifest ({exc})") from exc
        if isinstance(data, dict) and data.get("layout") == LAYOUT and isinstance(data.get("models"), dict):
            self.data = data
        return self

    def entry(self, model: str) -> dict[str, Any]:
        """``model``'s entry, or an empty one if it has none (or a malformed one)."""
        entry = self.data["models"].get(model)
        return entry if isinstance(entry, dict) else {}

    def recorded(self, model: str) -> tuple[int, Path] | None:
        """The last committed (version, file) of ``model`` as recorded, file present or not."""
        entry = self.entry(model)
        version, file = version_number(entry.get("version")), entry.get("file")
        if version is None or not isinstance(file, str) or not file:
            return None
        return version, self.dir / file

    def committed(self, model: str) -> tuple[int, Path] | None:
        """The last committed (version, file) of ``model``, if its file still exists."""
        recorded = self.recorded(model)
        return recorded if recorded is not None and recorded[1].is_file() else None

    def served(self, model: str) -> dict[int, int]:
        """When each version last became current (ModelState.served), as recorded."""
        served = self.entry(model).get("served")
        if not isinstance(served, dict):
            return {}
        found = {version_number(k): n for k, n in served.items()
                 if isinstance(n, int) and not isinstance(n, bool)}
        return {v: n for v, n in found.items() if v is not None}

    def is_own_copy(self, file: Path) -> bool:
        """Whether ``file`` is a weight copy this daemon wrote (not a file the operator
        configured, which may be replaced at will)."""
        return file.is_relative_to(self.dir / "models")

    def kept(self, model: str) -> list[tuple[int, Path]]:
        """``model``'s kept (version, file) pairs whose file still exists, newest first: what
        a restarted daemon loads again so that a rollback still finds them."""
        kept = self.entry(model).get("kept")
        if not isinstance(kept, dict):
            return []
        found = [(version_number(k), self.dir / f) for k, f in kept.items()
                 if isinstance(f, str) and f]
        return sorted(((v, f) for v, f in found if v is not None and f.is_file()), reverse=True)

    def digest(self, model: str, version: int) -> bytes | None:
        """The recorded SHA-256 of ``version``'s file; None if the manifest has none."""
        digests = self.entry(model).get("digests")
        value = digests.get(str(version)) if isinstance(digests, dict) else None
        try:
            digest = bytes.fromhex(value) if isinstance(value, str) else None
        except ValueError:
            return None
        return digest if digest is not None and len(digest) == DIGEST_BYTES else None

    def record_current(self, model: str, version: int, file: Path, digest: bytes) -> None:
        """Record at once, outside a commit, that ``version`` (``file``, ``digest``) serves;
        the kept versions stay as they are. At start: the configured model file replaced or
        reconfigured, whose contents serve under a new number; or a version served before
        any publish recorded it."""
        entry = self.data["models"].setdefault(model, {})
        if not isinstance(entry, dict):
            entry = self.data["models"][model] = {}
        entry.update(version=version, file=self.relative(file),
                     issued=max(version, self.highest(model)))
        digests = entry.get("digests")
        entry["digests"] = {**(digests if isinstance(digests, dict) else {}),
                            str(version): digest.hex()}
        self.write()

    def record_serving(self, state: ModelState) -> None:
        """At start: record the version served and its digest, so a replaced configured
        file never serves under its number, even before the first publish."""
        version = state.versions[state.current]
        if version.digest is None:
            return
        entry = self.entry(state.name)
        if version_number(entry.get("version")) == state.current and \
                self.digest(state.name, state.current) == version.digest:
            return  # already recorded: no write
        self.record_current(state.name, state.current, version.file, version.digest)

    def relative(self, path: Path) -> str:
        """How the manifest records ``path``: relative to the state directory when inside it
        (the directory may move), else absolute (``recorded`` joins anything else to it)."""
        path = path.absolute()
        try:
            return str(path.relative_to(self.dir.absolute()))
        except ValueError:
            return str(path)

    def highest(self, model: str) -> int:
        """The highest version number recorded for ``model``: committed, kept, or issued to a
        publish. A restarted daemon loads only the committed version, and numbers its next
        publish above all of these, so one number never names two different weights."""
        entry = self.entry(model)
        kept = entry.get("kept")
        numbers = [entry.get("version"), entry.get("issued"),
                   *(kept if isinstance(kept, dict) else {})]
        return max((n for n in map(version_number, numbers) if n is not None), default=0)

    def version_file(self, model: str, version: int) -> Path:
        return self.dir / "models" / model / f"v{version}.onnx"

    def commit(self, state: ModelState) -> None:
        """Record ``state``'s current and kept versions, durably, before the flip is visible.
        On an OSError (a full disk) the manifest, on disk and here, is as it was."""
        before = self.data["models"].get(state.name)
        self.data["models"][state.name] = {
            "version": state.current,
            "file": self.relative(state.versions[state.current].file),
            "kept": {str(v): self.relative(state.versions[v].file) for v in state.versions
                     if v != state.current},
            "issued": max([state.attempted, self.highest(state.name), *state.versions]),
            "digests": {str(v): version.digest.hex() for v, version in state.versions.items()
                        if version.digest is not None},
            "served": {str(v): state.served[v] for v in state.versions if v in state.served},
        }
        try:
            self.write()
        except OSError:
            if before is None:
                del self.data["models"][state.name]
            else:
                self.data["models"][state.name] = before
            raise
        self.prune(state.name)

    def sweep_partial_copies(self) -> list[Path]:
        """At start, before any builder runs: what killed builders left half-written."""
        swept = [*(self.dir / "models").glob("*/v*.partial.onnx"),
                 *(self.dir / "models").glob("*/v*.tmp")]
        for file in swept:
            file.unlink(missing_ok=True)
        return swept

    def prune(self, model: str) -> None:
        """Delete ``model``'s weight copies the manifest no longer names: kept versions of a
        run before a restart, which no process loaded, and the partial copies of builders that
        were killed (``v5.partial.onnx``; ``v5.tmp`` before). Safe at a commit: publishes of
        one model are serialised, so no copy of it is being written."""
        referenced = self.referenced_files()
        directory = self.dir / "models" / model
        for file in [*directory.glob("v*.onnx"), *directory.glob("v*.tmp")]:
            if file not in referenced:
                file.unlink(missing_ok=True)

    def write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError:
            if tmp.is_file():
                tmp.unlink()
            raise
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def referenced_files(self) -> set[Path]:
        files: set[Path] = set()
        for entry in self.data["models"].values():
            if not isinstance(entry, dict):
                continue
            kept = entry.get("kept")
            names = [entry.get("file"), *(kept.values() if isinstance(kept, dict) else ())]
            files.update(self.dir / name for name in names if isinstance(name, str) and name)
        return files
