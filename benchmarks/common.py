"""Shared pieces of the benchmark scripts: test models, tables, percentiles."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
import os
import re
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from shmcache import Client
    from worker.runtime import SessionSettings


def make_mlp(path: Path, mib: int = 256, batch_dim: str = "batch") -> Path:
    """An MLP of 4 square float32 MatMul+Add+Relu layers totalling about ``mib`` MiB.

    256 MiB gives 4 x 4096x4096, the model the issues measure on.
    """
    return make_mlp_seeded(path, mib, seed=7, batch_dim=batch_dim)


def make_tiny(path: Path) -> Path:
    """A tiny model (one 16x16 Gemm) for round-trip overhead."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def one_worker_settings(threads: int) -> SessionSettings:
    """The session options the daemon gives its worker when it runs one worker with
    ``threads`` intra-op threads (what an in-process session must match to compare)."""
    from worker.runtime import SessionSettings, spinning_pays  # imports ORT: only when asked

    return SessionSettings(intra_op_threads=threads, allow_spinning=spinning_pays(1, threads))


def active_pids(status: dict) -> list[int]:
    """Pids of the workers that accept requests, from a ``status`` reply (standbys left out)."""
    return [w["pid"] for w in status["workers"] if w["role"] == "active"]


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in out)


# --- a daemon under test (added for latency.py and coldstart.py) -------------------------------


ROOT = Path(__file__).resolve().parent.parent
READY_LINE = re.compile(r"worker (\d+) ready in ([0-9.]+)s")


def shm_leftovers(sockets: list[Path]) -> list[str]:
    """Segments in /dev/shm left by the daemons on ``sockets`` (others' runs are not ours)."""
    from shmcache.registry import instance_id

    mine = tuple(f"shmcache.{instance_id(s)}." for s in sockets)
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(mine))


class Daemon:
    """``shmcache serve`` in a subprocess, its stderr in ``log_path``; stop() sends TERM and waits.

    ``start_to_ready`` is the time from Popen to the first ``health`` that says ready, polled
    every ``poll`` seconds on the control socket.
    """

    def __init__(self, sock: Path, models: dict[str, Path], workers: int,
                 threads: int | None = None, log_path: Path | None = None,
                 state_dir: Path | None = None, extra: Sequence[str] = ()) -> None:
        self.sock = sock
        self.ctl = f"{sock}.ctl"
        self.log_path = log_path or sock.with_suffix(".log")
        # Always a private state directory: root's default (/var/lib/shmcache) would collect
        # every benchmark's pre-pack cache.
        state = state_dir or sock.with_name(sock.name + ".state")
        cmd = [sys.executable, "-m", "shmcache.cli", "serve", "--workers", str(workers),
               "--socket", str(sock), "--state-dir", str(state), *extra]
        for name, path in models.items():
            cmd += ["--model", f"{name}={path}"]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.start_to_ready: float | None = None

    def control(self) -> Client:  # imported lazily: the client pulls numpy only
        from shmcache import Client

        return Client(self.ctl, timeout=5.0, connect_timeout=1.0)

    def wait_ready(self, timeout: float = 300.0, poll: float = 0.005, settle: bool = True) -> float:
        """Seconds from start to ready; then, with ``settle``, also waits for the warm standby
        (which boots after the active workers are ready) so that no benchmark measures a
        daemon with a process still loading on the same cores."""
        deadline = time.perf_counter() + timeout
        with self.control() as ctl:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}; log:\n{self.log()}")
                try:
                    if ctl.request("health")["ready"]:
                        self.start_to_ready = time.perf_counter() - self.started
                        if settle:
                            self.wait_settled(deadline)
                        return self.start_to_ready
                except Exception:  # not listening yet, or restarting the connection
                    ctl.close()
                time.sleep(poll)
        raise TimeoutError(f"daemon not ready after {timeout}s; log:\n{self.log()}")

    def wait_settled(self, deadline: float) -> None:
        """Until every worker, standbys included, is ready. The supervisor spawns a standby on
        the tick after the active workers are ready, hence the short first sleep."""
        time.sleep(0.3)
        while time.perf_counter() < deadline:
            if all(w["state"] == "ready" for w in self.status()["workers"]):
                return
            time.sleep(0.05)
        raise TimeoutError(f"workers not all ready; log:\n{self.log()}")

    def status(self) -> dict:
        with self.control() as ctl:
            return ctl.request("status")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def ready_lines(self) -> dict[int, float]:
        """pid -> the supervisor's own 'worker N ready in X s' (spawn to ready message)."""
        return {int(m[1]): float(m[2]) for m in READY_LINE.finditer(self.log())}

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- added for memory.py, speed.py and swap.py ---------------------------------------------------

