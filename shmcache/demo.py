"""`shmcache demo`: the README's main job, on the model that ships with the project.

Builds a segment from the embedded model, attaches it from a second process that prints the
header and tensor table and checks every tensor against the model file, then removes it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from shmcache.model import load_model, build_model_segment
from shmcache.registry import instance_id, segment_name

ATTACH_AND_PRINT = """
import sys
import numpy as np
import onnx
from onnx import numpy_helper
from shmcache.cli import describe_segment
from shmcache.segment import Segment

seg = Segment.attach(sys.argv[1], verify=True)
print(describe_segment(seg))
model = onnx.load(sys.argv[2])
for t in model.graph.initializer:
    view = seg.tensor(t.name)
    assert not view.flags.writeable
    assert np.array_equal(view, numpy_helper.to_array(t)), t.name
print(f"\\nattached from pid {__import__('os').getpid()}: digest verified, "
      f"{len(model.graph.initializer)} tensors equal to the model file, read-only, no copy")
"""


def run_demo(args: argparse.Namespace) -> int:
    from shmcache.cli import embedded_model_path

    path = embedded_model_path()
    name = segment_name(instance_id("demo"), "embedded", 1)
    owned = build_model_segment(load_model(path), name=name, model_name="embedded", version=1)
    try:
        print(f"built {name} from {path.name} in /dev/shm ({owned.size} bytes)\n")
        done = subprocess.run([sys.executable, "-c", ATTACH_AND_PRINT, name, str(path)])
        return done.returncode
    finally:
        owned.unlink()
