"""Mode-1 stream: the numba kernels against the numpy reference, and every error case."""

import numpy as np
import pytest
from hypothesis import given

from tensorwire.codec import blocks, cpu
from tensorwire.codec.planes import LAYOUTS
from tensorwire.errors import CorruptData, FormatError, Truncated
from tensorwire.testing.strategies import awkward_values, raw_words, weight_like


def roundtrip(layout, words):
    ref = blocks.encode_lanes(words, layout)
    fast = cpu.encode_lanes(words, layout)
    assert bytes(fast) == ref, "numba and reference encoders must write identical bytes"
    buf = np.frombuffer(ref, dtype=np.uint8)
    np.testing.assert_array_equal(blocks.decode_lanes(buf, layout, words.size), words)
    plan = blocks.parse_lanes(buf, layout, words.size)
    np.testing.assert_array_equal(cpu.decode_lanes(buf, plan, layout), words)
    return buf


@given(raw_words())
def test_roundtrip_property(case):
    roundtrip(*case)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 1000, 4099])
def test_roundtrip_sizes(name, n):
    layout = LAYOUTS[name]
    words = weight_like(layout, n, seed=n)
    words[: min(n, awkward_values(layout).size)] = awkward_values(layout)[: min(n, awkward_values(layout).size)]
    roundtrip(layout, words)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_width_is_exercised(name):
    """Blocks whose codes span 2**w values force width w, for every w the layout allows."""
    layout = LAYOUTS[name]
    rng = np.random.default_rng(1)
    parts = []
    for w in range(layout.exp_bits + 1):
        exponent = rng.integers(0, 1 << w, size=blocks.BLOCK) + 1
        exponent = np.minimum(exponent, layout.exp_mask)
        mant = rng.integers(0, 1 << layout.man_bits, size=blocks.BLOCK)
        sign = rng.integers(0, 2, size=blocks.BLOCK)
        parts.append((sign << (layout.bits - 1)) | (exponent << layout.man_bits) | mant)
    words = np.concatenate(parts).astype(layout.uint)
    buf = roundtrip(layout, words)
    plan = blocks.parse_lanes(buf, layout)
    assert len(set(plan.widths.tolist())) >= min(3, layout.exp_bits), plan.widths


def test_outlier_does_not_widen_block():
    layout = LAYOUTS["BF16"]
    words = np.full(blocks.BLOCK, 0x3F80, dtype=np.uint16)  # all 1.0
    words[17] = 0x0000  # one zero
    words[200] = 0x7F7F  # one huge value
    buf = roundtrip(layout, words)
    plan = blocks.parse_lanes(buf, layout)
    assert plan.widths.tolist() == [0] and plan.n_exc.tolist() == [2]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_parallel_and_serial_kernels_agree(name, threads):
    """Chunks of at least cpu.SERIAL_BELOW blocks take the parallel build when threads > 1."""
    layout = LAYOUTS[name]
    words = weight_like(layout, cpu.SERIAL_BELOW * blocks.BLOCK * 3 + 11, seed=5)
    cpu.set_threads(threads)
    try:
        roundtrip(layout, words)
    finally:
        cpu.set_threads(2)


@pytest.mark.parametrize("exceptions", [15, 16, 17, 32, 48])
def test_width_ties_go_to_the_smaller_width(exceptions):
    """Blocks whose costs tie (16 exceptions cost one bit per value) pick as the reference does."""
    layout = LAYOUTS["BF16"]
    rng = np.random.default_rng(exceptions)
    exponent = np.full(blocks.BLOCK, 120)
    exponent[rng.choice(blocks.BLOCK, exceptions, replace=False)] = rng.integers(121, 255, exceptions)
    words = ((exponent << 7) | rng.integers(0, 128, blocks.BLOCK)).astype(np.uint16)
    roundtrip(layout, words)


def test_empty_and_single_value():
    for layout in LAYOUTS.values():
        roundtrip(layout, np.zeros(0, dtype=layout.uint))
        roundtrip(layout, np.array([1], dtype=layout.uint))


def test_decode_into_non_contiguous_source_values():
    layout = LAYOUTS["F32"]
    words = weight_like(layout, 3000)[::3]  # strided view
    roundtrip(layout, np.ascontiguousarray(words))
    assert bytes(cpu.encode_lanes(words, layout)) == blocks.encode_lanes(words, layout)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def stream():
    layout = LAYOUTS["BF16"]
    return layout, np.frombuffer(blocks.encode_lanes(weight_like(layout, 700), layout), dtype=np.uint8).copy()


def test_every_truncation_is_detected(stream):
    layout, buf = stream
    for cut in range(buf.size):
        with pytest.raises(FormatError):
            blocks.parse_lanes(buf[:cut], layout, 700)


def test_trailing_bytes_are_rejected(stream):
    layout, buf = stream
    with pytest.raises(CorruptData):
        blocks.parse_lanes(np.concatenate([buf, [0]]).astype(np.uint8), layout, 700)


def test_wrong_value_count(stream):
    layout, buf = stream
    with pytest.raises(CorruptData, match="expects 701"):
        blocks.parse_lanes(buf, layout, 701)


def test_width_larger_than_exponent(stream):
    layout, buf = stream
    buf[blocks.HEADER.size] = 9
    with pytest.raises(CorruptData, match="width"):
        blocks.parse_lanes(buf, layout, 700)


def test_reserved_bytes(stream):
    layout, buf = stream
    buf[2] = 1
    with pytest.raises(CorruptData, match="reserved"):
        blocks.parse_lanes(buf, layout, 700)


def test_exception_position_past_end():
    layout = LAYOUTS["BF16"]
    words = np.full(300, 0x3F80, dtype=np.uint16)
    words[299] = 0
    buf = np.frombuffer(blocks.encode_lanes(words, layout), dtype=np.uint8).copy()
    plan = blocks.parse_lanes(buf, layout)
    buf[plan.exc_pos_at] = 250  # block 1 holds only 44 values
    with pytest.raises(CorruptData, match="past the last value"):
        blocks.parse_lanes(buf, layout)


def test_absurd_count_fails_before_allocating():
    layout = LAYOUTS["BF16"]
    header = blocks.HEADER.pack(blocks.MODE_LANES, 0, 0, 0, 2**32 - 1, 0)
    with pytest.raises(Truncated):
        blocks.parse_lanes(np.frombuffer(header + bytes(100), dtype=np.uint8), layout)


def test_exception_count_mismatch(stream):
    layout, buf = stream
    nb = blocks.n_blocks(700)
    buf[blocks.HEADER.size + nb] ^= 1
    with pytest.raises(CorruptData, match="exception counts"):
        blocks.parse_lanes(buf, layout, 700)


def test_one_thread_limits_numba_and_blas_then_restores_them():
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    np.ones((4, 4)) @ np.ones((4, 4))  # numpy's BLAS is loaded
    before_numba, before_blas = cpu.get_threads(), blas_threads()
    with cpu.one_thread():
        assert cpu.get_threads() == 1
        assert blas_threads() and set(blas_threads()) == {1}
    assert cpu.get_threads() == before_numba and blas_threads() == before_blas
