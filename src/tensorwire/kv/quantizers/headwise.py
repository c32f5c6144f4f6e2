"""``headwise``: KIVI with more bits for the heads that need them (KVServe's hybrid quantizer).

Per layer, the ``N = B * H`` rows ``(batch, kv_head)`` are ranked by a score computed from
the layer itself, and the top ``n_high = floor(high_fraction * N + 1/2)`` rows get
``high_bits``, the others ``low_bits`` (keys and values alike). Ties go to the lower row
index (``b * H + h``). Scores:

* ``"key_outlier"``: ``max|k| / mean|k|`` over the head's tokens and channels (0 for a
  head of zeros): heads with outlier channels lose the most under few bits.
* ``"variance"``: ``var(k) + var(v)`` over the head's tokens and channels.

The quantization itself is KIVI's (:mod:`tensorwire.kv.quantizers.kivi`: keys per
channel, values per token, ``group_size``, ``residual`` tokens in bfloat16), with the
code planes split by class because a plane has one code width. With ``Tk``, ``Tv`` as in
KIVI, ``Nh`` high rows and ``Nl = N - Nh`` low rows, planes::

    heads.high      uint8, bits = 1          (B, H)        1 = the row has high_bits
    k.codes.high    uint8, bits = high_bits  (Nh, Tk, D)   high rows in row order
    k.codes.low     uint8, bits = low_bits   (Nl, Tk, D)   low rows in row order
    k.zero          float16                  (B, H, Tk / G, D)
    k.scale         float16                  (B, H, Tk / G, D)
    k.residual      bfloat16                 (B, H, T - Tk, D)
    v.codes.high    uint8, bits = high_bits  (Nh, Tv, D)
    v.codes.low     uint8, bits = low_bits   (Nl, Tv, D)
    v.zero          float16                  (B, H, Tv, ceil(D / G))
    v.scale         float16                  (B, H, Tv, ceil(D / G))
    v.residual      bfloat16                 (B, H, T - Tv, D)

The decoder reads the classes from ``heads.high``; it never recomputes scores. Error
bound: KIVI's, with each group's own scale (low-bit heads have the larger scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numba import njit

from ...errors import CorruptData
from ..stage import Plane, Quantizer, is_number
from .checks import check_kv, check_shape, expect_plane
from .floats import MAGNITUDE
from .kivi import HeadClass, check_residual, dequantize_kivi, kivi_error_bound, kivi_split, quantize_kivi
from .uniform import check_bits, check_group_size

__all__ = ["SCORES", "HeadwiseMixed", "head_scores"]

SCORES = ("key_outlier", "variance")


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc"})
def _row_scores(x, variance, out):
    """Per row of ``x`` (rows, n): ``max|x| / mean|x|`` (0 for a row of zeros), or the variance.

    Sums run in float64 and may be reassociated (vectorized): the scores only rank heads,
    and the decoder never recomputes them.
    """
    rows, n = x.shape
    word = np.empty(1, np.int32)  # to read the largest magnitude's bits back as a float
    for r in range(rows):
        row = x[r]
        if variance:
            total = 0.0
            for j in range(n):
                total += np.float64(row[j])
            mean = total / n
            squares = 0.0
            for j in range(n):
                dev = np.float64(row[j]) - mean
                squares += dev * dev
            out[r] = squares / n
        else:
            bits = row.view(np.int32)
            peak = np.int32(0)
            total = 0.0
            for j in range(n):
                a = np.int32(bits[j] & MAGNITUDE)
                peak = a if a > peak else peak
                total += np.abs(np.float64(row[j]))
            word[0] = peak
            out[r] = np.float64(word.view(np.float32)[0]) / (total / n) if total > 0 else 0.0


def row_scores(x: np.ndarray, variance: bool) -> np.ndarray:
    """float64 score per row of a (rows, n) float32 array (see ``_row_scores``)."""
    out = np.zeros(x.shape[0], dtype=np.float64)
    _row_scores(np.ascontiguousarray(x), variance, out)
    return out


def head_scores(score: str, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One float64 score per row ``(batch, kv_head)``, shape ``(B * H,)`` (see the module docstring)."""
    rows = keys.shape[0] * keys.shape[1]
    if keys.size == 0:
        return np.zeros(rows)
    if score == "key_outlier":
        return row_scores(keys.reshape(rows, -1), variance=False)
    return row_scores(keys.reshape(rows, -1), variance=True) + row_scores(values.reshape(rows, -1), variance=True)


