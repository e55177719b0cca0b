#!/usr/bin/env python3
"""Memory benchmark: what each worker keeps privately and what the whole daemon costs, next to
naive workers that each load their own session, all in the same run.

For a 256 MiB MLP (4 x 4096x4096 float32, batch 32) and a Conv model (3x3 convs, channels
3->64->256->512->512 on 1x3x32x32, batch 1), with 1, 2 and 4 workers, in both segment modes
(default: pre-packed; ``--no-prepack``: plain shared weights, pre-packing off), prints per worker
USS and PSS after the worker's warm-up and 100 inferences each (at rest: AT_REST seconds after
the last call, once an idle worker has returned its working memory; see worker/heap.py), the
segment's allocated pages in /dev/shm, and the same figures for N naive processes
(``InferenceSession(file.onnx)`` with ORT's default options, 100 inferences), every process of a
configuration alive while measured.

Baselines, measured in the same run and the same way:

* empty worker = a worker of a daemon serving only the tiny model (one 16x16 MatMul), same mode,
  same worker count, as many warm standbys as the model's daemon keeps by default (one where
  the segment holds pre-packed blobs, as the MLP's; none for the Conv model or the tiny one,
  whose kernels pre-pack nothing, so the tiny daemon is given ``--standby`` to match); empty
  naive process = a naive process on the tiny model.
* private memory attributable to the model = worker's private memory - empty worker's (means
  over workers), where private memory = USS without the file pages only this process maps
  (``lone file pages``): those are page cache (ONNX Runtime's and Python's code, the segment),
  which the kernel holds once whoever maps them and which stays when the process exits, and a
  clean page is "private" there only because no other process happens to map it right now.
  Which code pages one worker alone maps is chance: in 9 pairs of Conv and empty daemons with
  2 workers (pre-packed, one build, 2026-11-29) a worker alone mapped 0-560 KiB of code, so
  USS - empty USS went from -444 to +722 KiB (the Conv target is 289 KiB) while private -
  empty private went from +96 to +322 KiB. Pages a write copied out of a file mapping
  (relocations, a segment page written) are anonymous and do count. The raw USS difference is
  printed too ("USS attributable").
* daemon total = every process of the daemon (supervisor + workers + the default warm standby
  if any, which the empty daemon has too), each page once:
  sum(PSS outside /dev/shm mappings) + the segments' allocated pages (st_blocks * 512). Summed
  over processes, the PSS of the segment mappings is the count of distinct segment pages
  mapped, so this formula neither misses unmapped segment pages nor counts mapped ones twice.
  The issue's literal "sum of PSS plus segment pages" counts mapped segment pages twice; it is
  printed too, for reference.

Targets (issue): per-worker private memory attributable to the model <= 2% of the model size;
daemon total with 4 workers <= 1.1 x model size + the empty daemon's total with 4 workers, or
<= 2.1 x in pre-packed mode, because ORT reads the original weights at every session creation to
re-pack them and compare with the stored blobs (NOTES-prepack.md, answer 4), so a pre-packed
segment keeps originals + blobs (~2 x the model).

Trap (NOTES-prepack.md, answer 2): a page mapped by one process only counts in its USS, so with
one worker the segment pages show up in that worker's USS unless the supervisor maps them too;
private memory leaves them out with the other lone file pages.

Usage: python benchmarks/memory.py [--mib 256] [--workers 1 2 4] [--inferences 100]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (ServeDaemon, active_pids, make_conv, make_mlp,  # noqa: E402
                               make_tiny, shm_leftovers, shm_pages, smaps_memory, table)
from shmcache import Client  # noqa: E402

MiB = 2**20
PRIVATE_TARGET = 0.02
TOTAL_TARGET = 1.1
TOTAL_TARGET_PREPACKED = 2.1
PREPACK_REASON = ("pre-packed segment = optimized graph + original weights + pre-packed blobs: "
                  "ORT maps and reads every original at each session creation to re-pack it and "
                  "adopt the stored blob only if the hashes match (NOTES-prepack.md answer 4; "
                  "holes there give wrong outputs), so both forms stay in /dev/shm")
# Workers are measured at rest: an idle worker returns its working memory to the OS after
# worker.heap.IDLE_SECONDS (checked on each 1 s heartbeat); the USS just after the last call is
# printed too.
AT_REST = 3.0
# ...and no younger than MIN_AGE: ONNX Runtime starts a short burst of threads about 10 s into
# a worker's life (seen with strace), whose exited stacks glibc keeps cached (~20 KiB private
# each). A quick tiny-model daemon was measured ~4 s in, before it, and a Conv daemon after,
# which put ~0.1 MiB per worker on the Conv model: 2.4 % of it (target 2 %) where the same
# workers at the same age differ by 1.1 % (helper probe, 2026-11-28, 4 daemons each).
MIN_AGE = 15.0
MODES = {"pre-packed": [], "no-prepack": ["--no-prepack"]}

NAIVE = r"""
import sys, numpy as np, onnxruntime as ort
path, n, shape = sys.argv[1], int(sys.argv[2]), [int(d) for d in sys.argv[3].split(",")]
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).random(shape, np.float32)
for _ in range(n):
    s.run(None, {s.get_inputs()[0].name: x})
