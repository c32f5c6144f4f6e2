"""Write the frozen golden files. Run once per new format feature; NEVER regenerate existing ones.

The tests decode the frozen bytes and compare with the frozen expected values, so a change
that alters how existing files decode fails even if encode and decode change together.
"""

from pathlib import Path

import numpy as np

import tensorwire
from tensorwire.codec.dtypes import numpy_dtype
from tensorwire.codec.planes import LAYOUTS
from tensorwire.testing.strategies import awkward_values, weight_like

HERE = Path(__file__).parent
LARGE = 70_000


def golden_values(name: str, n: int = 1500) -> np.ndarray:
    layout = LAYOUTS[name]
    words = weight_like(layout, n, seed=7)
    special = awkward_values(layout)
    words[: special.size] = special
    return words


def main() -> None:
    for name in sorted(LAYOUTS):
        words = golden_values(name)
        values = words.view(numpy_dtype(name)).reshape(30, 50)
        values_file = HERE / f"values_{name.lower()}.bin"
        if not values_file.exists():
            values_file.write_bytes(words.tobytes())
        target = HERE / f"frame_{name.lower()}_fast.twf"
        if not target.exists():
            target.write_bytes(tensorwire.compress(values, level="fast"))
        # Mode 2 is chosen for sure only above chunks.HUFFMAN_ALWAYS_ABOVE values.
        large = HERE / f"values_{name.lower()}_large.bin"
        target = HERE / f"frame_{name.lower()}_max.twf"
        if not target.exists():
            words = golden_values(name, LARGE)
            large.write_bytes(words.tobytes())
            target.write_bytes(tensorwire.compress(words.view(numpy_dtype(name)).reshape(-1, 100), level="max"))
    container = HERE / "container_v1.twz"
    if not container.exists():
        tensors = {f"t_{name.lower()}": golden_values(name).view(numpy_dtype(name)).reshape(30, 50) for name in sorted(LAYOUTS)}
        tensors["ints"] = np.arange(-50, 50, dtype=np.int8)
        tensors["empty"] = np.zeros((0, 4), dtype=np.float32)
        tensorwire.save_file(tensors, container, metadata={"made_by": "tests/golden/make_golden.py"}, chunk_bytes=1024)


if __name__ == "__main__":
    main()
