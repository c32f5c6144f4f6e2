"""The identity transform: the default when a pipeline rotates nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..stage import Transform

__all__ = ["Identity"]


@dataclass(frozen=True)
class Identity(Transform):
    """Leave keys and values as they are (lossless; the arrays are returned, not copied).

    Examples
    --------
    >>> import numpy as np
    >>> k = np.ones((1, 1, 2, 4), dtype=np.float32)
    >>> Identity().forward(0, k, k)[0] is k
    True
    """

    id = "identity"
    lossless: ClassVar[bool] = True

    def forward(self, layer_index: int, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return keys, values

    def inverse(self, layer_index: int, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return keys, values