def make_mlp_seeded(path: Path, mib: int = 256, seed: int = 7, batch_dim: str = "batch") -> Path:
    """make_mlp with the weights drawn from ``seed`` (7 gives make_mlp's model): same graph and
    signature, other weights — the second weight set of a publish."""
    width = int(round((mib * 2**20 / 4 / 4) ** 0.5))
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(4):
        w = (rng.random((width, width), dtype=np.float32) - 0.5) / np.float32(width**0.5)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch_dim, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def measure(calls: dict[str, Callable[[], object]], total: int, block: int,
            warmup: int = 20) -> dict[str, list[float]]:
    """Alternate blocks of ``block`` calls per side until each side has made ``total`` calls,
    so host noise hits every side alike (the machines are shared)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():  # warm up each side (connection, arenas, caches)
        for _ in range(min(warmup, total)):
            fn()
    done = 0
    while done < total:
        n = min(block, total - done)
        for name, fn in calls.items():
            out = times[name]
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        done += n
    return times


def make_conv(path: Path, channels: Sequence[int] = (3, 64, 256, 512, 512), size: int = 32) -> Path:
    """4 x (Conv 3x3 pad 1 + Relu), channels 3->64->256->512->512 on 1x3x32x32 (14.1 MiB of
    weights): the Conv model of NOTES-prepack.md."""
    rng = np.random.default_rng(3)
    nodes, inits, x = [], [], "x"
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels[0], size, size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels[-1], size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class ServeDaemon(Daemon):
    """Daemon with an explicit ``--state-dir`` and extra ``serve`` flags (``--no-prepack``,
    ``--keep 1``)."""

    def __init__(self, sock: Path, models: dict[str, Path], workers: int, state_dir: Path,
                 threads: int | None = None, extra: Sequence[str] = (),
                 log_path: Path | None = None) -> None:
        super().__init__(sock, models, workers, threads, log_path, state_dir, extra)


def smaps_memory(pid: int, shm_prefix: str = "/dev/shm/",
                 code_marker: str = "onnxruntime") -> dict[str, int]:
    """Bytes from /proc/PID/smaps: uss, pss, rss over all mappings, and seg_pss / seg_uss / seg_rss
    over mappings of files under ``shm_prefix`` (the segments). Summed over every process, seg_pss
    is the number of distinct segment pages mapped by anyone, so (pss - seg_pss) summed plus the
    segment's allocated pages counts every page once. code_pss: PSS of the shared libraries whose
    path contains ``code_marker`` (ONNX Runtime's code: the kernels a model runs are pages of it).
    seg_anon: anonymous pages inside segment mappings, i.e. copies made by writes to a private
    mapping (ORT maps MAP_PRIVATE): private memory, though they sit in a segment's mapping.
    code_uss / code_anon: the same two over ONNX Runtime's library mappings. file_lone: the
    pages of files (libraries, segments; not memfds nor deleted files, whose pages go with
    their mappings) that this process alone maps: page cache, which stays when the process
    exits and is shared by whoever maps the page. Per mapping, Private_Clean plus the dirty
    private pages that are not anonymous (a tmpfs file's pages are dirty: a segment mapped by
    one worker), at least 0: pages a write copied are anonymous but may still be shared with
    the process this one forked from, so Anonymous may exceed Private_Dirty there. swap: bytes
    swapped out (an anonymous page read back from swap is clean, and would pass for a file's)."""
    keys = {"Rss": "rss", "Pss": "pss", "Private_Clean": "uss", "Private_Dirty": "uss",
            "Anonymous": "anon", "Swap": "swap"}
    out = dict.fromkeys(("rss", "pss", "uss", "anon", "swap", "seg_rss", "seg_pss", "seg_uss",
                         "seg_anon", "seg_swap", "code_rss", "code_pss", "code_uss", "code_anon",
                         "code_swap", "file_lone"), 0)
    in_seg = in_code = in_file = False
    mapping: dict[str, int] = {}  # the current mapping's own figures, by smaps field

    def end_mapping() -> None:
        if in_file:
            dirty_file = mapping.get("Private_Dirty", 0) - mapping.get("Anonymous", 0)
            out["file_lone"] += mapping.get("Private_Clean", 0) + max(0, dirty_file)
        mapping.clear()

    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if head.endswith(":") and head[:-1] in keys:
                kind = keys[head[:-1]]
                value = int(line.split()[1]) * 1024
                out[kind] += value
                mapping[head[:-1]] = value
                if in_seg:
                    out["seg_" + kind] += value
                if in_code:
                    out["code_" + kind] += value
            elif not head.endswith(":"):  # a mapping's header line: address perms offset dev inode path
                end_mapping()
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) == 6 else ""
                in_seg = path.startswith(shm_prefix)
                in_code = code_marker in path and ".so" in path
                # A deleted file's pages go with its last mapping: those count as private.
                in_file = (path.startswith("/") and not path.startswith("/memfd:")
                           and not path.endswith("(deleted)"))
    end_mapping()
    return out


def shm_pages(name: str) -> int:
    """Allocated bytes of a /dev/shm file (holes excluded)."""
    return os.stat(os.path.join("/dev/shm", name)).st_blocks * 512
