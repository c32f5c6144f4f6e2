"""The tensorwire error hierarchy: every error and warning tensorwire raises on purpose.

Every error raised for bad input derives from :class:`TensorwireError` and also from the
matching built-in exception, so ``except ValueError`` keeps working for callers that do
not know tensorwire. Messages say what was found, what was expected and what to do.

They all live here, so that any layer can raise any of them without importing a layer
above it (``kv`` raising :class:`FormatError`, ``search`` raising :class:`StageConfigError`).
"""

from __future__ import annotations

import importlib

__all__ = [
    "TensorwireError",
    # formats (docs/FORMAT.md)
    "FormatError",
    "BadMagic",
    "UnsupportedVersion",
    "Truncated",
    "ChecksumMismatch",
    "CorruptData",
    "ShapeMismatch",
    "UnsupportedDType",
    # environment and usage
    "MissingDependency",
    "OutputExists",
    # KV stages and pipelines
    "StageConfigError",
    "ObservationError",
    "UnrepresentableValues",
    "EvaluationError",
    # profile libraries
    "ProfileError",
    "LibraryFormatError",
    "UnsupportedLibraryVersion",
    "EmptyLibrary",
    "DuplicateProfile",
    "MissingField",
    "BadMeasurement",
    "StagesNotInstalled",
    # offline search
    "SearchError",
    "SearchSpaceError",
    "CandidateRejected",
    # online control
    "ControlWarning",
    # serving
    "InvalidRequest",
    "ModelNotFound",
    "ContextLengthExceeded",
    "TooManyRequests",
    "RequestTooLarge",
    "BackendError",
    "BackendUnavailable",
    # serving: wire protocol and transport (docs/PROTOCOL.md)
    "ProtocolError",
    "MalformedFrame",
    "UnsupportedProtocolVersion",
    "UnknownFrameType",
    "FrameTooLarge",
    "FrameChecksumMismatch",
    "UnexpectedFrame",
    "AuthenticationFailed",
    "PeerError",
    "ConnectionClosed",
    "TransportTimeout",
    "SecretError",
    "ShapingUnavailable",
    "RecordFileError",
    "DiagnoseError",
    "EXTRAS",
    "require",
]


class TensorwireError(Exception):
    """Base class of every error tensorwire raises on purpose."""


# -- formats ------------------------------------------------------------------------------
class FormatError(TensorwireError, ValueError):
    """A stream or file does not follow the tensorwire format (see docs/FORMAT.md)."""


class BadMagic(FormatError):
    """The bytes do not start (or end) with the expected magic number."""


class UnsupportedVersion(FormatError):
    """The stream was written by a format version this build cannot read."""


class Truncated(FormatError):
    """The stream ends before the data its header declares."""


class ChecksumMismatch(FormatError):
    """Stored and computed checksums differ: the bytes were altered after writing."""


class CorruptData(FormatError):
    """Structurally impossible content (an index past the end, a code longer than allowed, ...)."""


class ShapeMismatch(FormatError):
    """A payload describes a cache of another shape than the one expected (another model)."""


class UnsupportedDType(TensorwireError, TypeError):
    """A dtype tensorwire does not know how to store."""


