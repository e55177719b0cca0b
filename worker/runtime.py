"""One model version inside a worker: the segment it maps and the ONNX Runtime session over it.

The session is created in the worker, after fork (ORT issue 9800; destroying an inherited session
can crash in pthread_join, ORT PR 31961), from the graph stored in the segment. That graph names
the segment file itself as its external-data location, so ONNX Runtime memory-maps the weights
straight out of /dev/shm (RESEARCH.md: on CPU, external data is mmap'ed): no private copy.

Two ways to run a segment:

* ``prepacked`` — the segment also carries ORT's pre-packed weights (``FLAG_PREPACKED``); ORT maps
  them too and skips pre-packing: shared pages *and* full speed.
* ``mapped`` — a plain segment; pre-packing is turned off (``session.disable_prepacking``), since
  it would copy MatMul/Gemm/Conv weights into private buffers in every worker. Shared, but MatMul
  runs 1.6-2x slower (RESEARCH.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnxruntime as ort

from shmcache import errors
from shmcache.protocol import brief
from shmcache.segment import SHM_DIR, Segment

# ORT's type strings for the element types the wire protocol carries.
ORT_TYPES: dict[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}

Dim = int | str | None
_NUMPY: dict[str, np.dtype] = {name: np.dtype(name) for name in ORT_TYPES.values()}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as clients see it."""

    name: str
    dtype: str  # numpy name, or ORT's type string when the wire cannot carry it
    shape: tuple[Dim, ...] | None  # None: the graph declares no shape, any rank goes

    @property
    def numpy_dtype(self) -> np.dtype | None:
        return _NUMPY.get(self.dtype)

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype,
                "shape": None if self.shape is None else list(self.shape)}


