"""Mode-2 (huffman) stream: numba kernels against the reference, the code, every error case."""

import heapq

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorwire.codec import EnecCodec, chunks, cpu, cpu_huffman, encode_chunk, entropy
from tensorwire.codec.blocks import BLOCK, MODE_HUFFMAN, n_blocks
from tensorwire.codec.planes import LAYOUTS
from tensorwire.errors import CorruptData, FormatError, Truncated
from tensorwire.testing.strategies import awkward_values, raw_words, weight_like

NAMES = sorted(LAYOUTS)
IMPLS = ("reference", "cpu")


def roundtrip(layout, words) -> np.ndarray:
    """Both encoders write the same bytes; both decoders give the words back."""
    ref = chunks.encode_huffman(words, layout, impl="reference")
    fast = chunks.encode_huffman(words, layout, impl="cpu")
    assert fast.tobytes() == ref.tobytes(), "numba and reference encoders must write identical bytes"
    for impl in IMPLS:
        np.testing.assert_array_equal(chunks.decode_huffman(ref, layout, words.size, impl=impl), words)
    return ref.copy()


def decode_outcome(buf, layout, n, impl):
    """The decoded words, or the error class: what a caller would see."""
    try:
        return chunks.decode_huffman(buf, layout, n, impl=impl)
    except FormatError as exc:
        return type(exc)


def same_outcome(a, b) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.tobytes() == b.tobytes()
    return a is b


# ----------------------------------------------------------------------------- round trips


@given(raw_words(max_size=700))
def test_roundtrip_property(case):
    layout, words = case
    if words.size == 0:
        for impl in IMPLS:
            with pytest.raises(ValueError):
                chunks.encode_huffman(words, layout, impl=impl)
        return
    roundtrip(layout, words)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 255, 256, 257, 4 * BLOCK + 3, 4099])
def test_roundtrip_sizes(name, n):
    layout = LAYOUTS[name]
    words = weight_like(layout, n, seed=n)
    special = awkward_values(layout)
    k = min(n, special.size)
    words[:k] = special[:k]
    roundtrip(layout, words)


@pytest.mark.parametrize("name", NAMES)
def test_awkward_values(name):
    """NaN payloads, infinities, subnormals, -0.0: bit patterns that must survive exactly."""
    layout = LAYOUTS[name]
    special = awkward_values(layout)
    roundtrip(layout, special)
    roundtrip(layout, np.tile(special, 80))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which", ["zero", "minus-inf"])
@pytest.mark.parametrize("n", [1, 300])
def test_single_distinct_value(name, which, n):
    """One symbol: length 1, plus the smallest other symbol so that the code is complete."""
    layout = LAYOUTS[name]
    word = 0 if which == "zero" else awkward_values(layout)[8]
    words = np.full(n, word, dtype=layout.uint)
    buf = roundtrip(layout, words)
    plan = entropy.parse_huffman(buf, layout, n)
    symbol = int(entropy.block_symbols(words[:1], layout)[0][0])
    partner = 1 if symbol == 0 else 0
    assert plan.table_bits == 1
    assert np.flatnonzero(plan.lengths).tolist() == sorted([symbol, partner])
    assert plan.sizes.tolist() == [(min(BLOCK, n - b * BLOCK) + 7) // 8 for b in range(n_blocks(n))]


def test_codes_are_length_limited():
    """Fibonacci counts make an unrestricted Huffman code 18 deep; the stream caps it at 12."""
    layout = LAYOUTS["F8_E4M3"]  # one symbol per byte value: easy to control
    fib = [1, 1]
    while len(fib) < 19:
        fib.append(fib[-1] + fib[-2])
    words = np.repeat(np.arange(len(fib), dtype=np.uint8), fib)
    np.random.default_rng(0).shuffle(words)
    assert max(entropy._huffman_depths(fib)) > entropy.MAX_CODE_BITS
    buf = roundtrip(layout, words)
    plan = entropy.parse_huffman(buf, layout)
    assert plan.table_bits == int(plan.lengths.max()) <= entropy.MAX_CODE_BITS
    assert np.count_nonzero(plan.lengths) == len(fib)  # flattening keeps every symbol


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["BF16"])
def test_parallel_and_serial_kernels_agree(name, threads):
    """Chunks of at least SERIAL_BELOW blocks take the parallel build when threads > 1.

    One layout: the builds share the per-layout code, which the serial build runs for
    every layout elsewhere, and each parallel build costs seconds to compile.
    """
    layout = LAYOUTS[name]
    words = weight_like(layout, cpu_huffman.SERIAL_BELOW * BLOCK * 3 + 11, seed=5)
    before = cpu.get_threads()
    cpu.set_threads(threads)
    try:
        buf = chunks.encode_huffman(words, layout, impl="cpu")
        np.testing.assert_array_equal(chunks.decode_huffman(buf, layout, words.size, impl="cpu"), words)
    finally:
        cpu.set_threads(before)
    # The reference decoder is slow in Python, so compare bytes with the reference encoder only.
    assert buf.tobytes() == chunks.encode_huffman(words, layout, impl="reference").tobytes()


