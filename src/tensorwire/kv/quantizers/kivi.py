"""``kivi``: KIVI (Liu et al., 2024): keys per channel, values per token, recent tokens kept.

Keys have a few channels of large magnitude, so they are quantized per channel (a group
is ``G = group_size`` consecutive tokens of one channel); values are quantized per token
(a group is ``G`` consecutive channels of one token). The most recent ``R = residual``
tokens stay in bfloat16, and so do the key tokens that do not fill a whole group. For a
layer of shape ``(B, H, T, D)``::

    Tv = max(T - R, 0)            value tokens quantized (the oldest ones)
    Tk = (Tv // G) * G            key tokens quantized: whole groups only

Planes::

    k.codes      uint8, bits = k_bits   (B, H, Tk, D)
    k.zero       float16                (B, H, Tk / G, D)          per-channel groups
    k.scale      float16                (B, H, Tk / G, D)
    k.residual   bfloat16               (B, H, T - Tk, D)          tokens Tk .. T-1, as they were
    v.codes      uint8, bits = v_bits   (B, H, Tv, D)
    v.zero       float16                (B, H, Tv, ceil(D / G))    per-token groups (last one
    v.scale      float16                (B, H, Tv, ceil(D / G))    shorter when G does not divide D)
    v.residual   bfloat16               (B, H, T - Tv, D)          tokens Tv .. T-1

Every plane is always present (some may have zero length). Codes, zero points and
scales follow :mod:`tensorwire.kv.quantizers.uniform` exactly (``x̂ = zero + code *
scale``). Error bound: quantized values as in ``uniform`` (``s * (1/2 + 2**-11) + 2**-23
* max|x|``); residual values ``2**-8 * |x| + 2**-134`` (bfloat16 round to nearest even).

The functions :func:`quantize_kivi` and :func:`dequantize_kivi` take *head classes*: the
rows ``(batch, kv_head)`` split into classes that get their own code widths and their
own code planes (``k.codes<suffix>``, ``v.codes<suffix>``), while zero points, scales
and residuals stay in one plane each. KIVI itself has one class; the head-wise mixed
quantizer (``headwise``) has two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import ml_dtypes
import numpy as np

from ..stage import Plane, Quantizer, is_int
from ...errors import UnrepresentableValues
from .checks import check_kv, check_shape, expect_plane, kv_buffer
from .floats import widen
from .groups import dequantize_groups, group_error_bound, param_shape, quantize_groups
from .uniform import check_bits, check_group_size

__all__ = ["KIVI", "HeadClass", "PerLayerKIVI", "dequantize_kivi", "kivi_error_bound", "kivi_split", "quantize_kivi", "residual_bound"]

BF16 = np.dtype(ml_dtypes.bfloat16)
_BF16_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)


class HeadClass(NamedTuple):
    """Rows (``b * kv_heads + h``, ascending) that share code widths, and their code planes' suffix.

    ``lead`` is the leading shape of the class's code planes: ``(B, H)`` for a class of
    every row, ``(len(rows),)`` otherwise.
    """

    suffix: str
    rows: np.ndarray
    k_bits: int
    v_bits: int
    lead: tuple[int, ...]


def kivi_split(tokens: int, group_size: int, residual: int) -> tuple[int, int]:
    """``(Tk, Tv)``: how many of the oldest key and value tokens are quantized."""
    tv = max(tokens - residual, 0)
    return (tv // group_size) * group_size, tv


def _to_bf16(stage_id: str, x: np.ndarray) -> np.ndarray:
    """Residual tokens to bfloat16; NaN/inf and values beyond bfloat16 are rejected like elsewhere."""
    if x.size:
        amax = float(np.max(np.abs(x)))  # NaN propagates through max: one pass checks both
        if not amax <= _BF16_MAX:
            raise UnrepresentableValues(
                f"stage {stage_id!r}: the residual (most recent) tokens hold "
                f"{'non-finite values' if not np.isfinite(amax) else f'|x| = {amax:.6g} > {_BF16_MAX:.6g}'}; "
                "a quantizer codes finite numbers only. Non-finite KV comes from the model or a transform: "
                "fix it there (or use the 'cast' quantizer, which carries NaN/inf as they are)"
            )
    return x.astype(BF16)


def residual_bound(x: np.ndarray) -> float:
    """``2**-8 * max|x| + 2**-134``: bfloat16 rounding to nearest even, subnormals included."""
    return 2.0**-8 * float(np.max(np.abs(x), initial=0.0)) + 2.0**-134 if x.size else 0.0


def quantize_kivi(
    stage_id: str,
    keys: np.ndarray,
    values: np.ndarray,
    group_size: int,
    residual: int,
    classes: list[HeadClass],
) -> dict[str, Plane]:
    """KIVI planes of one layer (see the module docstring); ``classes`` partition the rows."""
    keys, values = check_kv(stage_id, keys, values)
    b, h, t, d = keys.shape
    tk, tv = kivi_split(t, group_size, residual)
    planes: dict[str, Plane] = {}
    for prefix, x, t1, axis in (("k", keys, tk, "channel"), ("v", values, tv, "token")):
        x3 = x.reshape(b * h, t, d)
        pshape = param_shape(axis, b * h, t1, d, group_size)
        zero = np.empty(pshape, dtype=np.uint16)
        scale = np.empty(pshape, dtype=np.uint16)
        for cls in classes:
            bits = cls.k_bits if prefix == "k" else cls.v_bits
            codes = quantize_groups(x3, cls.rows, t1, axis, group_size, bits, zero, scale)
            planes[f"{prefix}.codes{cls.suffix}"] = Plane(codes.reshape(*cls.lead, t1, d), bits=bits)
        planes[f"{prefix}.zero"] = Plane(zero.view(np.float16).reshape(b, h, *pshape[1:]))
        planes[f"{prefix}.scale"] = Plane(scale.view(np.float16).reshape(b, h, *pshape[1:]))
        planes[f"{prefix}.residual"] = Plane(_to_bf16(stage_id, x[:, :, t1:]))
    return planes


def dequantize_kivi(
    stage_id: str,
    planes: dict[str, Plane],
    shape: tuple[int, int, int, int],
    group_size: int,
    residual: int,
    classes: list[HeadClass],
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`quantize_kivi` for a layer of ``shape``; checks every plane it reads."""
    b, h, t, d = check_shape(stage_id, shape)
    tk, tv = kivi_split(t, group_size, residual)
    out = kv_buffer((b, h, t, d))
    for x, (prefix, t1, axis) in zip(out, (("k", tk, "channel"), ("v", tv, "token"))):
        pshape = param_shape(axis, b * h, t1, d, group_size)
        zero = expect_plane(stage_id, planes, f"{prefix}.zero", np.float16, (b, h, *pshape[1:]))
        scale = expect_plane(stage_id, planes, f"{prefix}.scale", np.float16, (b, h, *pshape[1:]))
        rest = expect_plane(stage_id, planes, f"{prefix}.residual", BF16, (b, h, t - t1, d))
        x3 = x.reshape(b * h, t, d)
        zero3 = widen(zero.reshape(pshape))
        scale3 = widen(scale.reshape(pshape))
        for cls in classes:
            bits = cls.k_bits if prefix == "k" else cls.v_bits
            codes = expect_plane(stage_id, planes, f"{prefix}.codes{cls.suffix}", np.uint8, (*cls.lead, t1, d), bits)
            dequantize_groups(codes.reshape(cls.rows.size, t1, d), cls.rows, axis, group_size, zero3, scale3, x3)
        x[:, :, t1:] = rest
    return out[0], out[1]


