#!/usr/bin/env python3
"""Speed benchmark: the 256 MiB MLP at batch 32 through one worker versus an in-process default
InferenceSession, in the same run, in both segment modes.

Two daemons run side by side, each with one worker and ``--threads T``, each serving the MLP and
the tiny model (one 16x16 MatMul, batch 1): the default (pre-packed segment) and ``--no-prepack``
(plain shared weights, pre-packing off). In this process:

  * baseline: ``InferenceSession(mlp.onnx)`` with ORT's default options except
    ``intra_op_num_threads = T`` (the same thread count as the worker);
  * a second, identical default session (the noise floor: two identical sessions' ratio);
  * worker-options sessions (``one_worker_settings(T).options``: level all, spinning as the
    daemon allows it, pre-packing as the worker has it) for the tiny model's round trip and the bit-identity check.

The pre-packed daemon is called through two clients: the default one, which passes the
tensors through a memfd arena shared with its worker (shmcache/arena.py), and one with
``shared_memory=False``, which sends them over the socket (for comparison; no target).

Round-trip overhead = p50 of the tiny model through the daemon - p50 of the same model in
process with the worker's options, measured in the same run.

Target (issue): daemon p50 <= 1.05 x in-process default p50 + that overhead.
Also checked: the daemon's outputs are bit-identical to an in-process session with the worker's
options (pre-packed mode: pre-packing on; --no-prepack: session.disable_prepacking=1).

All sides are timed in alternating blocks (``--block`` calls each; MLP ``--mlp-block``), so load
from other processes on the host hits them alike (STYLE.md principle 12).

Usage: python benchmarks/speed.py [--mib 256] [--batch 32] [--threads 2] [--calls 120]
                                  [--tiny-calls 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (ServeDaemon, active_pids, make_mlp, make_tiny, measure,  # noqa: E402
                               one_worker_settings, percentile, shm_leftovers, table)
from shmcache import Client  # noqa: E402

RATIO_TARGET = 1.05
MODES = {"pre-packed": [], "no-prepack": ["--no-prepack"]}
# The pre-packed daemon once more through a client that sends every tensor over the socket
# (Client(shared_memory=False)): what the memfd arenas save, in the same run.
INLINE = "pre-packed, inline tensors"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, worker and in-process")
    p.add_argument("--calls", type=int, default=120, help="MLP calls per side")
    p.add_argument("--tiny-calls", type=int, default=2000, help="tiny calls per side")
    p.add_argument("--mlp-block", type=int, default=10)
    p.add_argument("--block", type=int, default=200)
    return p.parse_args()


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def main() -> int:
    args = parse_args()
    settings = one_worker_settings(args.threads)
    daemons: dict[str, ServeDaemon] = {}
    clients: dict[str, Client] = {}
    notes: list[str] = []
    identical: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="shmcache-speed-") as tmpdir:
        tmp = Path(tmpdir)
        paths = {"tiny": make_tiny(tmp / "tiny.onnx"), "mlp": make_mlp(tmp / "mlp.onnx", args.mib)}
        try:
            for mode, flags in MODES.items():
                state = tmp / f"state-{mode}"
                state.mkdir()
                daemons[mode] = ServeDaemon(tmp / f"{mode}.sock", paths, 1, state,
                                            threads=args.threads, extra=flags)
            for mode, d in daemons.items():
                d.wait_ready()
                status = d.status()
                log = d.log()
                fell_back = "pre-packing impossible" in log
                notes.append(f"{mode}: worker pid {status['workers'][0]['pid']}, segments "
                             + ", ".join(f"{m['name']} {m['size'] / 2**20:.1f} MiB"
                                         for m in status["models"])
                             + (" (FELL BACK to plain weights)" if fell_back else ""))
                notes += [f"{mode}: worker {line.split(': ', 1)[1]}" for line in log.splitlines()
                          if "mlp v" in line and "2 MiB pages" in line][:1]
                clients[mode] = Client(d.sock, timeout=120.0)
            clients[INLINE] = Client(daemons["pre-packed"].sock, timeout=120.0,
                                     shared_memory=False)

            # In-process sessions.
            dso = ort.SessionOptions()
            dso.intra_op_num_threads = args.threads
            default = ort.InferenceSession(str(paths["mlp"]), dso, providers=["CPUExecutionProvider"])
            # The same session again, its own pre-packed copy elsewhere in RAM: how far apart two
            # identical sessions run on this host is the noise floor the 5% target sits on.
            twin = ort.InferenceSession(str(paths["mlp"]), dso, providers=["CPUExecutionProvider"])
            same = {mode: ort.InferenceSession(str(paths["mlp"]),
                                               settings.options(prepacked=(mode == "pre-packed")),
                                               providers=["CPUExecutionProvider"])
                    for mode in MODES}
            tiny_same = ort.InferenceSession(str(paths["tiny"]), settings.options(prepacked=True),
                                             providers=["CPUExecutionProvider"])
            width = default.get_inputs()[0].shape[1]
            rng = np.random.default_rng(0)
            inputs = [rng.random((args.batch, width), np.float32) for _ in range(4)]

            # Bit identity: the daemon against the same-options in-process session, per mode.
            for mode in MODES:
                ok = True
                for x in inputs:
                    (got,), _ = clients[mode].run_with_version("mlp", None, {"x": x})
                    want = same[mode].run(None, {"x": x})[0]
                    ok &= got.dtype == want.dtype and got.shape == want.shape \
                        and got.tobytes() == want.tobytes()
                identical[mode] = ok
                d = np.abs(clients[mode].run("mlp", None, {"x": inputs[0]})[0]
                           - default.run(None, {"x": inputs[0]})[0]).max()
                notes.append(f"{mode}: max |daemon - in-process default| = {d:.3g} "
                             "(reference; the default session spins and pre-packs)")

            feed = {"x": inputs[0]}
            tiny_feed = {"x": np.ones((1, 16), np.float32)}
            compute: dict[str, list[float]] = {side: [] for side in clients}
            beyond: dict[str, list[float]] = {side: [] for side in clients}

            def through(c: Client, model: str, f: dict[str, np.ndarray],
                        ran: list[float] | None = None,
                        rest: list[float] | None = None) -> Callable[[], object]:
                def call() -> object:
                    t0 = time.perf_counter()
                    out = c.run(model, None, f)
                    elapsed = time.perf_counter() - t0
                    if ran is not None and rest is not None and c.last_compute_seconds is not None:
                        ran.append(c.last_compute_seconds)
                        rest.append(elapsed - c.last_compute_seconds)  # this call's, not p50s'
                    return out
                return call

            tiny = measure({
                "in-process": lambda: tiny_same.run(None, tiny_feed),
                **{mode: through(clients[mode], "tiny", tiny_feed) for mode in MODES},
            }, args.tiny_calls, args.block)
            mlp = measure({
                "default": lambda: default.run(None, feed),
                "default twin": lambda: twin.run(None, feed),
                "same-options pre-packed": lambda: same["pre-packed"].run(None, feed),
                **{side: through(c, "mlp", feed, compute[side], beyond[side])
                   for side, c in clients.items()},
            }, args.calls, args.mlp_block)
            for mode, d in daemons.items():
                if len(active_pids(d.status())) != 1:
                    notes.append(f"WARNING {mode}: workers changed: {d.status()['workers']}")
        finally:
            for c in clients.values():
                c.close()
            codes = {mode: d.stop() for mode, d in daemons.items()}
    leaked = shm_leftovers([d.sock for d in daemons.values()])

    t50 = percentile(tiny["in-process"], 50)
    overhead = {mode: percentile(tiny[mode], 50) - t50 for mode in MODES}
    base50 = percentile(mlp["default"], 50)
    rows = [["tiny b=1", "in-process, worker options", len(tiny["in-process"]), ms(t50),
             ms(percentile(tiny["in-process"], 99)), "-", "-", "-", "-"]]
    for mode in MODES:
        v = tiny[mode]
        rows.append(["tiny b=1", f"daemon {mode}", len(v), ms(percentile(v, 50)),
                     ms(percentile(v, 99)), f"{overhead[mode] * 1e6:.0f} us overhead", "-", "-",
                     "-"])
    checks = []
    for side in ["default", "default twin", "same-options pre-packed", *MODES, INLINE]:
        v = mlp[side]
        p50 = percentile(v, 50)
        label = {"default": "in-process default (baseline)",
                 "default twin": "in-process default, 2nd session",
                 "same-options pre-packed": "in-process, worker options",
                 INLINE: "daemon pre-packed, tensors inline"}.get(side, f"daemon {side}")
        target, met, ident = "-", "-", "-"
        if side in MODES:
            bound = RATIO_TARGET * base50 + overhead[side]
            ok = p50 <= bound
            met = "yes" if ok else "NO"
            target = f"<= {ms(bound)}"
            ident = "yes" if identical[side] else "NO"
            checks += [ok, identical[side]] if side == "pre-packed" else [identical[side]]
        rows.append([f"mlp {args.mib}MiB b={args.batch}", label, len(v), ms(p50),
                     ms(percentile(v, 99)), f"{p50 / base50:.3f}x", target, met, ident])
    print(f"speed, 1 worker, --threads {args.threads} (in-process: intra_op_num_threads="
          f"{args.threads}); interleaved blocks ({args.block} tiny / {args.mlp_block} MLP calls); "
          "times in ms")
    print(table(rows, ["model", "side", "calls", "p50 ms", "p99 ms", "vs baseline p50",
                       f"target ({RATIO_TARGET}x base + tiny overhead)", "met",
                       "bit-identical to same-options session"]))
    print()
    print("target applies to the default (pre-packed) mode; --no-prepack is shown for comparison "
          "(its bit-identity is against a session with session.disable_prepacking=1)")
    for side in [*MODES, INLINE]:
        if compute[side]:
            ran, rest = compute[side][-args.calls:], beyond[side][-args.calls:]  # no warm-up
            c50 = percentile(ran, 50)
            print(f"daemon {side}: the model ran {ms(c50)} ms in the worker (p50 of the replies' "
                  f"compute, {c50 / base50:.3f}x the baseline); each call's time beyond its "
                  f"compute (dispatch and moving {feed['x'].nbytes // 1024} KiB in and out): "
                  f"p50 {ms(percentile(rest, 50))} ms, p90 {ms(percentile(rest, 90))} ms")
    print("the 2nd default session is identical to the baseline (its own weights elsewhere in "
          "RAM): its ratio shows how far two identical sessions run apart on this host, in this "
          "run; the target is judged against the first all the same")
    for n in notes:
        print(n)
    print(f"daemon exit statuses {codes}; /dev/shm leftovers: {leaked or 'none'}")
    return 0 if all(checks) and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
