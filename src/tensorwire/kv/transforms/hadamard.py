"""Seeded randomised Hadamard rotation of the head dimension.

A few channels of real key caches carry values tens of times larger than the rest
("outlier channels"). A low-bit quantizer that shares one scale across a token's channels
spends its range on those few and rounds the others to almost nothing. Rotating every token
vector by an orthogonal matrix whose entries all have the same magnitude spreads each
channel's energy evenly over all channels, so the per-token max/mean ratio drops and the
quantization grid fits the data (QuaRot, Ashkboos et al. 2024, arXiv:2404.00456; QuIP#,
Tseng et al. 2024). The random signs keep the rotation from aligning with structure in
the data. Rotating is per token, so it commutes with token selection, and it preserves
dot products between equally rotated vectors and L2 norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np

from ..stage import ShapeMismatch, Transform, is_int

__all__ = ["Hadamard", "random_signs", "rotation_matrix"]


def random_signs(seed: int, n: int) -> np.ndarray:
    """``n`` signs (float64, +-1) drawn from ``numpy.random.default_rng(seed)``.

    Sign ``i`` is ``-1`` when bit ``i`` of the little-endian bit string made of the first
    ``ceil(n / 64)`` raw 64-bit outputs of the generator's PCG64 bit generator is set.
    Raw bit-generator streams are stable across numpy versions (NEP 19), unlike the
    ``Generator`` sampling methods, and a receiver must rebuild the same rotation.
    """
    raw = np.random.default_rng(seed).bit_generator.random_raw(max(1, -(-n // 64)))
    bits = np.unpackbits(np.asarray(raw, dtype="<u8").view(np.uint8), bitorder="little")[:n]
    return 1.0 - 2.0 * bits.astype(np.float64)


@lru_cache(maxsize=32)
def rotation_matrix(seed: int, head_dim: int) -> np.ndarray:
    """The orthogonal float32 matrix ``diag(signs) @ H / sqrt(head_dim)`` (read-only, cached).

    ``H`` is the Sylvester Hadamard matrix (``H_1 = [1]``, ``H_2n = [[H, H], [H, -H]]``) and
    ``signs = random_signs(seed, head_dim)``. ``head_dim`` must be a power of two.
    """
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {head_dim}")
    h = np.ones((1, 1))
    while h.shape[0] < head_dim:
        h = np.block([[h, h], [h, -h]])
    m = (random_signs(seed, head_dim)[:, None] * h / math.sqrt(head_dim)).astype(np.float32)
    m.flags.writeable = False
    return m


@dataclass(frozen=True)
class Hadamard(Transform):
    """Rotate each token's key and/or value vector: ``x -> x @ (diag(signs) H / sqrt(d))``.

    The inverse multiplies by the transpose. In float32 a round trip is not bit-exact: the
    relative error ``|inverse(forward(x)) - x| / max|x|`` stays below about ``1e-6``
    (``head_dim`` 64..128), far below any quantizer's error.

    Parameters
    ----------
    seed : int
        Seed (>= 0) of the random signs; see :func:`random_signs`.
    keys : bool
        Rotate the keys (default True). Keys hold the outlier channels.
    values : bool
        Rotate the values (default True).

    Raises
    ------
    ShapeMismatch
        From :meth:`forward` / :meth:`inverse` when ``head_dim`` is not a power of two.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((1, 1, 1, 4), dtype=np.float32); x[..., 0] = 8.0
    >>> k, v = Hadamard(seed=0).forward(0, x, x)
    >>> np.abs(k).ravel().tolist()
    [4.0, 4.0, 4.0, 4.0]
    """

    seed: int = 0
    keys: bool = True
    values: bool = True

    id = "hadamard"
    # Offline search (tensorwire.search): keys hold the outlier channels, so they are always rotated.
    search_space: ClassVar[dict[str, tuple]] = {"values": (True, False)}

    def __post_init__(self) -> None:
        self.check(
            is_int(self.seed, 0),
            f"seed must be an int >= 0, got {self.seed!r}",
        )
        self.check(isinstance(self.keys, bool), f"keys must be a bool, got {self.keys!r}")
        self.check(isinstance(self.values, bool), f"values must be a bool, got {self.values!r}")

    def _matrix(self, layer_index: int, what: str, x: np.ndarray) -> np.ndarray:
        d = x.shape[-1] if x.ndim else 0
        if d < 1 or d & (d - 1):
            raise ShapeMismatch(
                f"stage 'hadamard': layer {layer_index} {what} have head_dim {d} (shape {x.shape}); the "
                "Hadamard rotation needs a power-of-two head_dim. Use the 'identity' transform for this model"
            )
        return rotation_matrix(self.seed, d)

    def _apply(self, layer_index: int, keys: np.ndarray, values: np.ndarray, transpose: bool):
        out = []
        for what, x, on in (("keys", keys, self.keys), ("values", values, self.values)):
            if not on:
                out.append(x)
                continue
            m = self._matrix(layer_index, what, x)
            out.append(np.matmul(np.asarray(x, dtype=np.float32), m.T if transpose else m))
        return out[0], out[1]

    def forward(self, layer_index: int, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rotated float32 copies of the selected arrays (the others are returned as they are)."""
        return self._apply(layer_index, keys, values, transpose=False)

    def inverse(self, layer_index: int, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Undo :meth:`forward` (multiply by the transpose; float rounding remains)."""
        return self._apply(layer_index, keys, values, transpose=True)
