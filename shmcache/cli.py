"""The `shmcache` command: the only place that parses arguments, prints for people and exits.

Library code raises typed errors; this module turns them into a one-line message on stderr and
an exit status (STYLE.md: exit only in the CLI).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from shmcache import hugepages
from shmcache.client import Client
from shmcache.paths import SOCKET_ENV, control_socket_path, default_socket_path

from shmcache.dtypes import type_name
from shmcache.errors import ShmcacheError
from shmcache.segment import KIND_BLOB, Segment

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # as the supervisor's EXIT_STARTUP: the unit does not restart on it

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
        f"  {'pre-packed' if h.prepacked else 'optimized graph' if h.optimized else 'plain'}",
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


def setup_logging(level: str = "info") -> None:
    """One line per event on stderr with a level; journald adds time and pid of its own."""
    logging.basicConfig(
        level=getattr(logging, level.upper()), stream=sys.stderr,
        format="%(levelname)s %(name)s[%(process)d]: %(message)s")


def add_socket_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", type=Path, default=None,
                   help=f"daemon socket (default ${SOCKET_ENV} or {default_socket_path()})")


def socket_of(args: argparse.Namespace) -> Path:
    return args.socket if args.socket is not None else default_socket_path()


SERVE_FLAGS: list[tuple[str, type, str]] = [
    ("workers", int, "worker processes (default 2)"),
    ("standby", int, "warm spares that take over at once when a worker dies "
                     "(default 1 when a served segment holds pre-packed weights, else 0)"),
    ("threads", int, "intra-op threads per worker (default max(1, cores // workers))"),
    ("max_inflight", int, "requests a worker holds at once before answering overloaded (64)"),
    ("max_frame", int, "largest request or response frame in bytes (272 MiB)"),
    ("graceful_timeout", float, "seconds a stopping worker gets to answer what it read (30)"),
    ("stall_timeout", float, "seconds a client may stop sending in the middle of a request "
                             "before its connection is closed (30)"),
    ("boot_timeout", float, "seconds a worker (or a publish) gets to load and warm up (600)"),
    ("max_boot_failures", int, "boot failures in a row that stop the daemon (5)"),
    ("heartbeat_timeout", float, "seconds of worker silence before it is killed (10)"),
    ("state_dir", Path, "published versions and caches (/var/lib/shmcache for root)"),
    ("keep", int, "earlier versions kept loaded for rollback (1)"),
    ("group", str, "group owning the client socket and segments (modes 0660/0640)"),
    ("metrics_address", str, "HOST:PORT for /metrics, /healthz, /readyz (off)"),
    ("spin", float, "seconds a worker stays on the CPU after a request, for latency (0.00025)"),
    ("optimization", str, "ONNX Runtime graph optimization: disabled|basic|extended|all"),
    ("log_level", str, "debug|info|warning|error"),
]


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="a model to serve (repeatable); a bare PATH is named by its file stem; "
                        "default: the model that ships with shmcache")
    for name, kind, text in SERVE_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=text)
    p.add_argument("--lock-memory", action="store_true", default=None,
                   help="keep segments resident (mlock); needs RLIMIT_MEMLOCK / LimitMEMLOCK=")
    p.add_argument("--prepack", dest="prepack", action=argparse.BooleanOptionalAction, default=None,
                   help="store ONNX Runtime's pre-packed weights in the segment (default on)")
    p.add_argument("--release-memory", dest="release_memory",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="idle workers return their working memory to the OS instead of "
                        "keeping it in ONNX Runtime's arena (default on; on glibc the daemon "
                        "re-executes itself once with GLIBC_TUNABLES=glibc.malloc.tcache_count=0)")
    p.add_argument("--huge-pages", dest="huge_pages",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="huge pages for ONNX Runtime's transient re-packs while a publish "
                        "prepares (re-executes the daemon once with GLIBC_TUNABLES), and 2 MiB "
                        "mappings for the weights workers keep mapped (default on)")
    add_socket_arg(p)


def serve_config(args: argparse.Namespace, warn: Callable[[str], None]) -> Any:
    """Defaults < --config file < flags given < SHMCACHE_* environment (supervisor.configfile)."""
    from supervisor.config import ModelSpec
    from supervisor.configfile import load_config, option_types

    cli = {k: v for k, v in vars(args).items() if k in option_types() and v is not None}
    if args.model:
        cli["models"] = list(args.model)
    config = load_config(args.config, cli, os.environ, warn=warn)
    if not config.models:
        config.models = [ModelSpec("embedded", embedded_model_path())]
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    from supervisor.arbiter import serve
    from supervisor.config import ConfigError
    from worker import heap

    warnings: list[str] = []  # printed once, by the image that serves

    def print_warnings() -> None:
        for text in warnings:
            print(f"shmcache serve: warning: {text}", file=sys.stderr)

    try:
        config = serve_config(args, warnings.append).validate()
    except ConfigError as exc:
        print_warnings()
        print(f"shmcache serve: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # Returns only when it would change nothing: glibc reads its tunables at start.
    hugepages.reexec_with_tunable(config.huge_pages, heap.startup_tunables(config.release_memory))
    print_warnings()
    if config.huge_pages:
        hugepages.keep_small_pages()
    setup_logging(config.log_level)
    return serve(config)


def control_client(args: argparse.Namespace, timeout: float = 10.0) -> Client:
    return Client(control_socket_path(socket_of(args)), timeout=timeout, connect_timeout=2.0)


def cmd_status(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        status = client.request("status")
    status = {k: v for k, v in status.items() if k not in ("v", "id", "ok")}
    if args.json:
        print(json_dump(status))
        return EXIT_OK
    print(format_status(status))
    return EXIT_OK


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def format_status(status: dict[str, Any]) -> str:
    head = (f"shmcache pid {status['pid']}  {status['phase']}"
            f"{'  ready' if status['ready'] else '  not ready'}  socket {status['socket']}  "
            f"up {status['uptime']:.0f}s  workers {len(status['workers'])}/{status['target_workers']}"
            f"  restarts {status['restarts']}")
    workers = format_table(
        [(w["pid"], w["state"] if w.get("role", "active") == "active" else "standby",
          f"{w['uptime']:.0f}s", w["served"], w.get("connections", 0),
          " ".join(f"{k}=v{v}" for k, v in sorted(w["versions"].items())),
          mib(w["shared"]), mib(w["uss"]), mib(w["pss"])) for w in status["workers"]],
        ["pid", "state", "uptime", "served", "clients", "versions", "shared MiB", "private (USS) MiB",
         "PSS MiB"])
    models = format_table(
        [(m["name"], m["version"], versions_text(m.get("kept")), loading_text(m),
          m["segment"], mib(m["size"])) for m in status["models"]],
        ["model", "version", "kept (rollback)", "loading", "segment", "size MiB"])
    return f"{head}\n\n{workers}\n\n{models}"


def versions_text(versions: object) -> str:
    return " ".join(f"v{v}" for v in versions) if isinstance(versions, list) and versions else "-"


def loading_text(model: dict[str, Any]) -> str:
    """A publish preparing, or a kept version loading again after a restart."""
    if model.get("publishing") is not None:
        return f"v{model['publishing']} (publish)"
    if model.get("restoring") is not None:
        return f"v{model['restoring']} (kept, after restart)"
    return "-"


def cmd_health(args: argparse.Namespace) -> int:
    try:
        with control_client(args, timeout=args.timeout) as client:
            health = client.request("health")
    except (ShmcacheError, OSError) as exc:
        print(f"not live: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    ok = health["ready"] if args.ready else health["live"]
    print(("ready" if health["ready"] else "live, not ready") if health["live"] else "not live")
    return EXIT_OK if ok else EXIT_FAILURE


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish a new version; on a terminal, show the phases while the daemon works."""
    import threading

    path = args.path.resolve()
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def publish() -> None:
        try:
            with control_client(args, timeout=args.timeout) as client:
                result.update(client.request("publish", model=args.model, path=str(path),
                                             allow_signature_change=args.allow_signature_change))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            failure.append(exc)

    worker = threading.Thread(target=publish, daemon=True)
    worker.start()
    if sys.stdout.isatty():
        show_progress(args, worker)
    worker.join()
    if failure:
        raise failure[0]
    timings = result.get("timings", {})
    if sys.stdout.isatty():
        summary = (f"{args.model}: v{result['previous']} -> v{result['version']} "
                   f"(write {timings.get('write', 0):.2f}s, prepare {timings.get('prepare', 0):.2f}s)")
        print(f"\r{summary:<72}")  # over the whole progress line, not just its start
    else:
        print(result["version"])
    return EXIT_OK


