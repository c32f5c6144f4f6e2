"""Stages of a KV compression pipeline and the data that flows between them.

A pipeline (``pipeline.py``) runs, in this order::

    transforms (float -> float, invertible)  ->  one selector (which tokens to keep)
        ->  one quantizer (float tensors -> named planes)  ->  encoders (plane -> bytes -> bytes)

Every stage is a small frozen dataclass whose fields are its parameters. ``to_config()``
returns plain JSON with the registry ``"id"``; ``Stage.from_config`` builds any stage back
from such a dict through :mod:`tensorwire.kv.registry`, so a pipeline config is a profile.

Shapes: a cache is a list of :class:`KVLayer`, one per decoder layer, each holding
``keys`` and ``values`` of shape ``(batch, kv_heads, tokens, head_dim)`` as float32 and
``positions`` of shape ``(batch, kv_heads, tokens)``: the position in the original
sequence of every kept token (selectors keep the same number of tokens per head, but each
head may keep different ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import ObservationError, ShapeMismatch, StageConfigError, TensorwireError

__all__ = [
    "KVLayer",
    "KVCacheData",
    "Observations",
    "Plane",
    "Stage",
    "is_int",
    "is_number",
    "Transform",
    "Selector",
    "Quantizer",
    "ArrayEncoder",
    "BytesEncoder",
    "StageConfigError",
    "ShapeMismatch",
    "ObservationError",
    "SLOTS",
    "SINGLE_SLOTS",
    "slot_of",
]


@dataclass
class KVLayer:
    """One decoder layer's cache: float32 keys/values and the original position of each token."""

    keys: np.ndarray  # (batch, kv_heads, tokens, head_dim) float32
    values: np.ndarray  # same shape as keys
    positions: np.ndarray  # (batch, kv_heads, tokens) int64, ascending per head

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.keys.shape)  # type: ignore[return-value]


@dataclass
class Observations:
    """What selectors may use besides the cache, collected during prefill (no second pass).

    ``queries[i]`` holds layer ``i``'s last ``window`` query vectors after RoPE, shape
    ``(batch, q_heads, window, head_dim)``; query head ``h`` attends with KV head
    ``h // (q_heads // kv_heads)`` (grouped-query attention).
    """

    queries: list[np.ndarray] = field(default_factory=list)

    @property
    def window(self) -> int:
        return self.queries[0].shape[2] if self.queries else 0


@dataclass
class KVCacheData:
    """A model's KV cache as numpy arrays, plus what a receiver needs to continue from it.

    ``seq_len`` is the length of the original sequence: the next token's position.
    ``dtype`` names the dtype the cache had in the model (``"F32"``, ``"BF16"``, ``"F16"``).
    """

    layers: list[KVLayer]
    seq_len: int
    dtype: str = "F32"
    observations: Observations | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def n_values(self) -> int:
        return sum(2 * layer.keys.size for layer in self.layers)

    def nbytes(self, itemsize: int = 2) -> int:
        """Bytes of the cache at ``itemsize`` bytes per value (2: the bf16 cache a server holds)."""
        return self.n_values() * itemsize


@dataclass
class Plane:
    """One array a quantizer hands to the encoders.

    ``data`` is a float array (float32, bfloat16, float16, float8_e4m3fn) or, for quantized
    codes, a uint8 array with ``bits`` significant bits per value (1..8). Float planes
    have ``bits=None``.
    """

    data: np.ndarray
    bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits is not None and (self.data.dtype != np.uint8 or not 1 <= self.bits <= 8):
            raise TypeError(f"a code plane is uint8 with 1..8 bits, got {self.data.dtype} with bits={self.bits}")


def is_int(value: object, low: int | None = None, high: int | None = None) -> bool:
    """Whether ``value`` is an ``int`` (a bool is not) in ``[low, high]`` (either end optional)."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (low is None or value >= low)
        and (high is None or value <= high)
    )


def is_number(value: object, low: float, high: float) -> bool:
    """Whether ``value`` is a real number (not a bool, not NaN) in ``[low, high]``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


