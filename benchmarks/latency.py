#!/usr/bin/env python3
"""Latency benchmark: round trip through one worker next to session.run in this process.

Prints, in one run on this machine, for a tiny model (one 16x16 MatMul, batch 1) and for a
256 MiB MLP at batch 32:

  * p50 / p99 of ``session.run`` in this process with the worker's own session options
    (``SessionSettings.options``, same intra-op thread count, pre-packing as the worker has it);
  * p50 / p99 of ``session.run`` with ORT's default options (a reference, not the baseline);
  * p50 / p99 of ``Client.run`` against a daemon with one worker;
  * the overhead (daemon minus same-options in-process) in microseconds and the ratio.

Target (issue): p50 overhead at most 100 us for the tiny model on this 2-core machine.

The three are measured in alternating blocks (``--block`` calls each), so noise from other
processes on the host hits all of them alike (STYLE.md principle 12).

Usage: python benchmarks/latency.py [--requests 3000] [--large-requests 120] [--mib 256]
                                    [--threads 2] [--block 200] [--skip-large]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (Daemon, active_pids, make_mlp, make_tiny, measure,  # noqa: E402
                               one_worker_settings, percentile, shm_leftovers, table)
from shmcache import Client  # noqa: E402
from shmcache.segment import Segment  # noqa: E402
from worker.runtime import SessionSettings  # noqa: E402

TARGET_US = 100.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000, help="calls per side, tiny model")
    p.add_argument("--large-requests", type=int, default=120, help="calls per side, MLP")
    p.add_argument("--mib", type=int, default=256, help="MLP size")
    p.add_argument("--batch", type=int, default=32, help="MLP batch")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, worker and in-process")
    p.add_argument("--block", type=int, default=200, help="calls per block before switching side")
    p.add_argument("--skip-large", action="store_true", help="tiny model only")
    return p.parse_args()


def session_options_text(so: ort.SessionOptions, entries: dict[str, str]) -> str:
    return (f"intra_op={so.intra_op_num_threads} inter_op={so.inter_op_num_threads} "
            f"opt={so.graph_optimization_level.name} mode={so.execution_mode.name} "
            + " ".join(f"{k}={v}" for k, v in entries.items()))


def worker_like_session(path: Path, settings: SessionSettings, prepacked: bool) -> tuple[ort.InferenceSession, str]:
    """A session on the .onnx file with exactly the options the worker gives its session."""
    so = settings.options(prepacked=prepacked)
    entries = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
    if settings.disable_prepacking and not prepacked:
        entries["session.disable_prepacking"] = "1"
    # Read the entries back from the options object, so the text is what ORT was given.
    entries = {k: so.get_session_config_entry(k) for k in entries}
    return (ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]),
            session_options_text(so, entries))


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}" if seconds < 0.01 else f"{seconds * 1e3:.2f}ms"


def main() -> int:
    args = parse_args()
    settings = one_worker_settings(args.threads)
    rows, notes, checks = [], [], []
    with tempfile.TemporaryDirectory(prefix="shmcache-lat-") as tmp:
        tmpdir = Path(tmp)
        models = {"tiny": make_tiny(tmpdir / "tiny.onnx")}
        if not args.skip_large:
            models["mlp"] = make_mlp(tmpdir / "mlp.onnx", args.mib)
        daemon = Daemon(tmpdir / "s.sock", models, workers=1, threads=args.threads)
        try:
            daemon.wait_ready()
            status = daemon.status()
            segments = {m["name"]: m["segment"] for m in status["models"]}
            worker_pid = active_pids(status)[0]
            client = Client(daemon.sock, timeout=60.0)
            for name, path in models.items():
                with Segment.attach(segments[name]) as seg:
                    prepacked = seg.header.prepacked
                session, opts = worker_like_session(path, settings, prepacked)
                default = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                dso = default.get_session_options()
                notes.append(f"{name}: segment {'pre-packed' if prepacked else 'plain'}; "
                             f"in-process (worker options): {opts}")
                notes.append(f"{name}: in-process (ORT defaults): "
                             + session_options_text(dso, {}))
                if name == "tiny":
                    feed = {"x": np.ones((1, 16), np.float32)}
                    total = args.requests
                else:
                    width = session.get_inputs()[0].shape[1]
                    feed = {"x": np.random.default_rng(0).random((args.batch, width), np.float32)}
                    total = args.large_requests
                # Same answer both ways, or the comparison means nothing.
                np.testing.assert_allclose(client.run(name, None, feed)[0],
                                           session.run(None, feed)[0], rtol=1e-4, atol=1e-5)
                block = args.block if name == "tiny" else max(1, min(args.block, total // 6))
                t = measure({
                    "worker-opts": lambda: session.run(None, feed),
                    "daemon": lambda: client.run(name, None, feed),
                    "ort-defaults": lambda: default.run(None, feed),
                }, total, block)
                base, dae, dflt = t["worker-opts"], t["daemon"], t["ort-defaults"]
                b50, b99 = percentile(base, 50), percentile(base, 99)
                d50, d99 = percentile(dae, 50), percentile(dae, 99)
                label = "tiny (b=1)" if name == "tiny" else f"mlp {args.mib}MiB (b={args.batch})"
                target = "-"
                if name == "tiny":
                    met = (d50 - b50) * 1e6 <= TARGET_US
                    target = f"{'yes' if met else 'NO'} (<= {TARGET_US:.0f})"
                    checks.append(met)
                rows.append([label, len(base), us(b50), us(b99), us(d50), us(d99),
                             f"{(d50 - b50) * 1e6:.0f}", f"{(d99 - b99) * 1e6:.0f}",
                             f"{d50 / b50:.2f}x",
                             f"{us(percentile(dflt, 50))}/{us(percentile(dflt, 99))}", target])
                del session, default
            after = daemon.status()
            if active_pids(after) != [worker_pid]:
                notes.append(f"WARNING: worker changed during the run: {after['workers']}")
            client.close()
        finally:
            code = daemon.stop()
    leaked = shm_leftovers([daemon.sock])
    print(f"latency through 1 worker (--threads {args.threads}) vs session.run in-process, "
          f"interleaved blocks of {args.block} (MLP: smaller blocks); times in us unless marked")
    print(table(rows, ["model", "calls", "in-proc p50", "in-proc p99", "daemon p50",
                       "daemon p99", "overhead p50 us", "overhead p99 us", "ratio p50",
                       "ORT-defaults p50/p99", "target met"]))
    print()
    for n in notes:
        print(n)
    print(f"daemon exit status {code}; /dev/shm leftovers: {leaked or 'none'}")
    return 0 if all(checks) and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