def test_decode_into_out_and_bytes_input():
    layout = LAYOUTS["F16"]
    words = weight_like(layout, 1000)
    buf = chunks.encode_huffman(words, layout)
    for impl in IMPLS:
        out = np.empty_like(words)
        assert chunks.decode_huffman(buf.tobytes(), layout, words.size, out, impl=impl) is out
        np.testing.assert_array_equal(out, words)
    with pytest.raises(ValueError, match="out must be"):
        chunks.decode_huffman(buf, layout, words.size, np.empty(999, dtype=layout.uint))
    with pytest.raises(ValueError, match="unknown impl"):
        chunks.decode_huffman(buf, layout, words.size, impl="gpu")


@pytest.mark.parametrize("name", NAMES)
def test_level_max_through_the_frame(name):
    """EnecCodec(level="max") writes mode-2 chunks and reads them back bit for bit."""
    layout = LAYOUTS[name]
    words = weight_like(layout, 5000, seed=3)
    words[:13] = awkward_values(layout)
    dtype = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
             "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[name]  # fmt: skip
    values = words.view(dtype).reshape(50, 100)
    codec = EnecCodec(level="max", chunk_bytes=4096)
    decoded = codec.decode(codec.encode(values))
    assert decoded.dtype == values.dtype and decoded.tobytes() == values.tobytes()
    assert encode_chunk(words, name, level="max")[0] == MODE_HUFFMAN