print("ready", flush=True)
sys.stdin.readline()
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="MLP size")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--inferences", type=int, default=100, help="per worker / naive process")
    p.add_argument("--skip-conv", action="store_true")
    return p.parse_args()


def feed_shape(name: str, mlp_width: int) -> list[int]:
    return {"tiny": [1, 16], "mlp": [32, mlp_width], "conv": [1, 3, 32, 32]}[name]


def drive_workers(daemon: ServeDaemon, model: str, shape: list[int], n: int) -> list[str]:
    """Send inferences until every active worker has served at least ``n``.

    The kernel hands each new connection to one worker, whichever accepts first; connections
    opened one after the other mostly land on the same idle worker. So each round opens one
    connection per worker at once, from threads, each sending until its worker has ``n``."""
    x = np.random.default_rng(0).random(shape, np.float32)
    notes: list[str] = []

    def served() -> dict[int, int]:
        return {w["pid"]: w["served"] for w in daemon.status()["workers"] if w["role"] == "active"}

    def feed(done: threading.Event) -> None:
        with Client(daemon.sock, timeout=120.0) as client:
            for _ in range(n):
                if done.is_set():
                    return
                client.run(model, None, {"x": x})

    for _ in range(20):
        counts = served()
        if all(c >= n for c in counts.values()):
            return notes
        done = threading.Event()
        threads = [threading.Thread(target=feed, args=(done,)) for _ in counts]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if all(c >= n for c in served().values()):
                done.set()
            time.sleep(0.2)
        for t in threads:
            t.join()
    notes.append(f"{model}: not every worker reached {n} inferences: {served()}")
    return notes


def measure_daemon(tmp: Path, tag: str, model: str, path: Path, workers: int, mode: list[str],
                   shape: list[int], n: int, cache: Path, sockets: list[Path]) -> dict:
    state = tmp / f"state-{tag}"
    state.mkdir()
    (state / "cache").symlink_to(cache)  # one pre-pack per model for the whole run
    sock = tmp / f"{tag}.sock"
    sockets.append(sock)
    daemon = ServeDaemon(sock, {model: path}, workers, state, extra=mode)
    try:
        daemon.wait_ready()  # standby included: it boots after the active workers
        notes = drive_workers(daemon, model, shape, n)
        status = daemon.status()
        active = active_pids(status)
        busy = [smaps_memory(pid) for pid in active]
        youngest = min(time.time() - psutil.Process(pid).create_time() for pid in active)
        time.sleep(max(AT_REST, MIN_AGE - youngest))
        per_worker = [smaps_memory(pid) for pid in active]
        spares = [smaps_memory(w["pid"]) for w in status["workers"] if w["pid"] not in active]
        everyone = per_worker + spares + [smaps_memory(daemon.proc.pid)]
        segments = [m["segment"] for m in status["models"]]
        seg_pages = sum(shm_pages(s) for s in segments)
        seg_size = sum(os.stat(f"/dev/shm/{s}").st_size for s in segments)
        log = daemon.log()
        if any(m["swap"] for m in busy + everyone):
            notes.append(f"{tag}: processes had pages in swap; their USS and private memory "
                         "are not comparable")
    finally:
        code = daemon.stop()
    if code != 0:
        notes.append(f"{tag}: daemon exit status {code}")
    if "pre-packing impossible" in log:
        notes.append(f"{tag}: daemon fell back to plain weights: "
                     + next(line for line in log.splitlines() if "pre-packing impossible" in line))
    return {
        "uss": np.mean([m["uss"] for m in per_worker]),
        "pss": np.mean([m["pss"] for m in per_worker]),
        "private": np.mean([private(m) for m in per_worker]),
        "private_busy": np.mean([private(m) for m in busy]),
        "lone_files": np.mean([m["file_lone"] for m in per_worker]),
        "total": sum(m["pss"] - m["seg_pss"] for m in everyone) + seg_pages,
        "literal": sum(m["pss"] for m in everyone) + seg_pages,
        "code": sum(m["code_pss"] for m in everyone),
        "seg_pages": seg_pages, "seg_size": seg_size, "notes": notes, "spares": len(spares),
        "spare_uss_out": sum(private_outside_segments(m) for m in spares),
    }


