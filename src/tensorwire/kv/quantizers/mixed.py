"""``mixed``: KIVI with code widths chosen per layer, for keys and values separately.

Layers do not matter equally: quantizing some layers' values to 2 bits costs a model
almost nothing, others' keys at 3 bits cost it more than the rest together. The widths
come from a measured per-layer sensitivity scan and an allocation under a quality budget
(:mod:`tensorwire.search.sensitivity`), so a ``mixed`` config belongs to one model: it
lists a width for each of that model's layers, and a cache with another number of layers
is refused (:class:`~tensorwire.errors.ShapeMismatch`), never coded with shifted widths.

Planes: exactly :class:`~tensorwire.kv.quantizers.kivi.KIVI`'s with the layer's
``k_bits[i]`` and ``v_bits[i]`` (the codes planes' ``bits`` say which widths a layer got).
Error bound: KIVI's at the smallest widths listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..stage import ShapeMismatch
from .kivi import KIVI, PerLayerKIVI, check_residual
from .uniform import check_bits, check_group_size

__all__ = ["MixedBits"]


@dataclass(frozen=True)
class MixedBits(PerLayerKIVI):
    """KIVI with ``k_bits[i]`` / ``v_bits[i]`` for layer ``i``.

    Parameters
    ----------
    k_bits, v_bits : tuple of int
        One code width (1, 2, 3, 4, 6, 8) per layer, as many as the model has layers.
    group_size, residual : int
        As in :class:`~tensorwire.kv.quantizers.kivi.KIVI`.

    Examples
    --------
    >>> q = MixedBits(k_bits=(4, 3), v_bits=(3, 2), group_size=32, residual=0)
    >>> q.layer_quantizer(1, 2).to_config()
    {'id': 'kivi', 'k_bits': 3, 'v_bits': 2, 'group_size': 32, 'residual': 0}
    """

    id = "mixed"  # no search_space: the widths come from the sensitivity allocation, not from sampling

    k_bits: tuple[int, ...] = ()
    v_bits: tuple[int, ...] = ()
    group_size: int = 128
    residual: int = 0

    def __post_init__(self) -> None:
        for name in ("k_bits", "v_bits"):
            widths = getattr(self, name)
            self.check(isinstance(widths, tuple) and len(widths) > 0, f"{name} must list one width per layer, got {widths!r}")
            for width in widths:
                check_bits(self, name, width)
        self.check(
            len(self.k_bits) == len(self.v_bits),
            f"k_bits and v_bits must list the same layers, got {len(self.k_bits)} and {len(self.v_bits)} widths",
        )
        check_group_size(self, self.group_size)
        check_residual(self, self.residual)

    def layer_quantizer(self, layer_index: int, n_layers: int) -> KIVI:
        """The KIVI quantizer of layer ``layer_index``; the cache must have the listed number of layers."""
        if n_layers != len(self.k_bits) or not 0 <= layer_index < n_layers:
            raise ShapeMismatch(
                f"stage 'mixed' lists widths for {len(self.k_bits)} layers, this cache has {n_layers} "
                f"(layer {layer_index}); its widths were allocated for another model: run the sensitivity "
                "allocation on this one"
            )
        return KIVI(k_bits=self.k_bits[layer_index], v_bits=self.v_bits[layer_index], group_size=self.group_size,
                    residual=self.residual)  # fmt: skip

    def error_bound(self, keys: np.ndarray, values: np.ndarray) -> float:
        """KIVI's bound at the smallest listed widths: the largest of any layer."""
        kivi = KIVI(k_bits=min(self.k_bits), v_bits=min(self.v_bits), group_size=self.group_size, residual=self.residual)
        return kivi.error_bound(keys, values)
