"""The `shmcache` command: the only place that parses arguments, prints for people and exits.

Library code raises typed errors; this module turns them into a one-line message on stderr and
an exit status (STYLE.md: exit only in the CLI).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from shmcache.dtypes import type_name
from shmcache.errors import ShmcacheError
from shmcache.segment import KIND_BLOB, Segment

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], int]


def embedded_model_path() -> Path:
    """The small model that ships inside the package (made by scripts/make_model.py)."""
    return Path(str(resources.files("shmcache") / "models" / "embedded.onnx"))


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    rows_out = [headers, *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows_out)


def describe_segment(seg: Segment) -> str:
    """Header and entry table of a segment, for people."""
    h = seg.header
    created = dt.datetime.fromtimestamp(h.created_ns / 1e9, dt.timezone.utc)
    head = [
        f"segment   {seg.name}",
        f"model     {h.model}  version {h.version}",
        f"state     {'sealed' if h.sealed else 'building'}  layout {h.layout_version}"
        f"  {'pre-packed' if h.prepacked else 'plain'}",
        f"size      {h.total_size} bytes  (data {h.data_length}, graph {h.graph_length})",
        f"digest    sha256:{h.digest.hex()}",
        f"created   {created.isoformat(timespec='seconds')} by pid {h.creator_pid}",
        f"entries   {h.entry_count}",
        "",
    ]
    rows = [
        (i, e.name, "blob" if e.kind == KIND_BLOB else type_name(e.dtype).lower(),
         list(e.shape) if e.kind != KIND_BLOB else "-", e.offset, e.length)
        for i, e in enumerate(seg.entries)
    ]
    return "\n".join(head) + format_table(rows, ["#", "name", "dtype", "shape", "offset", "bytes"])


def cmd_inspect(args: argparse.Namespace) -> int:
    with Segment.attach(args.name, verify=args.verify) as seg:
        print(describe_segment(seg))
        if args.verify:
            print("\ndigest    verified")
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace) -> int:
    from shmcache.registry import list_objects, sweep_orphans

    removed = sweep_orphans(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for item in removed:
        print(f"{verb} {item.name} ({item.size} bytes, model {item.model} v{item.version}, "
              f"creator pid {item.pid} dead)")
    kept = [f for f in list_objects() if not f.orphan]
    print(f"{verb} {len(removed)} orphaned object(s); {len(kept)} in use left alone")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from shmcache.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcache",
        description="Serve ONNX models from many processes with one shared copy of the weights.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print a segment's header and tensor table")
    p.add_argument("name", help="segment name as listed in /dev/shm")
    p.add_argument("--verify", action="store_true", help="also check the digest")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("cleanup", help="remove segments whose creating process is dead")
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("demo", help="run the main job on the model that ships with shmcache")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ShmcacheError as exc:
        print(f"shmcache {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def json_dump(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


if __name__ == "__main__":
    sys.exit(main())
