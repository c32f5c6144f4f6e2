"""Frozen files written by an earlier build must decode to the frozen values, forever."""

from pathlib import Path

import numpy as np
import pytest

import tensorwire
from tensorwire.codec.dtypes import numpy_dtype
from tensorwire.codec.planes import LAYOUTS

GOLDEN = Path(__file__).parent.parent / "golden"  # format version 1; version 2 in GOLDEN / "v2"
V2 = GOLDEN / "v2"


CASES = {"fast": ("", (30, 50), 1), "max": ("_large", (700, 100), 2)}  # values file, shape, chunk mode


@pytest.mark.parametrize("level", ["fast", "max"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_golden_frame_decodes(name, level):
    suffix, shape, mode = CASES[level]
    expected = np.frombuffer((GOLDEN / f"values_{name.lower()}{suffix}.bin").read_bytes(), dtype=LAYOUTS[name].uint)
    frame = (GOLDEN / f"frame_{name.lower()}_{level}.twf").read_bytes()
    assert frame[20 + 8 * 2 + 24] == mode  # the one chunk's mode byte: each level's stream is covered
    out = tensorwire.decompress(frame)
    assert out.dtype == numpy_dtype(name) and out.shape == shape
    assert out.reshape(-1).view(LAYOUTS[name].uint).tobytes() == expected.tobytes()


@pytest.mark.parametrize("folder", [GOLDEN, V2], ids=["v1", "v2"])
@pytest.mark.parametrize("level", ["fast", "max"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_golden_frame_is_what_this_build_writes(name, level, folder):
    """Encoding is deterministic: today's encoder writes version 2's frozen bytes, and version
    1's except for the version field (these values never take mode 3)."""
    suffix, shape, _ = CASES[level]
    words = np.frombuffer((GOLDEN / f"values_{name.lower()}{suffix}.bin").read_bytes(), dtype=LAYOUTS[name].uint)
    frame = bytearray(tensorwire.compress(words.view(numpy_dtype(name)).reshape(shape), level=level))
    assert frame[8:10] == b"\x02\x00"
    if folder is GOLDEN:
        frame[8:10] = b"\x01\x00"
    assert bytes(frame) == (folder / f"frame_{name.lower()}_{level}.twf").read_bytes()


@pytest.mark.parametrize("level", ["fast", "max"])
@pytest.mark.parametrize("name", ["F16", "F32"])
def test_golden_narrow_frame(name, level):
    """Mode 3: values cast up from bf16 (f16 ones with exceptions) decode, and are written again."""
    words = np.frombuffer((V2 / f"values_{name.lower()}_from_bf16.bin").read_bytes(), dtype=LAYOUTS[name].uint)
    frame = (V2 / f"frame_{name.lower()}_from_bf16_{level}.twf").read_bytes()
    assert frame[20 + 8 * 2 + 24] == 3
    assert tensorwire.decompress(frame).reshape(-1).view(LAYOUTS[name].uint).tobytes() == words.tobytes()
    assert tensorwire.compress(words.view(numpy_dtype(name)).reshape(-1, 100), level=level) == frame


@pytest.mark.parametrize("path", [GOLDEN / "container_v1.twz", V2 / "container.twz"], ids=["v1", "v2"])
def test_golden_container_decodes(path):
    with tensorwire.open(path) as f:
        assert f.metadata() == {"made_by": "tests/golden/make_golden.py"}
        assert f.keys()[-2:] == ["ints", "empty"]
        for name in sorted(LAYOUTS):
            expected = (GOLDEN / f"values_{name.lower()}.bin").read_bytes()
            assert f.get_numpy(f"t_{name.lower()}").tobytes() == expected
        assert f.get_numpy("ints").tolist() == list(range(-50, 50))
        assert f.get_numpy("empty").shape == (0, 4)


def test_golden_container_v2_narrow_tensors():
    with tensorwire.open(V2 / "container.twz") as f:
        for name in ("F16", "F32"):
            words = np.frombuffer((V2 / f"values_{name.lower()}_from_bf16.bin").read_bytes(), dtype=LAYOUTS[name].uint)
            assert f.get_numpy(f"t_{name.lower()}_from_bf16").view(LAYOUTS[name].uint).tobytes() == words[:3000].tobytes()
