"""Write the frozen golden files. Run once per new format feature; NEVER regenerate existing ones.

The tests decode the frozen bytes and compare with the frozen expected values, so a change
that alters how existing files decode fails even if encode and decode change together.
Files of format version 1 sit in this folder; ``v2/`` holds version 2's (the same values
written again, plus chunk mode 3: values narrowed from a smaller float).
"""

from pathlib import Path

import numpy as np

import tensorwire
from tensorwire.codec.dtypes import numpy_dtype
from tensorwire.codec.planes import LAYOUTS
from tensorwire.testing.strategies import awkward_values, weight_like

HERE = Path(__file__).parent
V2 = HERE / "v2"
LARGE = 70_000


def golden_values(name: str, n: int = 1500) -> np.ndarray:
    layout = LAYOUTS[name]
    words = weight_like(layout, n, seed=7)
    special = awkward_values(layout)
    words[: special.size] = special
    return words


def narrow_values(name: str) -> np.ndarray:
    """Words of an upcast checkpoint: bf16 weights as f32 (16 zero bits), or cast to f16 (3 zero
    bits) with f16's awkward values among them, whose set low bits make mode 3's exceptions."""
    bf16 = golden_values("BF16", LARGE)
    if name == "F32":
        return bf16.astype(np.uint32) << 16
    import ml_dtypes

    words = weight_like(LAYOUTS["BF16"], LARGE, seed=7).view(ml_dtypes.bfloat16).astype(np.float16).view(np.uint16)
    special = awkward_values(LAYOUTS["F16"])
    words[100 : 100 + special.size] = special
    return words


def write_once(path: Path, data: bytes) -> None:
    if not path.exists():
        path.write_bytes(data)


def main_v2() -> None:
    """Version 2: every version-1 frame's values written again, the narrow cases, a container."""
    V2.mkdir(exist_ok=True)
    for name in sorted(LAYOUTS):
        small = np.frombuffer((HERE / f"values_{name.lower()}.bin").read_bytes(), dtype=LAYOUTS[name].uint)
        large = np.frombuffer((HERE / f"values_{name.lower()}_large.bin").read_bytes(), dtype=LAYOUTS[name].uint)
        write_once(V2 / f"frame_{name.lower()}_fast.twf", tensorwire.compress(small.view(numpy_dtype(name)).reshape(30, 50), level="fast"))
        write_once(V2 / f"frame_{name.lower()}_max.twf", tensorwire.compress(large.view(numpy_dtype(name)).reshape(-1, 100), level="max"))
    for name in ("F16", "F32"):
        words = narrow_values(name)
        write_once(V2 / f"values_{name.lower()}_from_bf16.bin", words.tobytes())
        for level in ("fast", "max"):
            write_once(V2 / f"frame_{name.lower()}_from_bf16_{level}.twf", tensorwire.compress(words.view(numpy_dtype(name)).reshape(-1, 100), level=level))
    tensors = {f"t_{name.lower()}": golden_values(name).view(numpy_dtype(name)).reshape(30, 50) for name in sorted(LAYOUTS)}
    tensors.update({f"t_{name.lower()}_from_bf16": narrow_values(name)[:3000].view(numpy_dtype(name)) for name in ("F16", "F32")})
    tensors["ints"] = np.arange(-50, 50, dtype=np.int8)
    tensors["empty"] = np.zeros((0, 4), dtype=np.float32)
    if not (V2 / "container.twz").exists():
        tensorwire.save_file(tensors, V2 / "container.twz", metadata={"made_by": "tests/golden/make_golden.py"}, chunk_bytes=1024)


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
    main_v2()


if __name__ == "__main__":
    main()
