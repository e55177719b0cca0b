"""Every typed error shmcache raises, and the wire error codes that map onto them.

Error codes are part of the protocol (STYLE.md principle 4): a code is a stable string that
travels in a response, and the client turns it back into exactly one exception class. The table
``ERROR_CLASSES`` is the single place where that mapping lives.
"""

from __future__ import annotations


class ShmcacheError(Exception):
    """Base of every error shmcache raises on purpose."""


# --- segments -------------------------------------------------------------------------------


class SegmentError(ShmcacheError):
    """A shared-memory segment could not be built, attached or trusted."""


class SegmentCorrupt(SegmentError):
    """A segment's bytes do not describe a valid, sealed shmcache segment."""


class SegmentNotFound(SegmentError):
    """No segment exists under the requested name."""


class SegmentExists(SegmentError):
    """A segment with the requested name already exists (create is exclusive)."""


class NoSpace(SegmentError):
    """/dev/shm has not enough room for a segment."""


class ModelError(ShmcacheError):
    """An ONNX model file is missing, is not ONNX, or holds data shmcache cannot serve."""


class SignatureMismatch(ModelError):
    """A candidate model's inputs or outputs differ from the served model's.

    ``differences`` holds one human-readable line per difference (empty after unpickling).
    """

    def __init__(self, message: str, differences: list[str] | None = None) -> None:
        super().__init__(message)
        self.differences = list(differences or [])


class WeightsError(ModelError):
    """A weights file (.npz or safetensors) is corrupt or truncated, or does not fit the graph."""


class FileChanged(ModelError):
    """A recorded version's file no longer has the SHA-256 it had when that version loaded."""


# --- protocol / serving ---------------------------------------------------------------------


class RemoteError(ShmcacheError):
    """An error answered by the daemon. ``code`` is the stable wire code."""

    code = "internal"

    def __init__(self, message: str = "", *, request_id: int | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.request_id = request_id


class UnknownModel(RemoteError):
    code = "unknown_model"


class UnknownInput(RemoteError):
    code = "unknown_input"


class MissingInput(RemoteError):
    code = "missing_input"


class BadDtype(RemoteError):
    code = "bad_dtype"


class BadShape(RemoteError):
    code = "bad_shape"


class FrameTooLarge(RemoteError):
    code = "frame_too_large"


class Malformed(RemoteError):
    code = "malformed"


class UnsupportedOp(RemoteError):
    code = "unsupported_op"


class Overloaded(RemoteError):
    code = "overloaded"


class NotReady(RemoteError):
    code = "not_ready"


class NotFound(RemoteError):
    """A pinned version (or other named object) is not there any more."""

    code = "not_found"


class UnknownOutput(RemoteError):
    code = "unknown_output"


class PublishFailed(RemoteError):
    code = "publish_failed"


class Busy(RemoteError):
    """Another operation of the same kind (e.g. a publish of the same model) is running."""

    code = "busy"


class ModelFailed(RemoteError):
    """The model itself failed on these inputs (an index out of range, shapes its nodes do not
    accept): ONNX Runtime's message, the request's fault, not the daemon's."""

    code = "model_failed"


class Internal(RemoteError):
    code = "internal"


ERROR_CLASSES: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        UnknownModel,
        UnknownInput,
        MissingInput,
        BadDtype,
        BadShape,
        FrameTooLarge,
        Malformed,
        UnsupportedOp,
        Overloaded,
        NotReady,
        NotFound,
        UnknownOutput,
        PublishFailed,
        Busy,
        ModelFailed,
        Internal,
    )
}


def error_from_code(code: str, message: str, request_id: int | None = None) -> RemoteError:
    """Rebuild the exception a daemon meant by ``code``; unknown codes become ``Internal``."""
    cls = ERROR_CLASSES.get(code, Internal)
    err = cls(message, request_id=request_id)
    if cls is Internal and code != "internal":
        err.message = f"[{code}] {message}"
    return err


# --- client side transport --------------------------------------------------------------------


class ConnectionFailed(ShmcacheError):
    """The daemon could not be reached, or the connection broke; the call may be retried."""


class Timeout(ShmcacheError):
    """No answer within the caller's timeout."""
