"""Build one model's segment in a helper process, on the supervisor's behalf.

The supervisor never loads a model or creates an ONNX Runtime session itself: it must stay
responsive (answering pings, handling signals) while a big model is read, and it must hold no ORT
state when it forks workers. So it runs ``python -m supervisor.build`` per model; the helper
writes the segment with the supervisor recorded as its owner (name and header), prints one JSON
line describing the result, and exits. On failure the supervisor unlinks the name it asked for.

With ``--candidate`` it builds a *published* version: the file (ONNX, .npz or safetensors) is
checked against the served version's segment (``shmcache.candidate``), and a durable copy of the
complete new weights is written to ``--persist-to`` (for restarts) before the segment.

Output, one line on stdout: {"ok": true, "segment": NAME, "size": BYTES, "version": V}
                        or  {"ok": false, "error": "ModelError", "message": "..."}
"""

from __future__ import annotations

import os

# Building is background work: the workers' requests come first for the CPU. Measured with
# benchmarks/swap.py's load (2 workers, 3 clients, 2 cores), a CPU-bound process at nice 4
# raised the serving p99 1.7x and got 41 % of a core; at nice 7, 1.2x and 19 % (a publish's
# build of the 256 MiB MLP, ~2.2 s of CPU, then takes ~10 s); at nice 19 it starved (80 s).
# Set before the imports below, which alone take ~0.4 s of CPU.
BUILD_NICENESS = 7
if __name__ == "__main__":
    os.nice(BUILD_NICENESS)

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import onnx  # noqa: E402

from shmcache.errors import FileChanged, SegmentError, ShmcacheError  # noqa: E402
from shmcache.model import (build_model_segment, load_model, model_digest,  # noqa: E402
                            scan_model_file)
from shmcache.segment import OwnedSegment, Segment  # noqa: E402

EXIT_OK = 0
EXIT_FAILED = 1
PARTIAL_SUFFIX = ".partial.onnx"  # keep in step with supervisor.versions.PARTIAL_GLOB
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m supervisor.build")
    p.add_argument("--model-path", type=Path, required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--segment", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--owner-pid", type=int, required=True)
    p.add_argument("--mode", type=lambda s: int(s, 8), default=0o600)
    p.add_argument("--gid", type=int, default=None)
    p.add_argument("--served-segment", default=None, help="publish: the current version")
    p.add_argument("--allow-signature-change", action="store_true")
    p.add_argument("--expect-digest", default=None,
                   help="restart: the SHA-256 (hex) the file had when this version was loaded")
    p.add_argument("--persist-to", type=Path, default=None,
                   help="publish: write the complete new weights here (atomically)")
    p.add_argument("--served-file", type=Path, default=None,
                   help="publish: the served version's own weights (for a pre-packed segment)")
    p.add_argument("--served-digest", default=None,
                   help="publish: the SHA-256 (hex) --served-file had when it was loaded")
    p.add_argument("--prepack-cache", type=Path, default=None,
                   help="pre-pack with ONNX Runtime into the segment, caching here")
    p.add_argument("--opt-level", default="all", help="graph optimization level of the pre-pack")
    p.add_argument("--no-save-prepacked", dest="save_prepacked", action="store_false",
                   help="store ORT's optimized graph only, pre-packing off (--no-prepack mode)")
    p.add_argument("--huge-pages", action="store_true",
                   help="leave the weights workers keep mapped in 2 MiB page-cache folios")
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> onnx.ModelProto:
    if args.served_segment is None:
        return load_model(args.model_path)
    from shmcache.candidate import is_weights_file, load_candidate
    from shmcache.skeleton import graph_skeleton

    served = Segment.attach(args.served_segment)
    try:
        if served.header.optimized and args.served_file is not None:
            check_served_file(args.served_file, args.served_digest)
            # An optimized segment holds ORT's optimized graph, whose initializers are not the
            # exporter's: weights by name apply to the served version's own model. An ONNX
            # candidate only needs its inputs and outputs: read those without the weights.
            if not is_weights_file(args.model_path):
                return load_candidate(args.model_path, graph_skeleton(args.served_file), None,
                                      allow_signature_change=args.allow_signature_change)
            original = load_model(args.served_file)
            return load_candidate(args.model_path, original.SerializeToString(), None,
                                  allow_signature_change=args.allow_signature_change)
        return load_candidate(args.model_path, served.graph_bytes(), served.tensor,
                              allow_signature_change=args.allow_signature_change)
    finally:
        served.close()


