"""The tensorwire error hierarchy.

Every error raised for bad input derives from :class:`TensorwireError` and also from the
matching built-in exception, so ``except ValueError`` keeps working for callers that do
not know tensorwire. Messages say what was found, what was expected and what to do.
"""

from __future__ import annotations

__all__ = [
    "TensorwireError",
    "FormatError",
    "BadMagic",
    "UnsupportedVersion",
    "Truncated",
    "ChecksumMismatch",
    "CorruptData",
    "UnsupportedDType",
    "MissingDependency",
]


class TensorwireError(Exception):
    """Base class of every error tensorwire raises on purpose."""


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


class UnsupportedDType(TensorwireError, TypeError):
    """A dtype tensorwire does not know how to store."""


class MissingDependency(TensorwireError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str):
    """Import an optional dependency or raise :class:`MissingDependency` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency(
            f"{module!r} is not installed; install it with `pip install 'tensorwire[{extra}]'`"
        ) from exc