def test_ratio_on_real_weights(minilm_path):
    """The bf16 cast of all-MiniLM-L6-v2 stays within 2% of its exponent-entropy bound."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    chunk = 2 << 20  # values per 4 MiB chunk, as the frame cuts them
    original = stored = 0
    for t in load_file(minilm_path).values():
        if not t.is_floating_point():
            continue
        words = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16).ravel()
        for i in range(0, words.size, chunk):
            original += words[i : i + chunk].nbytes
            stored += encode_chunk(words[i : i + chunk], "BF16", level="max").size
    assert original / stored >= 1.47, original / stored


# ----------------------------------------------------------------------------- the code


def optimal_cost(counts) -> int:
    """Bits of an unrestricted Huffman code: the sum of all merged weights."""
    heap = [int(c) for c in counts if c > 0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


@given(st.lists(st.integers(0, 2**24), min_size=2, max_size=256).filter(lambda c: any(c)))
def test_huffman_lengths_are_complete_and_limited(counts):
    counts = np.array(counts, dtype=np.int64)
    lengths = entropy.huffman_lengths(counts)
    present = lengths > 0
    assert int(lengths.max()) <= entropy.MAX_CODE_BITS
    assert sum(2.0 ** -int(v) for v in lengths[present]) == 1.0  # complete: Kraft sum 1
    assert (present >= (counts > 0)).all()
    weights = counts[counts > 0].tolist()
    if len(weights) > 1:
        assert (present == (counts > 0)).all()
        cost = int((counts * lengths).sum())
        assert cost >= optimal_cost(counts)
        if max(entropy._huffman_depths(weights)) <= entropy.MAX_CODE_BITS:
            assert cost == optimal_cost(counts)  # the counts are only flattened when the limit binds


@given(st.lists(st.integers(0, 5000), min_size=2, max_size=256).filter(lambda c: np.count_nonzero(c) > 0))
def test_decode_tables_agree_with_the_spec(counts):
    """The numba tables equal ``entropy.decode_table``; multi entries are repeated lookups."""
    lengths = entropy.huffman_lengths(np.array(counts))
    table_bits = int(lengths.max())
    table, multi = cpu_huffman.decode_tables(lengths, table_bits)
    np.testing.assert_array_equal(table, entropy.decode_table(lengths, table_bits))
    low = (1 << table_bits) - 1
    for peek in np.random.default_rng(len(counts)).integers(0, 1 << cpu_huffman.PEEK_BITS, 64).tolist():
        entry = int(multi[peek])
        count, used = entry >> 28, (entry >> 24) & 15
        pos, expected = 0, []
        while len(expected) < cpu_huffman.MULTI:
            e = int(table[(peek >> pos) & low])
            if pos + (e >> 8) > cpu_huffman.PEEK_BITS:
                break
            expected.append(e & 0xFF)
            pos += e >> 8
        assert count == len(expected) >= 1 and used == pos
        assert [(entry >> (8 * k)) & 0xFF for k in range(count)] == expected


def test_canonical_codes_follow_length_then_symbol():
    lengths = np.zeros(8, dtype=np.uint8)
    lengths[[1, 3, 4, 6]] = [2, 1, 3, 3]  # symbol 3: '0', 1: '10', 4: '110', 6: '111'
    codes = entropy.canonical_codes(lengths)
    assert [int(codes[s]) for s in (3, 1, 4, 6)] == [0b0, 0b01, 0b011, 0b111]  # bit-reversed


# ----------------------------------------------------------------------------- errors


@pytest.fixture(params=["BF16", "F8_E4M3"])
def stream(request):
    layout = LAYOUTS[request.param]
    words = weight_like(layout, 300, seed=1)
    return layout, words, roundtrip(layout, words)


def raises_everywhere(kind, buf, layout, n, match=None):
    for impl in IMPLS:
        with pytest.raises(kind, match=match):
            chunks.decode_huffman(buf, layout, n, impl=impl)


def test_every_truncation_is_detected(stream):
    layout, words, buf = stream
    for cut in range(buf.size):
        raises_everywhere(Truncated, buf[:cut], layout, words.size)


def test_trailing_bytes_are_rejected(stream):
    layout, words, buf = stream
    raises_everywhere(CorruptData, np.concatenate([buf, [0]]).astype(np.uint8), layout, words.size, "exactly")


def header_case(buf, field, value):
    buf = buf.copy()
    if field == "n":
        buf[4:8] = np.frombuffer(np.uint32(value).tobytes(), dtype=np.uint8)
    else:
        buf[{"mode": 0, "table_bits": 1, "reserved": 2}[field]] = value
    return buf


@pytest.mark.parametrize(
    "field, value, expected_n, kind, match",
    [
        ("mode", 1, 300, FormatError, "expected a mode-2"),
        ("mode", 9, 300, FormatError, "found mode 9"),
        ("reserved", 1, 300, CorruptData, "reserved"),
        ("table_bits", 0, 300, CorruptData, "table_bits is 0"),
        ("table_bits", 13, 300, CorruptData, "table_bits is 13"),
        ("n", 301, 300, CorruptData, "expects 300"),
        ("n", 0, None, CorruptData, "0 values"),
        ("n", 2**32 - 1, None, Truncated, "at least"),
    ],
)
def test_header_fields(stream, field, value, expected_n, kind, match):
    layout, _, buf = stream
    raises_everywhere(kind, header_case(buf, field, value), layout, expected_n, match)


def test_value_count_is_checked_against_the_stream_size():
    """A header count that changes the plane sizes no longer matches the stream's length.

    Without byte planes (8-bit floats) a count one higher can decode from a block's zero
    padding bits: the count is authenticated by the caller's ``expected_n`` (the chunk
    index) and the checksums, as the other header tests show.
    """
    layout = LAYOUTS["BF16"]
    buf = roundtrip(layout, weight_like(layout, 300, seed=1))
    raises_everywhere(Truncated, header_case(buf, "n", 301), layout, None, "needs exactly")


def test_table_bits_shorter_than_a_code(stream):
    layout, words, buf = stream
    buf[1] = int(buf[entropy.HEADER.size : entropy.HEADER.size + 256].max()) - 1
    raises_everywhere(CorruptData, buf, layout, words.size, "exceeds")


@pytest.mark.parametrize("change", ["longer", "extra", "too-long"])
def test_incomplete_or_overfull_code(stream, change):
    layout, words, buf = stream
    lengths = buf[entropy.HEADER.size : entropy.HEADER.size + entropy.alphabet_size(layout)]
    present = np.flatnonzero(lengths)
    if change == "longer":  # Kraft sum below 1: some peeks would decode nothing
        lengths[int(present[np.argmin(lengths[present])])] += 1  # the shortest stays <= table_bits
        match = "Kraft"
    elif change == "extra":  # above 1: codes would overlap
        lengths[int(np.flatnonzero(lengths == 0)[0])] = 1
        match = "Kraft"
    else:
        lengths[int(present[0])] = 13
        match = "exceeds"
    raises_everywhere(CorruptData, buf, layout, words.size, match)


def test_block_size_out_of_range(stream):
    layout, words, buf = stream
    sizes_at = entropy.HEADER.size + entropy.alphabet_size(layout)
    buf[sizes_at : sizes_at + 2] = 0
    raises_everywhere(CorruptData, buf, layout, words.size, "block 0 declares 0")


def test_block_sizes_swapped_keep_the_total(stream):
    """Sizes that sum right but split wrong: each block decodes from the wrong bytes."""
    layout, words, buf = stream
    sizes_at = entropy.HEADER.size + entropy.alphabet_size(layout)
    sizes = buf[sizes_at : sizes_at + 4].view("<u2")
    sizes[0] += 1
    sizes[1] -= 1
    raises_everywhere(CorruptData, buf, layout, words.size, "block")


def test_nonzero_padding(stream):
    layout, words, buf = stream
    buf[-1] = 1
    raises_everywhere(CorruptData, buf, layout, words.size, "padding")


def test_nonzero_block_padding_bits(stream):
    layout, words, buf = stream
    plan = entropy.parse_huffman(buf, layout, words.size)
    consumed = np.empty(plan.sizes.size, dtype=np.int64)
    symbols, _ = entropy.block_symbols(words, layout)
    code_len = plan.lengths[symbols].astype(np.int64)
    for b in range(plan.sizes.size):
        consumed[b] = code_len[b * BLOCK : (b + 1) * BLOCK].sum()
    partial = np.flatnonzero(consumed % 8)
    if partial.size == 0:
        pytest.skip("every block ends on a byte boundary")
    b = int(partial[0])
    buf[plan.block_offsets[b + 1] - 1] |= 0x80
    raises_everywhere(CorruptData, buf, layout, words.size, f"block {b}")


@pytest.mark.parametrize("n", [300, 5000])
def test_corrupt_bitstream_never_misbehaves(n):
    """A flipped bitstream byte raises CorruptData or decodes to some words, the same in both
    implementations, and what lies past the buffer never matters (nothing reads there)."""
    layout = LAYOUTS["BF16"]
    words = weight_like(layout, n, seed=2)
    buf = roundtrip(layout, words)
    plan = entropy.parse_huffman(buf, layout, n)
    first, end = int(plan.block_offsets[0]), int(plan.block_offsets[-1])
    rng = np.random.default_rng(n)
    positions = np.arange(first, end) if end - first <= 200 else rng.choice(np.arange(first, end), 120, replace=False)
    for at in positions.tolist():
        for flip in (0x01, 0x80, 0xFF):
            bad = buf.copy()
            bad[at] ^= flip
            expected = decode_outcome(bad, layout, n, "reference")
            assert expected is CorruptData or isinstance(expected, np.ndarray)
            # The stream inside a larger buffer whose tail is noise: same outcome.
            host = rng.integers(0, 256, bad.size + 64).astype(np.uint8)
            host[: bad.size] = bad
            assert same_outcome(decode_outcome(host[: bad.size], layout, n, "cpu"), expected)
