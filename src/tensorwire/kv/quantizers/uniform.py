"""``uniform``: asymmetric k-bit group quantization of keys and values, one layout for both.

Groups (``G = group_size``), for a layer of shape ``(B, H, T, D)``:

* ``axis="token"`` (per-token): a group is ``G`` consecutive channels of one token;
  each token's ``D`` channels form ``ceil(D/G)`` groups, the last one shorter when ``G``
  does not divide ``D`` (``G >= D``: one group per token).
* ``axis="channel"`` (per-channel): a group is ``G`` consecutive tokens of one channel;
  the ``T`` tokens form ``ceil(T/G)`` groups, the last one shorter when ``G`` does not
  divide ``T`` (no token is dropped).

Planes (``x`` is ``k`` for keys, ``v`` for values)::

    x.codes   uint8, bits = `bits`   (B, H, T, D)      one code per value, 0 .. 2**bits - 1
    x.zero    float16                (B, H, T, ceil(D/G))   axis="token"
                                     (B, H, ceil(T/G), D)   axis="channel"
    x.scale   float16                same shape as x.zero

Decoding is ``x̂ = float32(zero) + float32(code) * float32(scale)`` in float32, with the
group's ``zero`` and ``scale``. ``zero`` is the group minimum rounded down to float16,
``scale`` the smallest float16 with ``zero + (2**bits - 1) * scale >= maximum``; codes are
computed from these rounded parameters (round half up, clamped), so no value is clipped.
The exact arithmetic is in :mod:`tensorwire.kv.quantizers.groups`.

Error bound, for every value of a group with stored scale ``s``::

    |x̂ - x| <= s * (1/2 + 2**-11) + 2**-23 * max|x|

and ``s <= ((max - min) + ulp16(min)) / (2**bits - 1) * (1 + 2**-10) + 2**-24``.
:meth:`Uniform.error_bound` returns the bound with the largest ``s`` of the layer.
Non-finite input, and groups beyond float16 parameters (a minimum below -65504, or
``(max - min) / (2**bits - 1)`` above 65504) raise
:class:`~tensorwire.errors.UnrepresentableValues`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..stage import Plane, Quantizer, is_int
from .checks import check_kv, check_shape, expect_plane, kv_buffer
from .floats import widen
from .groups import AXES, BITS, dequantize_groups, group_error_bound, param_shape, quantize_groups

__all__ = ["Uniform", "check_bits", "check_group_size"]


def check_bits(stage, name: str, value) -> None:
    """``value`` is one of the code widths in :data:`~.groups.BITS`."""
    stage.check(
        is_int(value) and value in BITS,
        f"{name} must be one of {list(BITS)}, got {value!r}",
    )


def check_group_size(stage, value) -> None:
    stage.check(
        is_int(value, 1),
        f"group_size must be a positive integer, got {value!r}",
    )


@dataclass(frozen=True)
class Uniform(Quantizer):
    """Asymmetric ``bits``-bit quantization in groups of ``group_size`` along ``axis``.

    Parameters
    ----------
    bits : int
        Code width, one of 1, 2, 3, 4, 6, 8.
    group_size : int
        Values per group (the last group along the axis may be shorter).
    axis : {"token", "channel"}
        ``"token"``: groups run along ``head_dim`` within one token (per-token
        quantization); ``"channel"``: groups run along tokens within one channel.

    Examples
    --------
    >>> import numpy as np
    >>> q = Uniform(bits=4, group_size=32, axis="token")
    >>> k = np.random.default_rng(0).standard_normal((1, 2, 5, 64)).astype(np.float32)
    >>> planes = q.quantize(0, 1, k, k)
    >>> sorted(planes)
    ['k.codes', 'k.scale', 'k.zero', 'v.codes', 'v.scale', 'v.zero']
    >>> k2, _ = q.dequantize(0, 1, planes, k.shape)
    >>> bool(np.abs(k2 - k).max() <= q.error_bound(k, k))
    True
    """

    id = "uniform"
    # Offline search candidates (tensorwire.search).
    search_space: ClassVar[dict[str, tuple]] = {
        "bits": (2, 3, 4, 6, 8), "group_size": (32, 64), "axis": ("token", "channel"),
    }  # fmt: skip

    bits: int = 4
    group_size: int = 32
    axis: str = "token"

    def __post_init__(self) -> None:
        check_bits(self, "bits", self.bits)
        check_group_size(self, self.group_size)
        self.check(self.axis in AXES, f"axis must be one of {list(AXES)}, got {self.axis!r}")

    def quantize(self, layer_index: int, n_layers: int, keys: np.ndarray, values: np.ndarray) -> dict[str, Plane]:
        keys, values = check_kv(self.id, keys, values)
        b, h, t, d = keys.shape
        heads = np.arange(b * h, dtype=np.int64)
        pshape = param_shape(self.axis, b * h, t, d, self.group_size)
        planes: dict[str, Plane] = {}
        for prefix, x in (("k", keys), ("v", values)):
            zero = np.empty(pshape, dtype=np.uint16)
            scale = np.empty(pshape, dtype=np.uint16)
            codes = quantize_groups(
                x.reshape(b * h, t, d), heads, t, self.axis, self.group_size, self.bits, zero, scale
            )
            planes[f"{prefix}.codes"] = Plane(codes.reshape(b, h, t, d), bits=self.bits)
            planes[f"{prefix}.zero"] = Plane(zero.view(np.float16).reshape(b, h, *pshape[1:]))
            planes[f"{prefix}.scale"] = Plane(scale.view(np.float16).reshape(b, h, *pshape[1:]))
        return planes

    def dequantize(
        self, layer_index: int, n_layers: int, planes: dict[str, Plane], shape: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        b, h, t, d = shape = check_shape(self.id, shape)
        heads = np.arange(b * h, dtype=np.int64)
        pshape = (b, h, *param_shape(self.axis, b * h, t, d, self.group_size)[1:])
        out = kv_buffer((b * h, t, d))
        for x, prefix in zip(out, ("k", "v")):
            codes = expect_plane(self.id, planes, f"{prefix}.codes", np.uint8, shape, self.bits)
            zero = expect_plane(self.id, planes, f"{prefix}.zero", np.float16, pshape)
            scale = expect_plane(self.id, planes, f"{prefix}.scale", np.float16, pshape)
            dequantize_groups(
                codes.reshape(b * h, t, d), heads, self.axis, self.group_size,
                widen(zero.reshape(b * h, *pshape[2:])), widen(scale.reshape(b * h, *pshape[2:])), x,
            )  # fmt: skip
        return out[0].reshape(shape), out[1].reshape(shape)

    def error_bound(self, keys: np.ndarray, values: np.ndarray) -> float:
        """``max(s) * (1/2 + 2**-11) + 2**-23 * max|x|`` over both tensors (see the module docstring)."""
        planes = self.quantize(0, 1, keys, values)
        return max(group_error_bound(planes[f"{p}.scale"].data, x) for p, x in (("k", keys), ("v", values)))