def show_progress(args: argparse.Namespace, publishing: Any) -> None:
    last = ""
    with control_client(args) as client:
        while publishing.is_alive():
            try:
                p = client.request("publish_status", model=args.model)
            except ShmcacheError:
                break
            phase = p.get("phase", "idle")
            if phase == "building" and p.get("size"):
                line = f"writing v{p['version']}: {mib(p['written'])} of {mib(p['size'])} MiB"
            elif phase == "building":
                line = f"reading and checking {args.path.name} ({p['elapsed']:.1f}s)"
            elif phase == "preparing":
                line = (f"wrote {mib(p['size'])} MiB; preparing on workers "
                        f"({p['prepared']} done, {p['waiting']} waiting)")
            elif phase == "idle":
                line = "asking the daemon"
            else:
                line = "flipping"
            if line != last:
                print(f"\r{line:<72}", end="", flush=True)
                last = line
            publishing.join(0.1)


def cmd_rollback(args: argparse.Namespace) -> int:
    with control_client(args) as client:
        fields: dict[str, Any] = {"model": args.model}
        if args.to is not None:
            fields["to"] = args.to
        result = client.request("rollback", **fields)
    print(f"{args.model}: v{result['previous']} -> v{result['version']}")
    return EXIT_OK


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
    p.add_argument("--requests", type=int, default=200, help="requests to send (default 200)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("publish", help="publish a new weight version, swapped in atomically")
    p.add_argument("model", help="name of a served model")
    p.add_argument("path", type=Path, help="an ONNX file, or weights by name (.npz, safetensors)")
    p.add_argument("--allow-signature-change", action="store_true",
                   help="accept inputs/outputs that differ from the served version's")
    p.add_argument("--timeout", type=float, default=900.0)
    add_socket_arg(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("rollback", help="flip back to a kept earlier version")
    p.add_argument("model")
    p.add_argument("--to", type=int, default=None, help="version (default: the previous one)")
    add_socket_arg(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("status", help="workers, versions and memory of a running daemon")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_socket_arg(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("health", help="exit 0 when the daemon is live (with --ready: ready)")
    p.add_argument("--ready", action="store_true", help="require readiness, not only liveness")
    p.add_argument("--timeout", type=float, default=5.0)
    add_socket_arg(p)
    p.set_defaults(func=cmd_health)
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