def kivi_error_bound(planes: dict[str, Plane], keys: np.ndarray, values: np.ndarray, tk: int, tv: int) -> float:
    """The documented bound for planes :func:`quantize_kivi` made from ``keys`` and ``values``."""
    return max(
        group_error_bound(planes["k.scale"].data, keys[:, :, :tk]),
        group_error_bound(planes["v.scale"].data, values[:, :, :tv]),
        residual_bound(keys[:, :, tk:]),
        residual_bound(values[:, :, tv:]),
    )


def check_residual(stage, value) -> None:
    stage.check(
        is_int(value, 0),
        f"residual must be a non-negative integer (tokens kept in bfloat16), got {value!r}",
    )


@dataclass(frozen=True)
class KIVI(Quantizer):
    """KIVI: keys per channel, values per token, the last ``residual`` tokens in bfloat16.

    Parameters
    ----------
    k_bits, v_bits : int
        Code widths of keys and values, each one of 1, 2, 3, 4, 6, 8.
    group_size : int
        Tokens per key group and channels per value group (KIVI uses 32).
    residual : int
        Most recent tokens kept unquantized (bfloat16); KIVI uses 128.

    Examples
    --------
    >>> import numpy as np
    >>> q = KIVI(k_bits=2, v_bits=2, group_size=32, residual=128)
    >>> kv = np.random.default_rng(0).standard_normal((1, 2, 300, 64)).astype(np.float32)
    >>> planes = q.quantize(0, 1, kv, kv)
    >>> planes["k.codes"].data.shape, planes["k.residual"].data.shape, planes["v.codes"].data.shape
    ((1, 2, 160, 64), (1, 2, 140, 64), (1, 2, 172, 64))
    >>> k, v = q.dequantize(0, 1, planes, kv.shape)
    >>> bool(np.abs(k - kv).max() <= q.error_bound(kv, kv))
    True
    """

    id = "kivi"
    # Offline search candidates (tensorwire.search).
    search_space: ClassVar[dict[str, tuple]] = {
        "k_bits": (2, 3, 4, 6, 8), "v_bits": (2, 3, 4, 6, 8), "group_size": (32, 64), "residual": (32, 128),
    }  # fmt: skip

    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        check_bits(self, "k_bits", self.k_bits)
        check_bits(self, "v_bits", self.v_bits)
        check_group_size(self, self.group_size)
        check_residual(self, self.residual)

    def _classes(self, shape: tuple[int, ...]) -> list[HeadClass]:
        b, h = shape[0], shape[1]
        return [HeadClass("", np.arange(b * h, dtype=np.int64), self.k_bits, self.v_bits, (b, h))]

    def quantize(self, layer_index: int, n_layers: int, keys: np.ndarray, values: np.ndarray) -> dict[str, Plane]:
        keys, values = check_kv(self.id, keys, values)
        return quantize_kivi(self.id, keys, values, self.group_size, self.residual, self._classes(keys.shape))

    def dequantize(
        self, layer_index: int, n_layers: int, planes: dict[str, Plane], shape: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        return dequantize_kivi(self.id, planes, shape, self.group_size, self.residual, self._classes(shape))

    def error_bound(self, keys: np.ndarray, values: np.ndarray) -> float:
        """Largest of the quantized-token bound and the bfloat16 residual bound (module docstring)."""
        planes = self.quantize(0, 1, keys, values)
        tk, tv = kivi_split(keys.shape[2], self.group_size, self.residual)
        return kivi_error_bound(planes, keys, values, tk, tv)


class PerLayerKIVI(Quantizer):
    """A quantizer that hands each layer to a KIVI of that layer's widths (:meth:`layer_quantizer`)."""

    def layer_quantizer(self, layer_index: int, n_layers: int) -> KIVI:
        raise NotImplementedError

    def quantize(self, layer_index: int, n_layers: int, keys: np.ndarray, values: np.ndarray) -> dict[str, Plane]:
        return self.layer_quantizer(layer_index, n_layers).quantize(layer_index, n_layers, keys, values)

    def dequantize(
        self, layer_index: int, n_layers: int, planes: dict[str, Plane], shape: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.layer_quantizer(layer_index, n_layers).dequantize(layer_index, n_layers, planes, shape)
