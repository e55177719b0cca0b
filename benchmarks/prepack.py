"""Pre-packed weights in a /dev/shm segment: memory per worker, latency, and the holes test.

    PYTHONPATH=. python benchmarks/prepack.py [--model mlp|conv] [--level extended|all] [--procs 2 4]

Builds the model in a temp dir, pre-packs it with ``python -m worker.prepack``, writes segments
``/dev/shm/shmcache-exp-<pid>-*`` (4 KiB header of random bytes, entries in reverse order) and
removes them and the temp dir at exit. Prints three tables: per-process USS/PSS growth for N concurrent worker
processes, interleaved p50 latency against the default in-process session, and what happens when
the original tensors are left as holes. Results and their reading: benchmarks/NOTES-prepack.md.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.prepack import PAGE, read_external_entries, relocate_external_data

HEADER = 4096
ROOT = Path(__file__).resolve().parents[1]


def make_model(kind: str, path: Path) -> list[int]:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    if kind == "mlp":  # 4 x 4096x4096 f32 = 256 MiB
        d = 4096
        for i in range(4):
            w = (rng.standard_normal((d, d), dtype=np.float32) * np.float32(d**-0.5))
            inits += [numpy_helper.from_array(w, f"W{i}"),
                      numpy_helper.from_array(np.full(d, 0.01, np.float32), f"b{i}")]
            nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                      helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]
            x = f"h{i}"
        shape_in, shape_out = [32, d], [32, d]
    else:  # 3x3 convs 3→64→256→512→512 on 32x32, 14.1 MiB
        ch = (3, 64, 256, 512, 512)
        for i in range(len(ch) - 1):
            w = rng.standard_normal((ch[i + 1], ch[i], 3, 3), dtype=np.float32) * np.float32(0.05)
            inits += [numpy_helper.from_array(w, f"W{i}"),
                      numpy_helper.from_array(np.full(ch[i + 1], 0.01, np.float32), f"b{i}")]
            nodes += [helper.make_node("Conv", [x, f"W{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", [f"c{i}"], [f"h{i}"])]
            x = f"h{i}"
        shape_in, shape_out = [1, 3, 32, 32], [1, ch[-1], 32, 32]
    g = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape_out)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return shape_in  # fmt: skip


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def write_prepacked_segment(graph: Path, data: Path, seg: Path, holes: bool = False) -> bytes:
    model = onnx.load(str(graph), load_external_data=False)
    entries = read_external_entries(model)
    packed = {e.tensor for e in entries if e.kind == "prepacked"}
    offsets, pos = {}, HEADER
    fd = os.open(seg, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.pwrite(fd, os.urandom(HEADER), 0)
        with data.open("rb") as src:
            for e in reversed(entries):
                pos = _align(pos, e.alignment)
                offsets[e.id] = pos
                if not (holes and e.kind == "tensor" and e.tensor in packed):
                    src.seek(e.offset)
                    os.pwrite(fd, src.read(e.length), pos)
                pos += e.length
        os.ftruncate(fd, _align(pos, PAGE))
    finally:
        os.close(fd)
    relocate_external_data(model, seg.name, offsets)
    return model.SerializeToString()


def write_plain_segment(model_path: Path, seg: Path) -> tuple[bytes, dict[str, Any]]:
    """Original graph, every initializer external in the segment (the no-pre-pack fallback)."""
    model = onnx.load(str(model_path))
    pos, layout = HEADER, {}
    fd = os.open(seg, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.pwrite(fd, os.urandom(HEADER), 0)
        for t in model.graph.initializer:
            raw = numpy_helper.to_array(t).tobytes()
            pos = _align(pos, PAGE if len(raw) >= PAGE else 64)
            os.pwrite(fd, raw, pos)
            layout[t.name] = (pos, list(t.dims))
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", seg.name), ("offset", str(pos)), ("length", str(len(raw)))):
                kv = t.external_data.add()
                kv.key, kv.value = k, v
            pos += len(raw)
        os.ftruncate(fd, _align(pos, PAGE))
    finally:
        os.close(fd)
    return model.SerializeToString(), layout


# --- one measured worker process ------------------------------------------------------------------


def make_session(cfg: dict[str, Any], keep: list[Any]) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[cfg["level"]]  # fmt: skip
    for k, v in cfg.get("config", {}).items():
        so.add_session_config_entry(k, v)
    if cfg.get("folder"):
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", cfg["folder"])
    if cfg.get("layout"):  # add_initializer over read-only views of our own mapping
        fd = os.open(cfg["shm"], os.O_RDONLY)
        mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        os.close(fd)
        for name, (off, dims) in cfg["layout"].items():
            a = np.frombuffer(mm, np.float32, int(np.prod(dims)), off).reshape(dims)
            v = ort.OrtValue.ortvalue_from_numpy(a)
            keep += [mm, a, v]
            so.add_initializer(name, v)
    model: Any = Path(cfg["model"]).read_bytes() if cfg.get("bytes") else cfg["model"]
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def child(cfg: dict[str, Any]) -> None:
    import onnxruntime  # noqa: F401  imported before the baseline: the library is not growth
    import psutil

    proc = psutil.Process()
    x = np.random.default_rng(1).standard_normal(cfg["xshape"]).astype(np.float32)
    base = proc.memory_full_info()
    keep: list[Any] = []
    t0 = time.perf_counter()
    sess = make_session(cfg, keep)
    create = time.perf_counter() - t0
    for _ in range(cfg["n"]):
        y = sess.run(None, {"x": x})[0]
    print("READY", flush=True)
    sys.stdin.readline()  # measure only when every sibling is alive and done
    end = proc.memory_full_info()
    print("RESULT " + json.dumps({"uss": end.uss - base.uss, "pss": end.pss - base.pss, "create": create,
                                  "out": y.tobytes().hex()[:64]}), flush=True)  # fmt: skip


def run_workers(cfg: dict[str, Any], n: int) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(n)]  # fmt: skip
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().startswith("READY")
        results = []
        for p in procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            assert p.stdout is not None
            results += [json.loads(line[7:]) for line in p.stdout if line.startswith("RESULT ")]
        return results
    finally:
        for p in procs:
            p.wait()


def latency_table(cfgs: dict[str, dict[str, Any]], xshape: list[int], rounds: int) -> None:
    keep: list[Any] = []
    sessions = {k: make_session(c, keep) for k, c in cfgs.items()}
    x = np.random.default_rng(1).standard_normal(xshape).astype(np.float32)
    lat: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):  # interleaved: host load hits every session alike
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"x": x})
            lat[k].append((time.perf_counter() - t) * 1e3)
    base = float(np.median(lat["default in-process"]))
    print("\n| session | p50 ms | p10 ms | p50 vs default |\n|---|---|---|---|")
    for k, v in lat.items():
        print(f"| {k} | {np.median(v):.1f} | {np.percentile(v, 10):.1f} | {np.median(v) / base:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("mlp", "conv"), default="mlp")
    ap.add_argument("--level", choices=("extended", "all"), default="extended")
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="shmcache-prepack-"))
    src = tmp / f"{args.model}.onnx"
    xshape = make_model(args.model, src)
    subprocess.run([sys.executable, "-m", "worker.prepack", str(src), str(tmp / "pp"), "--opt-level",
                    args.level], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    segs = {k: Path(f"/dev/shm/shmcache-exp-{os.getpid()}-{k}") for k in ("pp", "plain", "holes")}
    try:
        (tmp / "reloc.onnx").write_bytes(
            write_prepacked_segment(tmp / "pp/model.opt.onnx", tmp / "pp/model.opt.data", segs["pp"]))
        plain, layout = write_plain_segment(src, segs["plain"])
        (tmp / "plain.onnx").write_bytes(plain)
        common = {"level": args.level, "xshape": xshape, "n": args.rounds}
        off = {"session.disable_prepacking": "1"}
        cfgs = {
            "default in-process": dict(common, model=str(src)),
            "relocated pre-pack in shm": dict(common, model=str(tmp / "reloc.onnx"), bytes=True, folder="/dev/shm"),
            "external in shm + disable_prepacking": dict(common, model=str(tmp / "plain.onnx"), bytes=True,
                                                          folder="/dev/shm", config=off),
            "add_initializer + disable_prepacking": dict(common, model=str(tmp / "plain.onnx"), bytes=True,
                                                          folder="/dev/shm", config=off, shm=str(segs["plain"]),
                                                          layout=layout),
            "external in shm, pre-packing on": dict(common, model=str(tmp / "plain.onnx"), bytes=True,
                                                     folder="/dev/shm"),
        }  # fmt: skip
        print(f"\n{args.model} level {args.level}: per-process growth after {args.rounds} runs, MiB")
        print("| mode | N | USS | PSS | create ms | same output as default |\n|---|---|---|---|---|---|")
        ref = None
        for n in args.procs:
            for label, cfg in cfgs.items():
                rs = run_workers(cfg, n)
                ref = ref or rs[0]["out"]
                print(f"| {label} | {n} | {np.mean([r['uss'] for r in rs]) / 2**20:.1f} | "
                      f"{np.mean([r['pss'] for r in rs]) / 2**20:.1f} | "
                      f"{np.median([r['create'] for r in rs]) * 1e3:.0f} | {rs[0]['out'] == ref} |", flush=True)  # fmt: skip
        latency_table({k: v for k, v in cfgs.items() if "pre-packing on" not in k}, xshape, args.rounds)

        (tmp / "holes.onnx").write_bytes(write_prepacked_segment(
            tmp / "pp/model.opt.onnx", tmp / "pp/model.opt.data", segs["holes"], holes=True))  # fmt: skip
        before = segs["holes"].stat().st_blocks * 512 / 2**20
        rs = run_workers(dict(common, model=str(tmp / "holes.onnx"), bytes=True, folder="/dev/shm", n=3), 1)
        after = segs["holes"].stat().st_blocks * 512 / 2**20
        print(f"\nholes: allocated {before:.1f} -> {after:.1f} MiB of {segs['holes'].stat().st_size / 2**20:.1f};"
              f" same output as default: {rs[0]['out'] == ref}")  # fmt: skip
    finally:
        for seg in segs.values():
            seg.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