def private(m: dict[str, int]) -> int:
    """Memory the process alone holds and gives back when it exits: USS without lone file
    pages, the page-cache pages (code, segment) in USS only because no other process maps
    them at the moment. Copies written out of them are anonymous, the process's own: they
    stay."""
    return m["uss"] - m["file_lone"]


def private_outside_segments(m: dict[str, int]) -> int:
    """USS without the segments' file pages, which /dev/shm holds whoever maps them (and the
    total counts once); with any page a write copied out of a segment mapping, which is the
    worker's own."""
    return m["uss"] - m["seg_uss"] + m["seg_anon"]


def measure_naive(path: Path, workers: int, shape: list[int], n: int) -> dict:
    procs = [subprocess.Popen([sys.executable, "-c", NAIVE, str(path), str(n),
                               ",".join(map(str, shape))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(workers)]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"naive process failed (exit {p.wait()})")
        mem = [smaps_memory(p.pid) for p in procs]  # all alive now
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait()
    return {"uss": np.mean([m["uss"] for m in mem]), "pss": np.mean([m["pss"] for m in mem]),
            "private": np.mean([private(m) for m in mem]),
            "private_busy": np.mean([private(m) for m in mem]),
            "lone_files": np.mean([m["file_lone"] for m in mem]),
            "total": sum(m["pss"] for m in mem), "literal": sum(m["pss"] for m in mem),
            "code": sum(m["code_pss"] for m in mem), "seg_pages": 0, "seg_size": 0, "notes": [],
            "spares": 0, "spare_uss_out": 0}


def mib(b: float) -> str:
    return f"{b / MiB:.1f}"


def main() -> int:
    args = parse_args()
    names = ["mlp"] + ([] if args.skip_conv else ["conv"])
    results: dict[tuple[str, str, int], dict] = {}
    baselines = {("naive", name, n): ("naive", "tiny", n) for name in names for n in args.workers}
    sockets: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="shmcache-mem-") as tmpdir:
        tmp = Path(tmpdir)
        paths = {"tiny": make_tiny(tmp / "tiny.onnx"), "mlp": make_mlp(tmp / "mlp.onnx", args.mib)}
        if "conv" in names:
            paths["conv"] = make_conv(tmp / "conv.onnx")
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        width = int(round((args.mib * MiB / 4 / 4) ** 0.5))
        cache = tmp / "prepack-cache"
        cache.mkdir()
        # Interleaved: for each worker count, every mode's baseline and models, then naive.
        for workers in args.workers:
            for mode, flags in MODES.items():
                for name in names:
                    tag = f"{name}-{mode}-{workers}"
                    print(f"daemon {tag} ...", file=sys.stderr, flush=True)
                    results[(mode, name, workers)] = r = measure_daemon(
                        tmp, tag, name, paths[name], workers, flags,
                        feed_shape(name, width), args.inferences, cache, sockets)
                    empty = (mode, f"tiny+{r['spares']}", workers)  # same processes
                    baselines[(mode, name, workers)] = empty
                    if empty not in results:
                        tag = f"tiny-{r['spares']}-{mode}-{workers}"
                        print(f"daemon {tag} ...", file=sys.stderr, flush=True)
                        results[empty] = measure_daemon(
                            tmp, tag, "tiny", paths["tiny"], workers,
                            flags + ["--standby", str(r["spares"])], feed_shape("tiny", width),
                            args.inferences, cache, sockets)
            for name in ["tiny"] + names:
                print(f"naive {name}-{workers} ...", file=sys.stderr, flush=True)
                results[("naive", name, workers)] = measure_naive(
                    paths[name], workers, feed_shape(name, width), args.inferences)
    leaked = shm_leftovers(sockets)

    rows, checks, notes = [], [], []
    for name in names:
        for kind in list(MODES) + ["naive"]:
            for workers in args.workers:
                r, base = results[(kind, name, workers)], results[baselines[(kind, name, workers)]]
                attributable = r["private"] - base["private"]
                limit = PRIVATE_TARGET * sizes[name]
                met = "-"
                if kind != "naive":
                    ok = attributable <= limit
                    met = "yes" if ok else "NO"
                    checks.append(ok)
                    notes += r["notes"]
                rows.append([name, kind, workers, mib(r["uss"]), mib(r["pss"]),
                             mib(r["lone_files"]), mib(r["private"]), mib(base["private"]),
                             mib(attributable), f"{attributable / sizes[name] * 100:.1f}%", met,
                             mib(r["uss"] - base["uss"]),
                             mib(r["private_busy"] - base["private_busy"]),
                             mib(r["seg_size"]), mib(r["seg_pages"]), mib(r["total"]),
                             mib(r["literal"])])
    print(f"memory per worker after warm-up + {args.inferences} inferences each, all processes "
          f"alive, measured {AT_REST:.0f} s after the last call (at rest) and at least "
          f"{MIN_AGE:.0f} s after each worker started; MiB. MLP {mib(sizes['mlp'])} MiB file"
          + (f", Conv {mib(sizes['conv'])} MiB file" if "conv" in names else "") + ".")
    print("empty = same mode and worker count serving only the tiny model (naive: a naive process "
          "on the tiny model); lone file pages = file pages (code, segment) no other "
          "process maps, in USS but page cache; private = USS - lone file pages; attributable = "
          "private - empty private; USS attributable = USS - empty USS, for reference; "
          "total = sum(PSS outside /dev/shm) "
          "over supervisor + workers + segment pages (each page once); literal = sum(PSS) + "
          "segment pages (mapped segment pages twice); just after = attributable measured "
          "right after the last call, before idle workers return their working memory")
    print(table(rows, ["model", "mode", "N", "USS", "PSS", "lone file pages", "private",
                       "empty private", "attributable", "of model", "<=2% met",
                       "USS attributable", "just after", "segment size", "segment pages", "total",
                       "literal"]))
    print()
    if 4 in args.workers:
        trows = []
        for name in names:
            for kind in list(MODES) + ["naive"]:
                r, base = results[(kind, name, 4)], results[baselines[(kind, name, 4)]]
                # 2.1x only where the segment really holds both forms (Conv's fp32 kernels
                # have no pre-packs in ORT 1.32: its pre-packed segment is one copy).
                two_forms = kind == "pre-packed" and r["seg_size"] > 1.5 * sizes[name]
                factor = TOTAL_TARGET_PREPACKED if two_forms else TOTAL_TARGET
                bound = factor * sizes[name] + base["total"]
                ok = r["total"] <= bound
                if kind != "naive":
                    checks.append(ok)
                code = r["code"] - base["code"]
                trows.append([name, kind, r["spares"], mib(r["spare_uss_out"]),
                              mib(r["total"]), mib(base["total"]),
                              f"{(r['total'] - base['total']) / sizes[name]:.2f}x",
                              f"{factor}x + empty = {mib(bound)}",
                              ("yes" if ok else "NO") if kind != "naive" else "(reference)",
                              mib(code), f"{(r['total'] - base['total'] - code) / sizes[name]:.2f}x"])
        print("daemon total with 4 workers vs target (MiB; x = (total - empty total) / model size)")
        print(table(trows, ["model", "mode", "standbys", "standby USS outside shm", "total",
                            "empty total", "model cost", "target", "met",
                            "of which ORT code", "model cost without it"]))
        print("ORT code = PSS of ONNX Runtime's library pages, summed over the processes, minus the "
              "empty daemon's: the kernels this model runs and the tiny model does not. Pages of "
              "a shared library count once however many workers run them, and do not grow with "
              "the model's weights; judged with them all the same")
        print("totals include the daemon's default warm standbys (one where the segment holds "
              "pre-packed blobs, else none), and the empty daemon is given as many")
        print(f"2.1x for pre-packed segments that hold two forms, because: {PREPACK_REASON}")
    for n in notes:
        print(n)
    print("per-worker target judged on attributable = private - empty private: the file pages "
          "a process alone maps are page cache, counted in USS by chance (which code pages the "
          "other workers happen to map; with one worker, the segment too), held once by the "
          "kernel and kept when the process exits; the segment's pages are in the 'segment "
          "pages' column; any page a write copied out of a file mapping still counts")
    print(f"/dev/shm leftovers: {leaked or 'none'}")
    return 0 if all(checks) and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
