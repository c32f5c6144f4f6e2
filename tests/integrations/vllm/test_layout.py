"""TileLayout: the probe finds where a kernel puts each key and value of a block, and reads and writes round trip.

The writers here stand for vLLM's cache kernels (the real one is probed in test_vllm.py,
inside the vLLM environment): ``vec_writer`` packs as vLLM's x86 ``vec`` kernel does (keys
transposed per tile), ``interleaved_writer`` as a per-token [K | V] layout would.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tensorwire.integrations.vllm.layout import TileLayout, UnsupportedLayout  # noqa: E402

BS, H, D = 16, 3, 8


def vec_writer(keys, values, cache, slots):
    nb, heads, bs, c = cache.shape
    tiles = cache.view(nb, heads, 2 * bs * (c // 2))
    d = c // 2
    k_t = tiles[..., : bs * d].view(nb, heads, d, bs)
    v = tiles[..., bs * d:].view(nb, heads, bs, d)
    for i, slot in enumerate(slots.tolist()):
        b, o = divmod(slot, bs)
        k_t[b, :, :, o] = keys[i]
        v[b, :, o, :] = values[i]


def interleaved_writer(keys, values, cache, slots):
    bs, d = cache.shape[2], cache.shape[3] // 2
    for i, slot in enumerate(slots.tolist()):
        b, o = divmod(slot, bs)
        cache[b, :, o, :d] = keys[i]
        cache[b, :, o, d:] = values[i]


def half_writer(keys, values, cache, slots):  # writes only the keys: not a layout tensorwire can read
    bs, d = cache.shape[2], cache.shape[3] // 2
    for i, slot in enumerate(slots.tolist()):
        b, o = divmod(slot, bs)
        cache[b, :, o, :d] = keys[i]


@pytest.mark.parametrize("writer", [vec_writer, interleaved_writer])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probe_maps_a_kernel_layout_and_reads_what_the_kernel_wrote(writer, dtype):
    layout = TileLayout.probe(writer, block_size=BS, kv_heads=H, head_dim=D, dtype=dtype)
    cache = torch.zeros((6, H, BS, 2 * D), dtype=dtype)
    blocks = [4, 1, 3]  # vLLM hands out block ids in any order
    keys = torch.randn(len(blocks) * BS, H, D).to(dtype)
    values = torch.randn(len(blocks) * BS, H, D).to(dtype)
    slots = torch.tensor([blocks[t // BS] * BS + t % BS for t in range(len(blocks) * BS)])
    writer(keys, values, cache, slots)
    got_k, got_v = layout.read(cache, blocks)
    assert torch.equal(got_k, keys.permute(1, 0, 2)) and torch.equal(got_v, values.permute(1, 0, 2))

    other = torch.zeros_like(cache)
    layout.write(other, [5, 2, 0], got_k, got_v)
    again_k, again_v = layout.read(other, [5, 2, 0])
    assert torch.equal(again_k, got_k) and torch.equal(again_v, got_v)
    assert torch.equal(other[[5, 2, 0]], cache[blocks])  # bit for bit the tiles the kernel would have written


def test_a_kernel_that_leaves_part_of_the_tile_unwritten_is_refused():
    with pytest.raises(UnsupportedLayout, match="cannot map this layout"):
        TileLayout.probe(half_writer, block_size=BS, kv_heads=H, head_dim=D, dtype=torch.float32)