@dataclass(frozen=True)
class SessionSettings:
    """Session options that must be identical wherever outputs are compared."""

    intra_op_threads: int = 1
    optimization: str = "all"  # basic | extended | all
    disable_prepacking: bool = True
    memory_arena: bool = False  # ORT's CPU arena keeps each worker's peak working memory
    allow_spinning: bool = False  # see spinning_pays()

    def options(self, prepacked: bool = False) -> ort.SessionOptions:
        """Options for a session; ``prepacked`` segments keep pre-packing on to load the blobs."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = OPT_LEVELS[self.optimization]
        spin = "1" if self.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        # Without ORT's arena a run's working memory goes back to malloc, from which an idle
        # worker returns it to the OS (worker.heap).
        so.enable_cpu_mem_arena = self.memory_arena
        if self.disable_prepacking and not prepacked:
            so.add_session_config_entry("session.disable_prepacking", "1")
        return so


OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def spinning_pays(workers: int, threads: int) -> bool:
    """Whether ORT's pool threads may spin between parallel sections (ORT's default).

    Only when the workers' threads fit the cores: oversubscribed, spinning threads burn the
    cores the other workers need (RESEARCH.md: 2 workers x 2 threads on 2 cores, 31 inf/s
    spinning, 42 without). When they fit, each worker's pool has cores of its own, and
    spinning makes a worker 5-8 % faster (256 MiB MLP at batch 32, 1 worker x 2 threads on 2
    cores, A/B against a daemon without it, two runs). With one thread there is no pool and
    it changes nothing.
    """
    return threads > 1 and workers * threads <= (os.cpu_count() or 1)


def default_threads(workers: int) -> int:
    """max(1, cores // workers): N workers must not fight over the same cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@dataclass
class ModelRuntime:
    """A session over one sealed segment; holds the mapping alive as long as the session."""

    model: str
    version: int
    segment: Segment
    session: ort.InferenceSession
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # Initializers also listed as graph inputs: ORT lets a run feed them (optional inputs).
    overridable: list[TensorSpec] = field(default_factory=list)
    served: int = 0
    warmed: bool = False
    typical_seconds: float = 1.0  # moving average of successful runs; decides inline runs
    typical_input_bytes: float = 0.0  # moving average of their inputs' size, likewise
    _input_index: dict[str, TensorSpec] = field(default_factory=dict, repr=False)
    _output_names: set[str] = field(default_factory=set, repr=False)
    _required: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._input_index = {spec.name: spec for spec in self.inputs + self.overridable}
        self._required = [spec.name for spec in self.inputs]
        self._output_names = {spec.name for spec in self.outputs}

    @classmethod
    def open(cls, segment_name: str, settings: SessionSettings) -> ModelRuntime:
        """Attach the segment read-only and create a session whose weights are its pages."""
        segment = Segment.attach(segment_name)
        try:
            session = create_session(segment, settings)
        except BaseException:
            segment.close()
            raise
        h = segment.header
        inputs = [spec_of(a) for a in session.get_inputs()]
        outputs = [spec_of(a) for a in session.get_outputs()]
        if any(s.shape == () for s in inputs + outputs):
            # ORT says [] both for a scalar and for a tensor declared without a shape.
            unranked = unranked_values(segment.graph_bytes())
            inputs, outputs = ([replace(s, shape=None) if s.name in unranked else s for s in specs]
                               for specs in (inputs, outputs))
        overridable = [spec_of(a) for a in session.get_overridable_initializers()]
        return cls(h.model, h.version, segment, session, inputs, outputs, overridable)

    def close(self) -> None:
        """Free the session, then unmap the segment, once nothing runs on this version.

        In that order: ORT maps the weights it reads from the segment itself, and the last
        mapping of an unlinked segment to go frees its pages (~0.1 s for 512 MiB). Ours goes
        last, and ``mmap.close`` frees them without holding the GIL; a session's destructor
        holds it."""
        del self.session
        self.segment.close()

    def signature(self) -> dict[str, Any]:
        return {
            "name": self.model,
            "version": self.version,
            "inputs": [s.to_wire() for s in self.inputs],
            "outputs": [s.to_wire() for s in self.outputs],
            # Initializers a call may feed instead (ORT's get_overridable_initializers): a
            # client types a list fed for one by this, as it does for the inputs.
            "overridable": [s.to_wire() for s in self.overridable],
        }

    def check(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> None:
        """Validate a request against the signature: the one place that does (principle 8)."""
        symbols: dict[str, tuple[int, str]] = {}
        for name, array in inputs.items():
            spec = self._input_index.get(name)
            if spec is None:
                raise errors.UnknownInput(
                    f"model {self.model!r} has no input {brief(name)}; inputs: "
                    f"{', '.join(self._input_index)}")
            check_tensor(spec, array)
            check_symbols(spec, array, symbols)
        missing = [name for name in self._required if name not in inputs]
        if missing:
            raise errors.MissingInput(f"model {self.model!r} needs input(s) {', '.join(missing)}")
        for name in outputs or ():
            if name not in self._output_names:
                raise errors.UnknownOutput(
                    f"model {self.model!r} has no output {brief(name)}; outputs: "
                    f"{', '.join(s.name for s in self.outputs)}")

    def run(self, inputs: dict[str, np.ndarray],
            outputs: list[str] | None) -> tuple[list[tuple[str, np.ndarray]], float]:
        """Run the session (called off the event loop); returns (name, array) pairs in order
        and the seconds ORT's run took."""
        names = outputs or [spec.name for spec in self.outputs]
        started = time.perf_counter()
        try:
            results = self.session.run(names, inputs)
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            if "while running" in str(exc):  # "Non-zero status code returned while running
                # Gather node ...": a node refused these values (an index out of range)
                raise errors.ModelFailed(
                    f"model {self.model!r} failed on these inputs: {exc}") from exc
            # ORT's own input checks, beyond what the signature says.
            raise errors.BadShape(f"model {self.model!r} rejected the inputs: {exc}") from exc
        except (ort.capi.onnxruntime_pybind11_state.Fail,
                ort.capi.onnxruntime_pybind11_state.RuntimeException) as exc:
            # A node failed on these values (Gather's index out of range, MatMul's dims on an
            # input of any rank): the request's doing, so not "internal".
            raise errors.ModelFailed(f"model {self.model!r} failed on these inputs: {exc}") from exc
        seconds = time.perf_counter() - started
        self.served += 1
        return list(zip(names, results)), seconds

    def observe(self, seconds: float, input_bytes: int) -> None:
        self.typical_seconds += (seconds - self.typical_seconds) * 0.1
        self.typical_input_bytes += (input_bytes - self.typical_input_bytes) * 0.1

    def expected_seconds(self, input_bytes: int) -> float:
        """How long a run on ``input_bytes`` of inputs should take, judged by the typical run
        and no less: a batch 100x the usual is taken to run 100x longer."""
        scale = input_bytes / self.typical_input_bytes if self.typical_input_bytes else 1.0
        return self.typical_seconds * max(1.0, scale)

    def warm_up(self) -> None:
        """One inference on inputs synthesised from the signature (dynamic dims set to 1, or
        to WARMUP_RETRY_DIM when 1 is too small for the model: silero-vad's reflect pad and
        PP-OCR's resize refuse 1)."""
        feed = synthesize_inputs(self.inputs)
        started = time.perf_counter()
        try:
            self.session.run(None, feed)
        except Exception:
            feed = synthesize_inputs(self.inputs, WARMUP_RETRY_DIM)
            started = time.perf_counter()
            self.session.run(None, feed)
        # A first run overstates the typical time; observe() brings it down as requests come.
        self.typical_seconds = time.perf_counter() - started
        self.typical_input_bytes = float(sum(a.nbytes for a in feed.values()))
        self.warmed = True


def create_session(segment: Segment, settings: SessionSettings) -> ort.InferenceSession:
    # A pre-packed segment carries the blobs: loading them is what keeps the pages shared.
    so = settings.options(prepacked=segment.header.prepacked)
    if segment.header.optimized:
        # ORT's own advice for a graph it optimized offline: load it with optimizations off.
        # The builder ran them at the configured level; running them again finds nothing to
        # do but still pages the optimizer's code in, in every worker.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", SHM_DIR)
    return ort.InferenceSession(segment.graph_bytes(), so, providers=["CPUExecutionProvider"])


def spec_of(arg: Any) -> TensorSpec:
    dims = tuple(d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) else None)
                 for d in arg.shape)
    return TensorSpec(arg.name, ORT_TYPES.get(arg.type, arg.type), dims)


