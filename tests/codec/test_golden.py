"""Frozen files written by an earlier build must decode to the frozen values, forever."""

from pathlib import Path

import numpy as np
import pytest

import tensorwire
from tensorwire.codec.dtypes import numpy_dtype
from tensorwire.codec.planes import LAYOUTS

GOLDEN = Path(__file__).parent.parent / "golden"


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


@pytest.mark.parametrize("level", ["fast", "max"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_golden_frame_is_what_this_build_writes(name, level):
    """Encoding is deterministic: today's encoder still writes the frozen bytes."""
    suffix, shape, _ = CASES[level]
    words = np.frombuffer((GOLDEN / f"values_{name.lower()}{suffix}.bin").read_bytes(), dtype=LAYOUTS[name].uint)
    frame = tensorwire.compress(words.view(numpy_dtype(name)).reshape(shape), level=level)
    assert frame == (GOLDEN / f"frame_{name.lower()}_{level}.twf").read_bytes()


def test_golden_container_decodes():
    with tensorwire.open(GOLDEN / "container_v1.twz") as f:
        assert f.metadata() == {"made_by": "tests/golden/make_golden.py"}
        assert f.keys()[-2:] == ["ints", "empty"]
        for name in sorted(LAYOUTS):
            expected = (GOLDEN / f"values_{name.lower()}.bin").read_bytes()
            assert f.get_numpy(f"t_{name.lower()}").tobytes() == expected
        assert f.get_numpy("ints").tolist() == list(range(-50, 50))
        assert f.get_numpy("empty").shape == (0, 4)
