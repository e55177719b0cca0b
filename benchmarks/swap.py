#!/usr/bin/env python3
"""Swap benchmark: clients keep calling while publishes alternate between two weight sets.

A daemon (``--workers`` workers, ``--keep 1``, default pre-packed segments) serves an MLP built
from weight set A (``make_mlp_seeded`` seed 7 = ``make_mlp``); set B has the same graph and
signature, other weights (seed 11). ``--clients`` threads, each with its own blocking Client, call
the model without pause on a fixed pool of 8 inputs at batch 8, first for ``--steady`` seconds
(steady state), then while the main thread publishes ``--publishes`` times, alternating B, A, B...
through the control socket. After each publish returns, the main thread waits until every worker
(the standby too) reports the new version, ``SETTLE`` seconds more (the dropped version is
freed), then ``--gap`` seconds of steady state before the next publish; after the last,
``--steady`` seconds more.

The steady state the swaps are judged against is all those windows together, so that it
samples the same minutes as the swaps (STYLE.md principle 12). Two windows alone, one before and
one after the swaps (~500 calls each), gave a steady p99 anywhere from 71 to 156 ms between runs
of the same code (2026-11-28), and with it a swap/steady p99 ratio from 0.89x to 2.49x: the 3
clients of 2 workers fall into one queueing pattern for seconds at a time, and a 10 s window
sees one or two. Each kind of window is printed on its own too.

Checked, for every call:
  * it succeeded;
  * its output equals, bit for bit, the output of the weight set of the version it reports
    (references computed in this process once per input and weight set, with the worker's
    session options: ``SessionSettings(threads).options(prepacked=...)``; compared by BLAKE2b
    of the bytes, dtype and shape);
  * a call *sent* after publish k returned reports a version >= the one publish k created.

Prints, per publish, the daemon's timings (write = publish start to segment built, including
the durable copy; prepare = built to flip, every worker mapping the segment, creating and warming
a session; total = start to flip) and the publisher's own round trip; then p50/p99 latency of
calls sent during the swaps next to steady state.

Targets (issue): flip at most 1 s after the segment is written (prepare <= 1 s); p99 during swaps
<= 2 x steady-state p99.

Usage: python benchmarks/swap.py [--mib 256] [--publishes 20] [--workers 2] [--threads 1]
                                 [--clients 3] [--steady 10] [--gap 3] [--no-huge-pages]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (ServeDaemon, make_mlp_seeded, percentile, shm_leftovers,  # noqa: E402
                               table)
from shmcache import Client  # noqa: E402
from worker.runtime import SessionSettings  # noqa: E402

FLIP_TARGET_S = 1.0
P99_TARGET = 2.0
SETTLE = 1.0  # seconds after every worker has the new version before a steady window
CAUGHT_UP_TIMEOUT = 60.0
POOL = 8
BATCH = 8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--publishes", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--steady", type=float, default=10.0,
                   help="seconds of steady state before the first publish and after the last")
    p.add_argument("--gap", type=float, default=3.0,
                   help="seconds of steady state between publishes (once every worker caught up)")
    p.add_argument("--no-prepack", action="store_true", help="serve plain segments")
    p.add_argument("--no-huge-pages", action="store_true",
                   help="the daemon's --no-huge-pages (no huge pages for the prepare's re-packs)")
    p.add_argument("--no-shared-memory", action="store_true",
                   help="clients send tensors inline (Client(shared_memory=False))")
    return p.parse_args()


@dataclass
class Call:
    sent: float
    done: float
    index: int
    version: int | None = None
    digest: bytes = b""
    error: str = ""


def digest(a: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def client_loop(sock: Path, inputs: list[np.ndarray], stop: threading.Event, out: list[Call],
                offset: int, shared_memory: bool = True) -> None:
    i = offset
    client = Client(sock, timeout=120.0, shared_memory=shared_memory)
    try:
        while not stop.is_set():
            k = i % len(inputs)
            i += 1
            t0 = time.perf_counter()
            try:
                outputs, version = client.run_with_version("mlp", None, {"x": inputs[k]})
                out.append(Call(t0, time.perf_counter(), k, version, digest(outputs[0])))
            except Exception as exc:  # every failure is a finding: record it, reconnect
                out.append(Call(t0, time.perf_counter(), k, error=f"{type(exc).__name__}: {exc}"))
                client.close()
                client = Client(sock, timeout=120.0, shared_memory=shared_memory)
    finally:
        client.close()


def phase_windows(publishes: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Each publish's write and prepare windows on our clock: start -> start + write, then on
    to the publisher's return (the flip plus one reply's transit)."""
    out: dict[str, list[tuple[float, float]]] = {"write": [], "prepare": []}
    for p in publishes:
        if p["reply"]:
            built = p["start"] + p["reply"]["timings"]["write"]
            out["write"].append((p["start"], built))
            out["prepare"].append((built, p["returned"]))
    return out


