#!/usr/bin/env python3
"""Segment benchmark: memory of 4 readers of one 256 MiB segment, and build time.

Prints, in one run on this machine:
  * each reader's USS growth after attaching and touching every tensor, as a fraction of the
    model size, while all 4 readers hold the mapping (target: under 1% each);
  * the segment's pages in /dev/shm;
  * the build time (onnx load + segment write + digest + seal) as a ratio to the baseline
    `onnx.load` plus one memcpy of the same tensor bytes (target: at most 2x).

Usage: python benchmarks/segment.py [--mib 256] [--readers 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import make_mlp, table  # noqa: E402
from shmcache.model import build_model_segment, load_model  # noqa: E402
from shmcache.registry import instance_id, segment_name  # noqa: E402

READER = r"""
import os, sys, psutil
from shmcache.segment import Segment
proc = psutil.Process()
before = proc.memory_full_info().uss
seg = Segment.attach(sys.argv[1])
total = 0.0
for name, view in seg.tensors():
    total += float(view.sum(dtype="float64"))   # touches every page of every tensor
print("touched", flush=True)
sys.stdin.readline()                            # wait until every reader has touched
after = proc.memory_full_info().uss
print(f"{before} {after}", flush=True)
sys.stdin.readline()
"""


def baseline_seconds(path: Path) -> float:
    """onnx.load plus one memcpy of every initializer's bytes."""
    start = time.perf_counter()
    model = onnx.load(str(path))
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    dest = np.empty(sum(a.nbytes for a in arrays), np.uint8)
    at = 0
    for a in arrays:
        dest[at : at + a.nbytes] = a.reshape(-1).view(np.uint8)
        at += a.nbytes
    return time.perf_counter() - start


def build_seconds(path: Path, instance: str) -> tuple[float, object]:
    start = time.perf_counter()
    owned = build_model_segment(load_model(path), name=segment_name(instance, "bench", 1),
                                model_name="bench", version=1)
    return time.perf_counter() - start, owned


def measure_readers(name: str, readers: int) -> list[tuple[int, int]]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", READER, name], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(readers)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "touched"
        results = []
        for p in procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("\n")
            p.stdin.flush()
            before, after = map(int, p.stdout.readline().split())
            results.append((before, after))
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("\n")
            p.stdin.flush()
            p.wait(timeout=30)
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = make_mlp(Path(tmp) / "mlp.onnx", args.mib)
        size = sum(t.ByteSize() for t in onnx.load(str(path)).graph.initializer)
        instance = instance_id(tmp)
        base = [baseline_seconds(path) for _ in range(args.repeat)]
        builds = []
        for _ in range(args.repeat):
            seconds, owned = build_seconds(path, instance)
            builds.append(seconds)
            owned.unlink()  # type: ignore[attr-defined]
        _, owned = build_seconds(path, instance)
        try:
            name = owned.name  # type: ignore[attr-defined]
            blocks = os.stat(f"/dev/shm/{name}").st_blocks * 512
            readings = measure_readers(name, args.readers)
        finally:
            owned.unlink()  # type: ignore[attr-defined]

    print(f"model: {args.mib} MiB MLP, {size / 2**20:.1f} MiB of tensors; "
          f"segment pages in /dev/shm: {blocks / 2**20:.1f} MiB\n")
    rows = [(f"reader {i}", f"{b / 2**20:.1f}", f"{a / 2**20:.1f}", f"{(a - b) / 2**20:.2f}",
             f"{(a - b) / size:.3%}", "yes" if (a - b) / size < 0.01 else "NO")
            for i, (b, a) in enumerate(readings)]
    print(table(rows, ["process", "USS before MiB", "USS after MiB", "growth MiB",
                       "growth / model", "< 1%"]))
    b, s = statistics.median(base), statistics.median(builds)
    print()
    print(table([("onnx.load + memcpy (baseline)", f"{b * 1000:.0f}", "1.00"),
                 ("load + build segment", f"{s * 1000:.0f}", f"{s / b:.2f}")],
                ["build", "median ms", "ratio (target <= 2.00)"]))
    print(f"\nmachine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