def unranked_values(graph: bytes) -> set[str]:
    """Names of the graph's inputs and outputs declared without a shape (any rank)."""
    import onnx  # only for a model with a rank-0-or-unranked value: workers rarely need it

    model = onnx.ModelProto()
    model.ParseFromString(graph)
    return {v.name for v in [*model.graph.input, *model.graph.output]
            if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")}


def check_tensor(spec: TensorSpec, array: np.ndarray) -> None:
    if array.dtype != spec.numpy_dtype:
        raise errors.BadDtype(
            f"input {spec.name!r} must be {spec.dtype}, got {array.dtype.name}")
    if spec.shape is None:
        return
    if len(array.shape) != len(spec.shape):
        raise errors.BadShape(
            f"input {spec.name!r} must have {len(spec.shape)} dimensions {list(spec.shape)}, "
            f"got shape {list(array.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(want, int) and want != got:
            raise errors.BadShape(
                f"input {spec.name!r} dimension {axis} must be {want}, got {got} "
                f"(shape {list(array.shape)}, expected {list(spec.shape)})")


# Exporters write these for "unknown", not as a name shared between dimensions.
UNNAMED_DIMS = frozenset({"", "?", "-1", "None", "unknown"})


def check_symbols(spec: TensorSpec, array: np.ndarray, seen: dict[str, tuple[int, str]]) -> None:
    """A named dynamic dimension ("batch", "seq") must have one size across all inputs."""
    for want, got in zip(spec.shape or (), array.shape):
        if not isinstance(want, str) or want in UNNAMED_DIMS:
            continue
        size, first = seen.setdefault(want, (got, spec.name))
        if size != got:
            raise errors.BadShape(
                f"dimension {want!r} is {size} in input {first!r} but {got} in {spec.name!r}")


WARMUP_RETRY_DIM = 64


def synthesize_inputs(specs: list[TensorSpec], dynamic: int = 1) -> dict[str, np.ndarray]:
    """Zeros of each input's shape; dynamic dims become ``dynamic``, except a leading (batch)
    one, which stays 1 so a retry does not grow the memory arena for nothing."""
    feed = {}
    for spec in specs:
        declared = spec.shape if spec.shape is not None else (None,)  # any rank: try a vector
        shape = [d if isinstance(d, int) else (1 if axis == 0 else dynamic)
                 for axis, d in enumerate(declared)]
        dtype = np.dtype(spec.dtype) if spec.dtype in ORT_TYPES.values() else np.float32
        feed[spec.name] = np.zeros(shape, dtype=dtype)
    return feed
