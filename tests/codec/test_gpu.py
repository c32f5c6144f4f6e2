"""Triton decoder of chunk streams, run in Triton's interpreter on CPU tensors.

The kernels are checked bit for bit against the numpy reference decoder (and the original
words) for every float layout: NaN payloads, infinities, subnormals, -0.0, 1 and 257
values, blocks with exceptions, every symbol width 0..8, several program sizes. One test,
marked ``gpu``, decodes real weights on a CUDA device with the compiled kernel.

``TRITON_INTERPRET=1`` is set before triton is first imported here and restored at once;
the ``interpret`` fixture sets it again for each test of this module only (the decoder
reads it when it builds its kernels), so no other test module sees it.
"""

import os
import sys

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401
except ImportError:
    triton = None
finally:
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="torch is not installed; the device decoder needs it")
if triton is None:
    pytest.skip(
        "triton is not installed (pip install 'tensorwire[gpu]'): the Triton decoder is not tested",
        allow_module_level=True,
    )

from tensorwire.codec import blocks, chunks, gpu  # noqa: E402
from tensorwire.codec.planes import LAYOUTS  # noqa: E402
from tensorwire.errors import CorruptData, MissingDependency, Truncated  # noqa: E402
from tensorwire.testing.strategies import awkward_values, weight_like  # noqa: E402

WORD = {8: torch.uint8, 16: torch.int16, 32: torch.int32}
NAMES = sorted(LAYOUTS)


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def poisoned(layout, n, dtype=None):
    """An output tensor full of a pattern no test input decodes to everywhere."""
    out = torch.empty(n, dtype=dtype or WORD[layout.bits])
    out.view(torch.uint8).fill_(0xA5)
    return out


def words_of(out, layout):
    return out.reshape(-1).view(WORD[layout.bits]).numpy().view(layout.uint)


def decode_lanes(stream, layout, n, **options):
    """Decode a mode-1 stream with decode_lanes_device; return the words."""
    buf = np.frombuffer(stream, dtype=np.uint8) if isinstance(stream, bytes) else stream
    plan = blocks.parse_lanes(buf, layout, n)
    out = poisoned(layout, n)
    gpu.decode_lanes_device(gpu.upload_chunk(buf, "cpu"), plan, layout, out, host_buf=buf, **options)
    return words_of(out, layout)


def check_lanes(words, layout, **options):
    """Encode with the reference, decode on the 'device', compare with reference and input."""
    stream = np.frombuffer(blocks.encode_lanes(words, layout), dtype=np.uint8)
    ref = blocks.decode_lanes(stream, layout, words.size)
    got = decode_lanes(stream, layout, words.size, **options)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, words)
    return blocks.parse_lanes(stream, layout, words.size)


