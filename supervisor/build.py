"""Build one model's segment in a helper process, on the supervisor's behalf.

The supervisor never loads a model or creates an ONNX Runtime session itself: it must stay
responsive (answering pings, handling signals) while a big model is read, and it must hold no ORT
state when it forks workers. So it runs ``python -m supervisor.build`` per model; the helper
writes the segment with the supervisor recorded as its owner (name and header), prints one JSON
line describing the result, and exits. On failure the supervisor unlinks the name it asked for.

Output, one line on stdout: {"ok": true, "segment": NAME, "size": BYTES, "version": V}
                        or  {"ok": false, "error": "ModelError", "message": "..."}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shmcache.errors import ShmcacheError
from shmcache.model import build_model_segment, load_model

EXIT_OK = 0
EXIT_FAILED = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m supervisor.build")
    p.add_argument("--model-path", type=Path, required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--segment", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--owner-pid", type=int, required=True)
    p.add_argument("--mode", type=lambda s: int(s, 8), default=0o600)
    p.add_argument("--gid", type=int, default=None)
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> dict[str, object]:
    owned = build_model_segment(
        load_model(args.model_path), name=args.segment, model_name=args.model_name,
        version=args.version, mode=args.mode, gid=args.gid, creator_pid=args.owner_pid)
    return {"ok": True, "segment": owned.name, "size": owned.size, "version": args.version}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
