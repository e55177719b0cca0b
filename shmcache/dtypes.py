"""The tensor element types a segment can hold: ONNX TensorProto codes <-> numpy dtypes.

Every type numpy can represent is supported, plus bfloat16 and the 8-bit floats through
ml_dtypes (which onnx itself depends on): one byte per element in ONNX's raw data as in numpy.
Strings, complex numbers and the 2/4/6-bit types are refused with a message naming the type:
ONNX packs those several to a byte, so they cannot be held as a flat array of fixed-size
elements that both numpy and ONNX Runtime read the same way.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto

from shmcache.errors import ModelError

DTYPES_BY_CODE: dict[int, np.dtype] = {
    TensorProto.FLOAT: np.dtype("<f4"),
    TensorProto.DOUBLE: np.dtype("<f8"),
    TensorProto.FLOAT16: np.dtype("<f2"),
    TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    TensorProto.INT8: np.dtype("i1"),
    TensorProto.INT16: np.dtype("<i2"),
    TensorProto.INT32: np.dtype("<i4"),
    TensorProto.INT64: np.dtype("<i8"),
    TensorProto.UINT8: np.dtype("u1"),
    TensorProto.UINT16: np.dtype("<u2"),
    TensorProto.UINT32: np.dtype("<u4"),
    TensorProto.UINT64: np.dtype("<u8"),
    TensorProto.BOOL: np.dtype("?"),
    TensorProto.FLOAT8E4M3FN: np.dtype(ml_dtypes.float8_e4m3fn),
    TensorProto.FLOAT8E4M3FNUZ: np.dtype(ml_dtypes.float8_e4m3fnuz),
    TensorProto.FLOAT8E5M2: np.dtype(ml_dtypes.float8_e5m2),
    TensorProto.FLOAT8E5M2FNUZ: np.dtype(ml_dtypes.float8_e5m2fnuz),
}



def type_name(code: int) -> str:
    """ONNX's own name for a data type code, e.g. 'FLOAT16'."""
    try:
        return TensorProto.DataType.Name(code)
    except ValueError:
        return f"type code {code}"


def numpy_dtype_for(code: int) -> np.dtype:
    try:
        return DTYPES_BY_CODE[code]
    except KeyError:
        raise ModelError(
            f"ONNX type {type_name(code)} cannot be held in shared memory "
            "(supported: bool, int8..int64, uint8..uint64, float16, bfloat16, float32, float64 "
            "and the 8-bit floats)"
        ) from None