def forced_widths(layout, seed=0):
    """One block per code width w = 0..exp_bits (symbol width w + rem_bits), in shuffled order.

    Block w holds every exponent 0..2**w-1 equally often, so any
    narrower width would cost at least 128 exceptions and w is the cheapest choice.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for w in range(layout.exp_bits + 1):
        codes = np.arange(blocks.BLOCK) % (1 << w)
        exponent = codes  # exponent 0 is the base the encoder picks
        mant = rng.integers(0, 1 << layout.man_bits, size=blocks.BLOCK)
        sign = rng.integers(0, 2, size=blocks.BLOCK)
        parts.append(((sign << (layout.bits - 1)) | (exponent << layout.man_bits) | mant).astype(np.uint64))
    order = rng.permutation(len(parts))
    return np.concatenate([parts[i] for i in order]).astype(layout.uint)


# ----------------------------------------------------------------------------- mode 1 parity


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 257, 1500])
def test_awkward_values_every_layout(name, n):
    layout = LAYOUTS[name]
    words = weight_like(layout, n, seed=n)
    special = awkward_values(layout)
    k = min(n, special.size)
    words[:k] = special[:k]  # NaN payloads, +-inf, subnormals, -0.0, the all-ones word
    if n > 300:
        words[-k:] = special[:k]  # and in the partial last block
    check_lanes(words, layout)


@pytest.mark.parametrize("name", NAMES)
def test_every_symbol_width(name):
    layout = LAYOUTS[name]
    words = forced_widths(layout)
    plan = check_lanes(words, layout, group=4)
    symbol_widths = set((plan.widths + layout.rem_bits).tolist())
    assert set(plan.widths.tolist()) == set(range(layout.exp_bits + 1)), plan.widths
    assert symbol_widths == set(range(layout.rem_bits, 9))
    # The same stream with one block per program and with every block in one program.
    for group in (1, 16):
        stream = np.frombuffer(blocks.encode_lanes(words, layout), dtype=np.uint8)
        np.testing.assert_array_equal(decode_lanes(stream, layout, words.size, group=group), words)


def test_widths_zero_to_eight_all_present():
    """BF16 and F32 have no rem bits: their symbol widths span 0..8."""
    for name in ("BF16", "F32"):
        layout = LAYOUTS[name]
        plan = check_lanes(forced_widths(layout, seed=3), layout)
        assert sorted(set(plan.widths.tolist())) == list(range(9))


@pytest.mark.parametrize("name", ["BF16", "F16", "F8_E4M3"])
def test_exceptions_across_blocks_and_patch_steps(name):
    """Ten blocks of ones with 40 zeros and huge values each: w = 0 plus exceptions,
    more exceptions per program than one patch step holds."""
    layout = LAYOUTS[name]
    one = np.uint64(((layout.exp_mask >> 1) << layout.man_bits) | 1)
    words = np.full(10 * blocks.BLOCK - 5, one, dtype=np.uint64)
    rng = np.random.default_rng(7)
    for b in range(10):
        where = b * blocks.BLOCK + rng.choice(blocks.BLOCK - 5, size=40, replace=False)
        words[where] = rng.choice([0, 1 << (layout.bits - 1), (layout.exp_mask - 1) << layout.man_bits], size=40)
    words = words.astype(layout.uint)
    plan = check_lanes(words, layout, group=8)
    assert plan.widths.tolist() == [0] * 10
    assert int(plan.n_exc.sum()) == 400 > gpu.EXC_TILE
    check_lanes(words, layout, group=2)


def test_single_outlier_block_and_bfloat16_out():
    layout = LAYOUTS["BF16"]
    words = np.full(blocks.BLOCK, 0x3F80, dtype=np.uint16)  # all 1.0
    words[17] = 0x0000
    words[200] = 0x7F7F
    stream = np.frombuffer(blocks.encode_lanes(words, layout), dtype=np.uint8)
    assert blocks.parse_lanes(stream, layout).n_exc.tolist() == [2]
    out = torch.full((16, 16), float("nan"), dtype=torch.bfloat16)  # a 2-d bfloat16 target
    gpu.decode_chunk_device(stream, "BF16", words.size, out)
    np.testing.assert_array_equal(out.view(torch.int16).numpy().reshape(-1).view(np.uint16), words)


def test_decode_into_a_byte_slice_of_a_larger_buffer():
    layout = LAYOUTS["F32"]
    words = weight_like(layout, 700, seed=9)
    stream = chunks.encode_chunk(words, "F32", impl="reference")
    assert stream[0] == blocks.MODE_LANES
    buf = torch.full((4 + 700 * 4 + 4,), 0xA5, dtype=torch.uint8)
    gpu.decode_chunk_device(stream, "F32", 700, buf[4:-4])
    np.testing.assert_array_equal(buf[4:-4].numpy().view(np.uint32), words)
    assert (buf[:4] == 0xA5).all() and (buf[-4:] == 0xA5).all()


def test_out_of_order_exceptions_match_the_cpu_decoder():
    """Two patches of one value (no encoder writes this): the last one wins, as on the CPU."""
    layout = LAYOUTS["BF16"]
    words = np.full(blocks.BLOCK, 0x3F80, dtype=np.uint16)
    words[[3, 9, 30]] = 0
    stream = np.frombuffer(blocks.encode_lanes(words, layout), dtype=np.uint8).copy()
    plan = blocks.parse_lanes(stream, layout)
    assert plan.n_exc.tolist() == [3]
    stream[plan.exc_pos_at : plan.exc_pos_at + 3] = [9, 3, 9]  # value 9 patched twice
    stream[plan.exc_val_at : plan.exc_val_at + 3] = [0x01, 0x02, 0x7E]
    ref = blocks.decode_lanes(stream, layout)
    assert ref[9] >> 7 == 0x7E and ref[3] >> 7 == 0x02
    got = decode_lanes(stream, layout, words.size, cpu_impl="reference")
    np.testing.assert_array_equal(got, ref)


def test_64_bit_offsets_path():
    """The BIG variant (chunks of 2 GiB and more) computes the same values."""
    import dataclasses

    layout = LAYOUTS["F32"]
    words = weight_like(layout, 1300, seed=2)
    stream = np.frombuffer(blocks.encode_lanes(words, layout), dtype=np.uint8)
    plan = blocks.parse_lanes(stream, layout)
    dev = gpu.upload_chunk(stream, "cpu")
    dp = gpu.upload_plan(dev, plan, layout, stream)
    assert not dp.big and dp.offsets.dtype == torch.int32
    dp = dataclasses.replace(dp, big=True, offsets=dp.offsets.long(), exc_offsets=dp.exc_offsets.long())
    out = poisoned(layout, words.size)
    gpu.decode_lanes_device(dev, plan, layout, out, device_plan=dp, group=4)
    np.testing.assert_array_equal(words_of(out, layout), words)


def test_upload_aligns_the_planes():
    layout = LAYOUTS["BF16"]
    words = weight_like(layout, 3 * blocks.BLOCK)
    stream = np.frombuffer(blocks.encode_lanes(words, layout), dtype=np.uint8)
    plan = blocks.parse_lanes(stream, layout)
    dev = gpu.upload_chunk(stream, "cpu")
    assert (dev.data_ptr() + plan.planes_at) % gpu.ALIGN == 0
    assert (dev.data_ptr() + int(plan.code_offsets[0])) % 16 == 0  # n is a multiple of 16
    np.testing.assert_array_equal(dev.numpy(), stream)


# ----------------------------------------------------------------------------- whole chunk streams


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("level", ["fast", "max"])
def test_encode_chunk_streams(name, level):
    layout = LAYOUTS[name]
    for n in (1, 600, chunks.HUFFMAN_ALWAYS_ABOVE + 1):
        words = weight_like(layout, n, seed=5)
        words[: min(n, 4)] = awkward_values(layout)[: min(n, 4)]
        stream = chunks.encode_chunk(words, name, level, impl="reference")
        # level "max" keeps mode 1 for a small chunk when that is smaller (chunks.HUFFMAN_ALWAYS_ABOVE)
        allowed = {"fast": (blocks.MODE_RAW, blocks.MODE_LANES), "max": (blocks.MODE_RAW, blocks.MODE_LANES, blocks.MODE_HUFFMAN)}
        assert stream[0] in allowed[level]
        ref = chunks.decode_chunk(stream, name, n, impl="reference")
        out = poisoned(layout, n)
        gpu.decode_chunk_device(stream, name, n, out, cpu_impl="reference")
        np.testing.assert_array_equal(out.view(torch.uint8).numpy(), ref)
        np.testing.assert_array_equal(words_of(out, layout), words)


def test_stored_chunks_and_other_dtypes():
    data = np.arange(-50, 50, dtype=np.int64)
    stream = chunks.encode_chunk(data, "I64", impl="reference")
    assert stream[0] == blocks.MODE_RAW
    out = torch.empty(100, dtype=torch.int64)
    gpu.decode_chunk_device(stream, "I64", 100, out)
    np.testing.assert_array_equal(out.numpy(), data)
    # the same, with the stream handed over as a tensor
    out.zero_()
    gpu.decode_chunk_device(torch.from_numpy(stream.copy()), "I64", 100, out)
    np.testing.assert_array_equal(out.numpy(), data)
    empty = chunks.encode_chunk(np.zeros(0, np.uint16), "BF16", impl="reference")
    gpu.decode_chunk_device(empty, "BF16", 0, torch.empty(0, dtype=torch.bfloat16))


def test_bad_streams_raise_the_cpu_errors():
    layout = LAYOUTS["F16"]
    words = weight_like(layout, 700)
    stream = np.frombuffer(blocks.encode_lanes(words, layout), dtype=np.uint8)
    out = poisoned(layout, 700)
    with pytest.raises(Truncated):
        gpu.decode_chunk_device(stream[:-1], "F16", 700, out)
    with pytest.raises(CorruptData):
        gpu.decode_chunk_device(stream, "F16", 699, poisoned(layout, 699))
    with pytest.raises(CorruptData):
        gpu.decode_chunk_device(stream, "I16", 700, out)  # a non-float chunk must be stored
    with pytest.raises(ValueError):
        gpu.decode_chunk_device(stream, "F16", 700, torch.empty(700, dtype=torch.int32))
    with pytest.raises(ValueError):
        decode_lanes(stream, layout, 700, group=3)
    with pytest.raises(ValueError):
        gpu.decode_lanes_device(torch.from_numpy(stream.copy()), blocks.parse_lanes(stream, layout),
                                layout, torch.empty(700, dtype=torch.int32))  # fmt: skip


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    layout = LAYOUTS["BF16"]
    stream = np.frombuffer(blocks.encode_lanes(weight_like(layout, 300), layout), dtype=np.uint8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="GPU"):
        gpu.decode_chunk_device(stream, "BF16", 300, torch.empty(300, dtype=torch.bfloat16))


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    assert not gpu.available()
    with pytest.raises(MissingDependency, match=r"tensorwire\[gpu\]"):
        gpu.decode_chunk_device(np.zeros(8, np.uint8), "BF16", 0, torch.empty(0, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- compiled kernel


@pytest.mark.parametrize("name, big", [("BF16", False), ("F32", True), ("F8_E4M3", False)])
def test_compiles_for_hopper_with_vector_loads(name, big):
    """The compiler (not the interpreter) accepts the kernel, and code loads are 16 bytes wide.

    Compiles for sm_90 without a GPU, with the pointer alignment ``upload_chunk`` gives.
    """
    backends = pytest.importorskip("triton.backends")
    if "nvidia" not in getattr(backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget compile API")
    layout = LAYOUTS[name]
    index = "i64" if big else "i32"
    signature = {
        "codes": "*u8", "planes": "*u8", "widths": "*u8", "offsets": "*" + index, "exc_offsets": "*" + index,
        "exc_pos": "*u8", "exc_val": "*u8", "out": "*" + {8: "u8", 16: "i16", 32: "i32"}[layout.bits],
        "n": index, "nb": "i32", "base": "i32",
    }  # fmt: skip
    constants = dict(REM=layout.rem_bits, RB=layout.raw_bytes, MAN=layout.man_bits, SIGN=layout.bits - 1,
                     EXP_MASK=layout.exp_mask, G=gpu.GROUP, BLK=blocks.BLOCK, EXC=gpu.EXC_TILE, BIG=big, PATCH=True)  # fmt: skip
    signature.update({k: "constexpr" for k in constants})
    aligned = {(k,): [["tt.divisibility", 16]] for k in (0, 1, 3, 7)}  # codes, planes, offsets, out
    try:
        source = ASTSource(fn=gpu._build(False)["lanes"], signature=signature, constexprs=constants, attrs=aligned)
    except TypeError:
        pytest.skip("this triton's ASTSource takes other arguments")
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": gpu.NUM_WARPS, "enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    assert ptx.count("ld.global.v4.b32") >= 4  # the four code lanes, 16 bytes a load
    assert "bar.sync" in ptx


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_weights_on_cuda(minilm_path, monkeypatch):
    """Real MiniLM weights (F32 and cast to BF16), one large chunk each, compiled kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from safetensors.numpy import load_file

    tensors = load_file(str(minilm_path))
    f32 = np.concatenate([t.reshape(-1) for t in tensors.values() if t.dtype == np.float32])
    bf16 = torch.from_numpy(f32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    for name, words in (("F32", f32.view(np.uint32)[: 8 << 20]), ("BF16", bf16[: 16 << 20])):
        layout = LAYOUTS[name]
        stream = chunks.encode_chunk(words, name)
        assert stream[0] == blocks.MODE_LANES
        out = torch.empty(words.size, dtype=WORD[layout.bits], device="cuda")
        out.view(torch.uint8).fill_(0xA5)
        gpu.decode_chunk_device(stream, name, words.size, out)
        torch.cuda.synchronize()
        expect = torch.from_numpy(words.view({16: np.int16, 32: np.int32}[layout.bits]))
        assert torch.equal(out.cpu(), expect)
        # the stream already on the device, and another program size
        out.view(torch.uint8).fill_(0xA5)
        dev = gpu.upload_chunk(stream, "cuda")
        gpu.decode_chunk_device(stream, name, words.size, out, device_chunk=dev, group=2, num_warps=2)
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), expect)


def test_container_tensors_decode_through_the_device_path(tmp_path):
    """TwzFile.decode_to_device (what get_tensor(name, "cuda") runs) on CPU tensors."""
    import tensorwire

    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": (torch.randn(40, 70, generator=g) * 0.02).to(torch.bfloat16),
        "f32": torch.randn(3000, generator=g),
        "ids": torch.arange(33, dtype=torch.int32),
    }
    tensorwire.save_file(tensors, tmp_path / "m.twz", chunk_bytes=2048)
    with tensorwire.open(tmp_path / "m.twz") as f:
        for name, t in tensors.items():
            got = f.decode_to_device(name, "cpu")
            assert got.dtype == t.dtype and torch.equal(got.view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), name
