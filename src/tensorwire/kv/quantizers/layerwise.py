"""``layerwise``: KIVI with more bits for the early layers (CacheGen-style layer-wise bits).

Early layers' errors propagate through every later layer, so CacheGen spends more bits on
them. Of ``n_layers`` layers, the first ``n_early = floor(early_fraction * n_layers + 1/2)``
(layer indices ``0 .. n_early - 1``) use ``early_bits`` for keys and values, the others
``late_bits``.

Planes: exactly :class:`~tensorwire.kv.quantizers.kivi.KIVI`'s with
``k_bits = v_bits = bits(layer)`` (``k.codes``, ``k.zero``, ``k.scale``, ``k.residual``,
``v.codes``, ``v.zero``, ``v.scale``, ``v.residual``; the codes planes' ``bits`` says which
width the layer got). Error bound: KIVI's for the layer's width;
:meth:`LayerwiseBits.error_bound`, which is not told the layer, uses ``late_bits`` (the
smaller width, so the larger bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..stage import ShapeMismatch, is_number
from .kivi import KIVI, PerLayerKIVI, check_residual
from .uniform import check_bits, check_group_size

__all__ = ["LayerwiseBits"]


@dataclass(frozen=True)
class LayerwiseBits(PerLayerKIVI):
    """KIVI with ``early_bits`` for the first ``early_fraction`` of the layers, ``late_bits`` after.

    Parameters
    ----------
    early_bits, late_bits : int
        Code widths (1, 2, 3, 4, 6, 8); ``early_bits >= late_bits``.
    early_fraction : float
        Fraction of the layers, in ``[0, 1]``, counted from the first, that get ``early_bits``.
    group_size, residual : int
        As in :class:`~tensorwire.kv.quantizers.kivi.KIVI`.

    Examples
    --------
    >>> q = LayerwiseBits(early_bits=4, late_bits=2, early_fraction=0.25)
    >>> [q.bits(i, 8) for i in range(8)]
    [4, 4, 2, 2, 2, 2, 2, 2]
    """

    id = "layerwise"
    # Offline search candidates (tensorwire.search).
    search_space: ClassVar[dict[str, tuple]] = {
        "early_bits": (4, 6, 8), "late_bits": (2, 3, 4), "early_fraction": (0.25, 0.5),
    }  # fmt: skip

    early_bits: int = 4
    late_bits: int = 2
    early_fraction: float = 0.25
    group_size: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        check_bits(self, "early_bits", self.early_bits)
        check_bits(self, "late_bits", self.late_bits)
        self.check(
            self.early_bits >= self.late_bits,
            f"early_bits ({self.early_bits}) must be >= late_bits ({self.late_bits}): early layers get more bits",
        )
        fraction = self.early_fraction
        self.check(
            is_number(fraction, 0.0, 1.0),
            f"early_fraction must be a number in [0, 1], got {fraction!r}",
        )
        check_group_size(self, self.group_size)
        check_residual(self, self.residual)

    def bits(self, layer_index: int, n_layers: int) -> int:
        """Code width of layer ``layer_index`` of ``n_layers``."""
        if not (isinstance(n_layers, (int, np.integer)) and n_layers >= 1 and 0 <= layer_index < n_layers):
            raise ShapeMismatch(
                f"stage {self.id!r}: layer_index must be in [0, n_layers) with n_layers >= 1, "
                f"got layer_index={layer_index!r}, n_layers={n_layers!r}"
            )
        n_early = int(np.floor(self.early_fraction * n_layers + 0.5))
        return self.early_bits if layer_index < n_early else self.late_bits

    def layer_quantizer(self, layer_index: int, n_layers: int) -> KIVI:
        """The KIVI quantizer that layer ``layer_index`` of ``n_layers`` uses."""
        bits = self.bits(layer_index, n_layers)
        return KIVI(k_bits=bits, v_bits=bits, group_size=self.group_size, residual=self.residual)

    def error_bound(self, keys: np.ndarray, values: np.ndarray) -> float:
        """KIVI's bound at ``late_bits``: the largest of any layer (the layer is not known here)."""
        kivi = KIVI(k_bits=self.late_bits, v_bits=self.late_bits, group_size=self.group_size, residual=self.residual)
        return kivi.error_bound(keys, values)