def check_served_file(path: Path, recorded: str | None) -> None:
    """The served version's file must still hold what was loaded: a configured model file
    replaced on disk (normal before a restart) once had a publish's weights by name filled in
    from the new file, and its signature judged against the new file's."""
    if recorded is not None and model_digest(path) != recorded:
        raise FileChanged(
            f"{path}, which the served version was loaded from, has changed on disk since; "
            "a publish is checked against the served version, so restart the daemon to serve "
            "the new file first (or publish it)")


def partial_copy(dest: Path) -> Path:
    """Where a durable copy is written until it is complete; a killed builder's is swept by
    supervisor.versions.Manifest.prune."""
    return dest.with_name(dest.stem + PARTIAL_SUFFIX)


def copy_whole_file(source: Path, dest: Path) -> tuple[Path, str] | None:
    """A self-contained ONNX file copied (and hashed, one read) next to where it is kept;
    None for one whose weights live in external data files (saved whole after loading)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_copy(dest)
    try:
        scan = scan_model_file(source, copy_to=tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not scan.self_contained:
        tmp.unlink()
        return None
    return tmp, scan.digest


def naming(exc: ShmcacheError, copy: Path, given: Path) -> ShmcacheError:
    try:
        return type(exc)(str(exc).replace(str(copy), str(given)))
    except Exception:  # an error type built otherwise: say it as it is
        return exc


def keep(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def persist(model: onnx.ModelProto, dest: Path) -> str:
    """The complete weights of a published version, saved from what was checked; returns the
    copy's SHA-256 (the pre-pack cache key)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_copy(dest)
    try:
        onnx.save(model, str(tmp))
        digest = model_digest(tmp)
        keep(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave half a copy behind
        raise
    return digest


def load_what_is_kept(args: argparse.Namespace) -> tuple[onnx.ModelProto, Path, str | None]:
    """The model checked, the file a segment is built from, and its digest (None: not yet).

    A publish keeps a durable copy, and everything is checked and built from that copy, never
    the given path again: a file replaced while it was published once went live unchecked
    (its renamed output served without --allow-signature-change), or left a truncated copy
    that made the next start refuse the committed version."""
    if args.persist_to is None:
        return load(args), args.model_path, None
    from shmcache.candidate import is_weights_file

    given: Path = args.model_path
    copied = None if is_weights_file(given) else copy_whole_file(given, args.persist_to)
    if copied is None:  # weights by name or external data: loaded once, saved from memory
        model = load(args)
        return model, args.persist_to, persist(model, args.persist_to)
    tmp, digest = copied
    replacement = os.environ.get("SHMCACHE_FAULT_REPLACE_AFTER_COPY")
    if replacement:  # fault injection for tests: the given file replaced once it was read
        os.replace(replacement, given)
    try:
        args.model_path = tmp
        try:
            model = load(args)
        except ShmcacheError as exc:  # name what the user gave, not our copy of it
            raise naming(exc, tmp, given) from None
        finally:
            args.model_path = given
        keep(tmp, args.persist_to)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return model, args.persist_to, digest


def build(args: argparse.Namespace) -> dict[str, object]:
    from shmcache.candidate import check_callable, signature_of

    digest = None
    if args.expect_digest is not None and args.persist_to is None:
        # Hashed before it is parsed: a truncated copy is a changed file (named as such,
        # with the way out), not "not an ONNX model".
        digest = check_unchanged(args, args.model_path, model_digest(args.model_path))
    model, source, kept_digest = load_what_is_kept(args)
    check_callable(signature_of(model))
    if digest is None:  # recorded: a restart adopts only a match
        digest = check_unchanged(args, source, kept_digest or model_digest(source))
    result: dict[str, object] = {"ok": True, "version": args.version}
    owned = None
    if args.prepack_cache is not None:
        try:
            owned = build_prepacked(args, source, digest)
            result["prepacked"] = args.save_prepacked
            result["optimized"] = True
        except SegmentError:
            raise  # no room, name taken: the plain segment would fail the same way
        except Exception as exc:  # ORT could not pre-pack: serve the plain, shared weights
            result["fallback"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    if owned is None:
        owned = build_model_segment(
            model, name=args.segment, model_name=args.model_name,
            version=args.version, mode=args.mode, gid=args.gid, creator_pid=args.owner_pid,
            progress=report_progress, source=bytes.fromhex(digest))
    result.update(segment=owned.name, size=owned.size)
    if args.huge_pages:
        try:
            result["huge_bytes"] = collapse_kept_weights(owned.name)
        except Exception as exc:  # a speed-up only: the segment serves on 4 KiB pages
            result.update(huge_bytes=0, huge_error=f"{type(exc).__name__}: {exc}")
    return result


def check_unchanged(args: argparse.Namespace, source: Path, digest: str) -> str:
    """``digest`` if it is the one recorded for this version (or none is), else FileChanged."""
    if args.expect_digest is not None and digest != args.expect_digest:
        raise FileChanged(
            f"{source} changed since {args.model_name} v{args.version} was loaded from it "
            f"(SHA-256 {digest[:16]}..., recorded {args.expect_digest[:16]}...): those "
            "weights are gone")
    return digest


def build_prepacked(args: argparse.Namespace, source: Path, digest: str) -> OwnedSegment:
    """ORT pre-packs once here, in a process that forks nothing afterwards (issue 5)."""
    from worker.prepack import cached_prepack, write_prepacked_segment

    out = cached_prepack(source, args.prepack_cache, args.opt_level, digest,
                         packed=args.save_prepacked)
    return write_prepacked_segment(out, name=args.segment, model_name=args.model_name,
                                   version=args.version, mode=args.mode, gid=args.gid,
                                   creator_pid=args.owner_pid, progress=report_progress,
                                   source=bytes.fromhex(digest))


def collapse_kept_weights(segment: str) -> int:
    """Step 1 of shmcache.hugemap, here rather than in the first worker to map the segment:
    for the 256 MiB MLP it takes 0.2-0.4 s, which a publish's prepare (the swap's critical
    path, issue 6) must not pay. Every segment: ORT maps the weights of plain and optimized
    ones too. Bytes collapsed; 0 where the kernel cannot."""
    from shmcache.hugemap import collapse_file
    from shmcache.hugepages import transient_huge_pages

    with Segment.attach(segment) as seg:
        ranges = [(e.offset, e.length) for e in seg.kept_mapped()]
        path = seg.path
    with transient_huge_pages():  # the daemon's processes keep THP off (shmcache.hugepages)
        return collapse_file(path, ranges)


_last_report = [0.0]


def report_progress(done: int, total: int) -> None:
    """A JSON line on stdout at most ten times a second: `shmcache publish` shows it."""
    now = time.monotonic()
    if now - _last_report[0] >= 0.1 or done >= total:
        _last_report[0] = now
        print(json.dumps({"progress": done, "total": total}), flush=True)


def die_with_owner(owner_pid: int) -> None:
    """Be killed when the supervisor dies. An orphaned builder would finish a segment and a
    weight copy under a version number the restarted daemon does not know was taken, and may
    issue again for other weights (found by a fault probe: supervisor SIGKILL mid-publish)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the supervisor's next start sweeps what is left
    if os.getppid() != owner_pid:  # it died before the prctl took effect
        os._exit(EXIT_FAILED)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    die_with_owner(args.owner_pid)
    try:
        result = build(args)
    except ShmcacheError as exc:
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # report, don't traceback: the supervisor logs one line
        result = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(result), flush=True)
    return EXIT_OK if result["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
