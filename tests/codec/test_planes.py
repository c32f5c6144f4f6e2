import numpy as np
import pytest
from hypothesis import given

from tensorwire.codec.planes import LAYOUTS, layout_for, merge, split
from tensorwire.errors import UnsupportedDType
from tensorwire.testing.strategies import awkward_values, raw_words


@given(raw_words())
def test_split_merge_roundtrip(case):
    layout, words = case
    exponent, planes, rem = split(words, layout)
    assert planes.shape == (layout.raw_bytes, words.size)
    assert int(rem.max(initial=0)) < (1 << layout.rem_bits) or layout.rem_bits == 0
    np.testing.assert_array_equal(merge(exponent, planes, rem, layout), words)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_fields_cover_every_bit(name):
    layout = LAYOUTS[name]
    assert 1 + layout.exp_bits + layout.man_bits == layout.bits
    assert layout.raw_bytes * 8 + layout.rem_bits == layout.raw_bits
    assert layout.exp_bits + layout.rem_bits <= 8  # a block symbol always fits one byte


def test_bf16_split_is_exponent_and_sign_mantissa_byte():
    words = np.array([0x3F80, 0xBF80, 0x7FC1], dtype=np.uint16)  # 1.0, -1.0, a NaN payload
    exponent, planes, rem = split(words, LAYOUTS["BF16"])
    assert exponent.tolist() == [127, 127, 255]
    assert planes[0].tolist() == [0x00, 0x80, 0x41]
    assert rem.tolist() == [0, 0, 0]


def test_awkward_values_survive(subtests=None):
    for layout in LAYOUTS.values():
        words = awkward_values(layout)
        np.testing.assert_array_equal(merge(*split(words, layout), layout), words)


def test_unknown_dtype_is_named():
    with pytest.raises(UnsupportedDType, match="C64"):
        layout_for("C64")
    assert layout_for("I8") is None