def wait_caught_up(daemon: ServeDaemon, version: int) -> None:
    """Until every worker, the standby included, serves ``version``: a standby catches up in
    the background after the flip, and its session creation is not steady state."""
    deadline = time.perf_counter() + CAUGHT_UP_TIMEOUT
    while time.perf_counter() < deadline:
        workers = daemon.status()["workers"]
        if all(w["versions"].get("mlp") == version for w in workers):
            return
        time.sleep(0.1)
    print(f"warning: not every worker reached v{version} in {CAUGHT_UP_TIMEOUT:.0f} s",
          file=sys.stderr)


def steady_window(daemon: ServeDaemon, version: int, seconds: float) -> tuple[float, float]:
    wait_caught_up(daemon, version)
    time.sleep(SETTLE)
    start = time.perf_counter()
    time.sleep(seconds)
    return start, time.perf_counter()


def references(path: Path, options: ort.SessionOptions, inputs: list[np.ndarray]) -> list[bytes]:
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [digest(s.run(None, {"x": x})[0]) for x in inputs]


def main() -> int:
    args = parse_args()
    mode_flags = ["--no-prepack"] if args.no_prepack else []
    mode_flags += ["--no-huge-pages"] if args.no_huge_pages else []
    with tempfile.TemporaryDirectory(prefix="shmcache-swap-") as tmpdir:
        tmp = Path(tmpdir)
        files = {"A": make_mlp_seeded(tmp / "a.onnx", args.mib, seed=7),
                 "B": make_mlp_seeded(tmp / "b.onnx", args.mib, seed=11)}
        width = int(round((args.mib * 2**20 / 4 / 4) ** 0.5))
        rng = np.random.default_rng(0)
        inputs = [rng.random((BATCH, width), np.float32) for _ in range(POOL)]
        so = SessionSettings(intra_op_threads=args.threads).options(prepacked=not args.no_prepack)
        refs = {k: references(p, so, inputs) for k, p in files.items()}
        assert all(a != b for a, b in zip(refs["A"], refs["B"])), "A and B give the same outputs"

        state = tmp / "state"
        state.mkdir()
        daemon = ServeDaemon(tmp / "s.sock", {"mlp": files["A"]}, args.workers, state,
                             threads=args.threads, extra=["--keep", "1", *mode_flags])
        calls: list[list[Call]] = [[] for _ in range(args.clients)]
        publishes: list[dict] = []
        stop = threading.Event()
        threads: list[threading.Thread] = []
        try:
            daemon.wait_ready()
            status = daemon.status()
            first_version = status["models"][0]["version"]
            threads = [threading.Thread(target=client_loop,
                                        args=(daemon.sock, inputs, stop, calls[i], i * 3,
                                              not args.no_shared_memory))
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            steady_start = time.perf_counter()
            time.sleep(args.steady)
            steady_end = time.perf_counter()
            gaps: list[tuple[float, float]] = []
            version = first_version
            with Client(daemon.ctl, timeout=900.0) as ctl:
                for k in range(1, args.publishes + 1):
                    which = "B" if k % 2 else "A"
                    t0 = time.perf_counter()
                    try:
                        reply = ctl.request("publish", model="mlp", path=str(files[which]))
                        error = ""
                    except Exception as exc:
                        reply, error = {}, f"{type(exc).__name__}: {exc}"
                    publishes.append({"k": k, "file": which, "start": t0,
                                      "returned": time.perf_counter(), "reply": reply,
                                      "error": error})
                    print(f"publish {k}/{args.publishes} {which}: "
                          f"{reply.get('version', error)} {reply.get('timings', '')}",
                          file=sys.stderr, flush=True)
                    version = reply.get("version", version)
                    if k < args.publishes and args.gap > 0:
                        gaps.append(steady_window(daemon, version, args.gap))
            # calls sent after the last return: the version check covers them too
            after_start, after_end = steady_window(daemon, version, args.steady)
            stop.set()
            for t in threads:
                t.join()
            final = daemon.status()
            log = daemon.log()
        finally:
            stop.set()
            for t in threads:
                t.join()
            code = daemon.stop()
    leaked = shm_leftovers([daemon.sock])

    # version -> weight set, from the replies; the expected pattern is v odd = A, even = B.
    weights = {first_version: "A"}
    for p in publishes:
        if p["reply"]:
            weights[p["reply"]["version"]] = p["file"]
    parity_ok = all(w == ("A" if v % 2 else "B") for v, w in weights.items())

    everything = [c for cs in calls for c in cs]
    failed = [c for c in everything if c.error]
    wrong = [c for c in everything if not c.error
             and (c.version not in weights or refs[weights[c.version]][c.index] != c.digest)]
    stale = []
    for p in publishes:
        if not p["reply"]:
            continue
        stale += [(p["k"], c) for c in everything if not c.error and c.sent > p["returned"]
                  and c.version < p["reply"]["version"]]
    def sent_in(windows: list[tuple[float, float]]) -> list[float]:
        return [c.done - c.sent for c in everything if any(a <= c.sent < b for a, b in windows)]

    before = sent_in([(steady_start, steady_end)])
    between = sent_in(gaps)
    after = sent_in([(after_start, after_end)])
    steady = before + between + after
    swapping = sent_in([(p["start"], p["returned"]) for p in publishes])

    rows = []
    for p in publishes:
        r, t = p["reply"], p["reply"].get("timings", {})
        seen = p["returned"] - p["start"]
        rows.append([p["k"], p["file"], r.get("version", "-"), r.get("previous", "-"),
                     f"{t.get('write', float('nan')):.3f}", f"{t.get('prepare', float('nan')):.3f}",
                     f"{t.get('total', float('nan')):.3f}", f"{seen:.3f}",
                     f"{seen - t.get('total', float('nan')):.3f}", p["error"] or "ok"])
    prepare = [p["reply"]["timings"]["prepare"] for p in publishes if p["reply"]]
    write = [p["reply"]["timings"]["write"] for p in publishes if p["reply"]]
    total = [p["reply"]["timings"]["total"] for p in publishes if p["reply"]]
    mode = "plain (--no-prepack)" if args.no_prepack else "pre-packed"
    print(f"swap: {args.mib} MiB MLP, {mode} segments, {args.workers} workers x {args.threads} "
          f"thread(s), --keep 1, {args.clients} client threads, batch {BATCH}, "
          f"tensors {'inline' if args.no_shared_memory else 'through arenas'}, "
          f"huge pages for re-packs {'off' if args.no_huge_pages else 'on'}, "
          f"{args.publishes} publishes alternating B, A, ...; seconds")
    print("write = publish start -> segment built (incl. durable copy); prepare = built -> flip "
          "(workers map + create + warm sessions); total = start -> flip; "
          "reply-after-flip = publisher's round trip - total")
    print(table(rows, ["k", "file", "version", "previous", "write", "prepare", "total (to flip)",
                       "publisher round trip", "reply after flip", "result"]))
    if total:
        print(table([[name, f"{percentile(v, 50):.3f}", f"{max(v):.3f}"]
                     for name, v in (("write", write), ("prepare (built -> flip)", prepare),
                                     ("total (start -> flip)", total))],
                    ["phase", "p50 s", "max s"]))
    print()
    phases = phase_windows(publishes)
    in_phase = {name: sent_in(phases[name]) for name in phases}
    lat = [["steady state (all windows below: the baseline)", len(steady)],
           [f"  {args.steady:.0f} s before the first publish", len(before)],
           [f"  {len(gaps)} x {args.gap:.0f} s between publishes", len(between)],
           [f"  {args.steady:.0f} s after the last publish", len(after)],
           ["during swaps (each publish's start -> return)", len(swapping)],
           ["  of which sent while a segment was written", len(in_phase["write"])],
           ["  of which sent while workers prepared", len(in_phase["prepare"])]]
    for row, v in zip(lat, (steady, before, between, after, swapping, in_phase["write"],
                            in_phase["prepare"])):
        row += [f"{percentile(v, 50) * 1e3:.2f}", f"{percentile(v, 99) * 1e3:.2f}",
                f"{max(v) * 1e3:.2f}"] if v else ["-", "-", "-"]
    ratio99 = percentile(swapping, 99) / percentile(steady, 99) if steady and swapping else float("nan")
    ratio50 = percentile(swapping, 50) / percentile(steady, 50) if steady and swapping else float("nan")
    print(table(lat, ["window", "calls", "p50 ms", "p99 ms", "max ms"]))
    each = ", ".join(f"{name} alone {percentile(swapping, 99) / percentile(v, 99):.2f}x"
                     for name, v in (("before", before), ("between", between), ("after", after))
                     if v and swapping)
    print(f"ratio swap/steady: p50 {ratio50:.2f}x, p99 {ratio99:.2f}x (p99 against {each})")
    print()
    versions = sorted({c.version for c in everything if c.version is not None})
    checks = {
        "every publish succeeded": len(prepare) == args.publishes,
        "every call succeeded": not failed,
        "outputs bit-identical to the reported version's weights": not wrong,
        "no call sent after a publish returned answered by an older version": not stale,
        "versions follow v odd = A, v even = B": parity_ok,
        f"flip <= {FLIP_TARGET_S:.0f} s after the segment is written (max prepare)":
            bool(prepare) and max(prepare) <= FLIP_TARGET_S,
        f"p99 during swaps <= {P99_TARGET:.0f}x steady state": ratio99 <= P99_TARGET,
    }
    for name, ok in checks.items():
        print(f"{'met    ' if ok else 'NOT met'}  {name}")
    print(f"calls: {len(everything)} ({len(failed)} failed, {len(wrong)} wrong outputs, "
          f"{len(stale)} stale); versions seen in replies: {versions}")
    for c in failed[:5]:
        print(f"  failed call at +{c.sent - steady_start:.3f}s: {c.error}")
    for c in wrong[:5]:
        print(f"  wrong output at +{c.sent - steady_start:.3f}s: version {c.version} "
              f"input {c.index} (expected weights {weights.get(c.version, '?')})")
    for k, c in stale[:5]:
        print(f"  stale: sent {c.sent - publishes[k - 1]['returned']:.4f}s after publish {k} "
              f"returned, answered by version {c.version}")
    if "pre-packing impossible" in log:
        print("daemon fell back to plain weights at least once: "
              + next(line for line in log.splitlines() if "pre-packing impossible" in line))
    print(f"final models: {final['models']}")
    print(f"daemon exit status {code}; /dev/shm leftovers: {leaked or 'none'}")
    return 0 if all(checks.values()) and not leaked and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