class Stage:
    """Base of every stage. Subclasses are frozen dataclasses with a class-level ``id``."""

    id: ClassVar[str]
    kind: ClassVar[str]

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"id": self.id}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            config[f.name] = list(value) if isinstance(value, tuple) else value
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Stage":
        """Build the stage a config names (any registered id when called on ``Stage``)."""
        from .registry import stage_class

        if not isinstance(config, dict) or "id" not in config:
            raise StageConfigError(f"a stage config is a dict with an 'id', got {config!r}")
        klass = stage_class(config["id"])
        if cls is not Stage and not issubclass(klass, cls):
            raise StageConfigError(f"stage {config['id']!r} is a {klass.kind}, expected a {cls.kind}")
        params = {k: v for k, v in config.items() if k != "id"}
        names = {f.name: f for f in dataclasses.fields(klass)}
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise StageConfigError(f"stage {config['id']!r} has no parameter(s) {unknown}; it takes {sorted(names)}")
        for name, value in params.items():
            if isinstance(value, list):
                params[name] = tuple(value)
        try:
            return klass(**params)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, TensorwireError):
                raise
            raise StageConfigError(f"bad parameters for stage {config['id']!r}: {exc}") from exc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stage) and self.to_config() == other.to_config()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.to_config().items())))

    def check(self, condition: bool, message: str) -> None:
        """Raise :class:`StageConfigError` for a bad parameter (call from ``__post_init__``)."""
        if not condition:
            raise StageConfigError(f"stage {self.id!r}: {message}")


class Transform(Stage):
    """An invertible float -> float map applied to every layer (e.g. a rotation of head_dim).

    Transforms act on each token independently, so they commute with token selection.
    """

    kind = "transform"
    lossless: ClassVar[bool] = False  # True when inverse(forward(x)) is bit-exact

    def forward(self, layer_index: int, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def inverse(self, layer_index: int, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class Selector(Stage):
    """Chooses which tokens each (layer, batch, KV head) keeps.

    ``select`` returns, per layer, a sorted int64 index array of shape
    ``(batch, kv_heads, kept)`` into the layer's token axis. Every layer keeps the same
    number of tokens, so that the decoded cache is a regular ``DynamicCache``.
    """

    kind = "selector"
    needs_observations: ClassVar[bool] = False

    def kept(self, tokens: int) -> int:
        """How many of ``tokens`` tokens are kept."""
        raise NotImplementedError

    def select(self, cache: KVCacheData) -> list[np.ndarray]:
        raise NotImplementedError


class Quantizer(Stage):
    """Turns one layer's float keys/values into named planes, and back.

    ``quantize`` sees the (transformed, selected) float32 keys and values of shape
    ``(batch, kv_heads, tokens, head_dim)`` and returns ``{name: Plane}``.
    ``dequantize`` gets the same planes back and returns float32 keys and values.
    """

    kind = "quantizer"
    lossless: ClassVar[bool] = False

    def quantize(self, layer_index: int, n_layers: int, keys: np.ndarray, values: np.ndarray) -> dict[str, Plane]:
        raise NotImplementedError

    def dequantize(
        self, layer_index: int, n_layers: int, planes: dict[str, Plane], shape: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def error_bound(self, keys: np.ndarray, values: np.ndarray) -> float | None:
        """Documented worst-case absolute error for these inputs, or None when not bounded."""
        return None


class ArrayEncoder(Stage):
    """Plane -> bytes (at most one per pipeline, first among the encoders; default: raw)."""

    kind = "encoder"

    def encode(self, plane: Plane) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes | memoryview, dtype: np.dtype, shape: tuple[int, ...], bits: int | None) -> np.ndarray:
        raise NotImplementedError


class BytesEncoder(Stage):
    """bytes -> bytes (general-purpose compressors such as zstd or lz4), after the array encoder."""

    kind = "encoder"

    def encode(self, data: bytes | memoryview) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes | memoryview, size: int) -> bytes:
        """Inverse of ``encode``; ``size`` is the exact decoded size (from the payload header)."""
        raise NotImplementedError


# The slots of a pipeline, in the order it runs them (docs/FORMAT.md, "KV payload"). The
# pipeline checks its stages against this order; the search space is built slot by slot.
SLOTS: tuple[str, ...] = ("transform", "selector", "quantizer", "array_encoder", "bytes_encoder")
SINGLE_SLOTS = frozenset({"selector", "quantizer", "array_encoder"})  # at most one stage each
_SLOT_BASES: tuple[tuple[str, type[Stage]], ...] = (
    ("transform", Transform), ("selector", Selector), ("quantizer", Quantizer),
    ("array_encoder", ArrayEncoder), ("bytes_encoder", BytesEncoder),
)  # fmt: skip


def slot_of(stage: Stage | type) -> str | None:
    """The slot a stage (or stage class) fills, or None for a class that is not a KV stage."""
    klass = stage if isinstance(stage, type) else type(stage)
    return next((slot for slot, base in _SLOT_BASES if issubclass(klass, base)), None)