# -- environment and usage ------------------------------------------------------------------
class MissingDependency(TensorwireError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class OutputExists(TensorwireError, FileExistsError):
    """A command would overwrite an existing file without being told to (``--force``)."""


# -- KV stages and pipelines ----------------------------------------------------------------
class StageConfigError(TensorwireError, ValueError):
    """A stage or pipeline config is invalid: unknown id, bad parameter, wrong stage order."""


class ObservationError(TensorwireError, ValueError):
    """A selector needs prefill observations (queries) that the cache lacks or that do not fit it."""


class UnrepresentableValues(TensorwireError, ValueError):
    """The KV tensors hold values a lossy quantizer cannot represent (NaN, ±inf, or too large).

    Non-finite keys or values are a bug upstream (the model or a transform); tensorwire
    does not guess a replacement. Magnitudes beyond the range of a quantizer's parameters
    (65504 for float16) ask for another quantizer (``cast`` to BF16 or F32) or a transform.
    """


class EvaluationError(TensorwireError, ValueError):
    """The evaluation cannot run as asked (text too short, bad settings)."""


# -- profile libraries ------------------------------------------------------------------------
class ProfileError(TensorwireError, ValueError):
    """A profile library, or one profile in it, is invalid."""


class LibraryFormatError(ProfileError, FormatError):
    """The file is not a tensorwire profile library (not JSON, or another ``format``)."""


class UnsupportedLibraryVersion(LibraryFormatError, UnsupportedVersion):
    """The library was written by a format version this build cannot read."""


class EmptyLibrary(ProfileError):
    """The library holds no profile."""


class DuplicateProfile(ProfileError):
    """Two profiles share a name."""


class MissingField(ProfileError):
    """A required field (a measurement, the pipeline, a model dimension) is absent."""


class BadMeasurement(ProfileError):
    """A measurement is not a finite number in its allowed range (e.g. a ratio <= 0)."""


class LibraryModelMismatch(ProfileError):
    """A profile library was measured on a model of another shape than the one it is used with."""


class StagesNotInstalled(ProfileError):
    """Profiles name stage ids that are not registered (:mod:`tensorwire.kv.registry`)."""


# -- offline search -----------------------------------------------------------------------------
class SearchError(TensorwireError, RuntimeError):
    """The search cannot run as asked (a study of another shape, a worker that failed, ...)."""


class SearchSpaceError(TensorwireError, ValueError):
    """A stage's ``search_space`` or a space restriction is malformed."""


class CandidateRejected(TensorwireError, ValueError):
    """A candidate pipeline is skipped (a skip rule) or invalid (a StageConfigError)."""


# -- online control -------------------------------------------------------------------------------
class ControlWarning(RuntimeWarning):
    """A bad sample or context was ignored by the online controller (it never raises)."""


# -- serving -------------------------------------------------------------------------------------
class InvalidRequest(TensorwireError, ValueError):
    """A request to the HTTP API is invalid; it carries the fields of OpenAI's error object.

    ``status`` is the HTTP status the front end answers with (400 unless a subclass says
    otherwise), ``param`` the offending field (dotted path, e.g. ``"tensorwire.slo_ms"``)
    or None, ``code`` a machine-readable code or None, ``error_type`` OpenAI's ``type``.
    """

    status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ModelNotFound(InvalidRequest):
    """The request names a model this server does not serve (HTTP 404, as OpenAI answers)."""

    status = 404

    def __init__(self, message: str, *, param: str | None = "model", code: str | None = "model_not_found"):
        super().__init__(message, param=param, code=code)


class ContextLengthExceeded(InvalidRequest):
    """The prompt, or the prompt plus ``max_tokens``, does not fit the model's context."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "context_length_exceeded"):
        super().__init__(message, param=param, code=code)


class RequestTooLarge(InvalidRequest):
    """The request body is larger than the front end accepts (HTTP 413); nothing of it was parsed."""

    status = 413

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "request_too_large"):
        super().__init__(message, param=param, code=code)


class TooManyRequests(InvalidRequest):
    """The front end already has its limit of requests in flight (HTTP 429); retry later."""

    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "too_many_requests"):
        super().__init__(message, param=param, code=code)


class BackendError(TensorwireError, RuntimeError):
    """The serving backend (the workers, or the in-process model) failed a request (HTTP 500)."""

    status = 500


class BackendUnavailable(BackendError):
    """The backend cannot take requests now (workers down or starting; HTTP 503)."""

    status = 503

# -- serving: wire protocol and transport ----------------------------------------------------------
class ProtocolError(TensorwireError, ConnectionError):
    """The peer broke the wire protocol (docs/PROTOCOL.md); the connection cannot go on.

    ``code`` is the ERROR frame code the detecting side sends its peer before closing.
    """

    code = "protocol"


class MalformedFrame(ProtocolError):
    """A frame's header or payload is not what its type requires (bad magic, reserved bits, bad JSON)."""

    code = "malformed-frame"


class UnsupportedProtocolVersion(ProtocolError):
    """The peer speaks a protocol version this build does not."""

    code = "unsupported-version"


class UnknownFrameType(ProtocolError):
    """A frame header names a frame type this protocol version does not define."""

    code = "unknown-frame-type"


class FrameTooLarge(ProtocolError):
    """A frame claims more payload bytes than allowed (the max frame size or the transfer's own bound)."""

    code = "frame-too-large"


class FrameChecksumMismatch(ProtocolError):
    """A frame fails its XXH3-64 checksum: the bytes were altered on the way."""

    code = "frame-checksum"


class UnexpectedFrame(ProtocolError):
    """A well-formed frame arrived where the protocol's sequence allows another one."""

    code = "unexpected-frame"


class AuthenticationFailed(ProtocolError):
    """The handshake failed: the peer does not hold the shared secret (or is not a tensorwire peer)."""

    code = "auth-failed"


class PeerError(ProtocolError):
    """The peer sent an ERROR frame; ``code``, ``fatal`` and ``request_id`` are the frame's fields.

    A non-fatal one reports a failed request: the connection stays usable. After a fatal one
    the peer closes the connection.
    """

    def __init__(self, code: str, message: str, fatal: bool = True, request_id: str | None = None):
        where = f" (request {request_id})" if request_id is not None else ""
        super().__init__(f"the peer reported {code!r}{where}: {message}")
        self.code, self.peer_message, self.fatal, self.request_id = code, message, fatal, request_id


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (``mid_frame``: in the middle of a frame, so the frame is lost)."""

    code = "closed"

    def __init__(self, message: str, mid_frame: bool = False):
        super().__init__(message)
        self.mid_frame = mid_frame


class TransportTimeout(TensorwireError, TimeoutError):
    """The peer sent (or read) nothing for longer than the connection's timeout: a stalled peer."""

    code = "timeout"


class SecretError(TensorwireError, ValueError):
    """No usable shared secret: none configured, too short, or a secret file others can read."""


class ShapingUnavailable(TensorwireError, RuntimeError):
    """Kernel link shaping (a network namespace with tc tbf) is not allowed here; the reason says why."""


# -- diagnosis of collectives ------------------------------------------------------------------
class RecordFileError(FormatError):
    """A diagnosis record file is not one: wrong header, a line that is not a record, or cut short."""


class DiagnoseError(TensorwireError, RuntimeError):
    """The diagnosis launcher could not do its job (no job command, the aggregator could not start)."""


# -- optional dependencies ---------------------------------------------------------------------------
# The one extra that brings each optional top-level package (pyproject.toml's
# optional-dependencies); torch is in several extras, and "hf" is the smallest that has it.
EXTRAS: dict[str, str] = {
    "fsspec": "remote",
    "aiohttp": "remote",
    "s3fs": "remote",
    "torch": "hf",
    "safetensors": "hf",
    "transformers": "hf",
    "gguf": "kv",
    "accelerate": "hf",
    "zstandard": "kv",
    "lz4": "kv",
    "constriction": "kv",
    "matplotlib": "bench",
    "triton": "gpu",
    "optuna": "search",
    "fastapi": "serve",
    "starlette": "serve",
    "pydantic": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
}


def require(module: str):
    """Import an optional dependency or raise :class:`MissingDependency` naming its extra."""
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        extra = EXTRAS.get(top)
        hint = f"pip install 'tensorwire[{extra}]'" if extra else f"pip install {top}"
        raise MissingDependency(f"{module!r} is not installed; install it with `{hint}`") from exc