@dataclass(frozen=True)
class HeadwiseMixed(Quantizer):
    """KIVI layout; a fraction of the (batch, kv_head) rows of each layer gets more bits.

    Parameters
    ----------
    high_bits, low_bits : int
        Code widths (1, 2, 3, 4, 6, 8) of the chosen and the other rows; ``high_bits >= low_bits``.
    high_fraction : float
        Fraction of rows, in ``[0, 1]``, that get ``high_bits``.
    score : {"key_outlier", "variance"}
        How rows are ranked.
    group_size, residual : int
        As in :class:`~tensorwire.kv.quantizers.kivi.KIVI`.

    Examples
    --------
    >>> import numpy as np
    >>> kv = np.random.default_rng(0).standard_normal((1, 4, 200, 64)).astype(np.float32)
    >>> kv[0, 2, :, 7] *= 30  # an outlier channel in head 2
    >>> q = HeadwiseMixed(high_bits=4, low_bits=2, high_fraction=0.25)
    >>> planes = q.quantize(0, 1, kv, kv)
    >>> planes["heads.high"].data.tolist()
    [[0, 0, 1, 0]]
    >>> k, v = q.dequantize(0, 1, planes, kv.shape)
    >>> bool(np.abs(k - kv).max() <= q.error_bound(kv, kv))
    True
    """

    id = "headwise"
    # Offline search candidates (tensorwire.search).
    search_space: ClassVar[dict[str, tuple]] = {
        "high_bits": (4, 6, 8), "low_bits": (2, 3), "high_fraction": (0.25, 0.5), "score": ("key_outlier", "variance"),
    }  # fmt: skip

    high_bits: int = 4
    low_bits: int = 2
    high_fraction: float = 0.25
    score: str = "key_outlier"
    group_size: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        check_bits(self, "high_bits", self.high_bits)
        check_bits(self, "low_bits", self.low_bits)
        self.check(
            self.high_bits >= self.low_bits,
            f"high_bits ({self.high_bits}) must be >= low_bits ({self.low_bits}); swap them",
        )
        fraction = self.high_fraction
        self.check(
            is_number(fraction, 0.0, 1.0),
            f"high_fraction must be a number in [0, 1], got {fraction!r}",
        )
        self.check(self.score in SCORES, f"score must be one of {list(SCORES)}, got {self.score!r}")
        check_group_size(self, self.group_size)
        check_residual(self, self.residual)

    def n_high(self, rows: int) -> int:
        """How many of ``rows`` rows get ``high_bits``: ``floor(high_fraction * rows + 1/2)``."""
        return min(rows, int(np.floor(self.high_fraction * rows + 0.5)))

    def _classes(self, high: np.ndarray) -> list[HeadClass]:
        """The two classes for a boolean mask of shape (B, H)."""
        flat = high.reshape(-1)
        rows_high = np.flatnonzero(flat).astype(np.int64)
        rows_low = np.flatnonzero(~flat).astype(np.int64)
        return [
            HeadClass(".high", rows_high, self.high_bits, self.high_bits, (rows_high.size,)),
            HeadClass(".low", rows_low, self.low_bits, self.low_bits, (rows_low.size,)),
        ]

    def choose(self, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Boolean mask (B, H): the rows that get ``high_bits`` for this layer."""
        b, h = keys.shape[:2]
        scores = head_scores(self.score, keys, values)
        order = np.argsort(-scores, kind="stable")  # highest first; ties: lower row first
        mask = np.zeros(b * h, dtype=bool)
        mask[order[: self.n_high(b * h)]] = True
        return mask.reshape(b, h)

    def quantize(self, layer_index: int, n_layers: int, keys: np.ndarray, values: np.ndarray) -> dict[str, Plane]:
        keys, values = check_kv(self.id, keys, values)
        high = self.choose(keys, values)
        planes = quantize_kivi(self.id, keys, values, self.group_size, self.residual, self._classes(high))
        planes["heads.high"] = Plane(high.astype(np.uint8), bits=1)
        return planes

    def dequantize(
        self, layer_index: int, n_layers: int, planes: dict[str, Plane], shape: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        shape = check_shape(self.id, shape)
        mask = expect_plane(self.id, planes, "heads.high", np.uint8, shape[:2], bits=1)
        if mask.size and int(mask.max()) > 1:
            raise CorruptData(f"stage {self.id!r}: plane 'heads.high' holds values other than 0 and 1")
        return dequantize_kivi(self.id, planes, shape, self.group_size, self.residual, self._classes(mask == 1))

    def error_bound(self, keys: np.ndarray, values: np.ndarray) -> float:
        """KIVI's bound with the scales this layer's head choice produces."""
        planes = self.quantize(0, 1, keys, values)
        tk, tv = kivi_split(keys.shape[2], self.group_size, self.residual)
        return kivi_error_bound(planes, keys, values, tk, tv)
