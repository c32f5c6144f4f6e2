"""vLLM's paged KV cache (CPU backend) <-> tensorwire's per-token keys and values, whole blocks at a time.

vLLM's CPU attention backend gives each attention layer one tensor of shape
``(num_blocks, kv_heads, block_size, 2 * head_dim)``. How the keys and values of one
``(block, head)`` tile are packed inside its ``2 * block_size * head_dim`` values depends on
the kernel ISA vLLM picked: with ``vec`` (x86 float32) the keys are stored transposed,
``[head_dim, block_size]``, then the values as ``[block_size, head_dim]``; ``amx``, ``neon``
and the others pack differently. Rather than hard-code each, :meth:`TileLayout.probe`
asks vLLM's own cache-write kernel where each ``(token, channel)`` of a key and of a value
lands (it writes known numbers into a scratch block), so that reading and writing are one
gather or scatter with the index found, exact for every ISA whose packing is a
permutation of the tile. Anything else is :class:`UnsupportedLayout`.

Only whole blocks move: a block is the unit vLLM allocates, and the tensorwire pool's and
transfer's blocks are multiples of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import TensorwireError, require

__all__ = ["TileLayout", "UnsupportedLayout"]


class UnsupportedLayout(TensorwireError, ValueError):
    """vLLM's KV-cache tiles are not a permutation of (token, channel) keys and values."""


WriteFn = Callable[[Any, Any, Any, Any], None]  # (keys [T, H, D], values [T, H, D], cache, slot_mapping [T])


@dataclass(frozen=True)
class TileLayout:
    """Where key ``(t, d)`` and value ``(t, d)`` of a block sit in its tile (flat indices, per head)."""

    block_size: int
    head_dim: int
    key_index: Any  # torch.int64 [block_size * head_dim]: tile offset of key (t, d) at t * head_dim + d
    value_index: Any

    @classmethod
    def probe(cls, write: WriteFn, *, block_size: int, kv_heads: int, head_dim: int, dtype: Any) -> TileLayout:
        """Find the layout by writing known numbers with vLLM's kernel ``write`` into a scratch block.

        Key ``(t, d)`` is written as ``+(b + 1)`` and value ``(t, d)`` as ``-(b + 1)``, where
        ``b`` is first the low and then the high byte of ``t * head_dim + d``: numbers of
        magnitude at most 256 are exact in bfloat16 and float16 too, and 0 marks a tile
        value the kernel did not write.
        """
        torch = require("torch")
        n = block_size * head_dim
        ids = torch.arange(n, dtype=torch.int64).view(block_size, 1, head_dim).expand(block_size, kv_heads, head_dim)
        slots = torch.arange(block_size, dtype=torch.int64)
        passes = []
        for byte in (ids % 256, ids // 256):
            cache = torch.zeros((1, kv_heads, block_size, 2 * head_dim), dtype=dtype)
            marks = (byte + 1).to(dtype).contiguous()
            write(marks, (-marks).contiguous(), cache, slots)
            passes.append(cache[0, 0].reshape(-1).to(torch.float32))
        low, high = passes
        if bool((low == 0).any()) or not torch.equal(low > 0, high > 0):
            raise UnsupportedLayout(f"vLLM's kernel wrote {int((low != 0).sum())} of the {2 * n} values of a KV-cache "
                                    "tile, or moved them between passes; tensorwire cannot map this layout")  # fmt: skip
        number = (low.abs() - 1).to(torch.int64) + 256 * (high.abs() - 1).to(torch.int64)
        found = []
        for which in (low > 0, low < 0):
            offsets = torch.nonzero(which).flatten()
            numbers = number[offsets]
            if offsets.numel() != n or not torch.equal(torch.sort(numbers).values, torch.arange(n)):
                raise UnsupportedLayout(f"vLLM's KV-cache tile is not a permutation of {block_size} tokens x {head_dim} "
                                        "channels of keys and of values; tensorwire cannot map this layout")  # fmt: skip
            index = torch.empty(n, dtype=torch.int64)
            index[numbers] = offsets
            found.append(index)
        return cls(block_size, head_dim, found[0], found[1])

    def read(self, cache: Any, block_ids: Sequence[int]) -> tuple[Any, Any]:
        """Keys and values of ``block_ids`` (in that order), each ``[kv_heads, len(block_ids) * block_size, head_dim]``."""
        torch = require("torch")
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        tiles = cache.index_select(0, ids).reshape(len(ids), cache.shape[1], -1)
        out = []
        for index in (self.key_index, self.value_index):
            part = tiles.index_select(2, index).view(len(ids), cache.shape[1], self.block_size, self.head_dim)
            out.append(part.permute(1, 0, 2, 3).reshape(cache.shape[1], len(ids) * self.block_size, self.head_dim))
        return out[0], out[1]

    def write(self, cache: Any, block_ids: Sequence[int], keys: Any, values: Any) -> None:
        """Put ``keys`` and ``values`` (``[kv_heads, len(block_ids) * block_size, head_dim]``) in ``block_ids``."""
        torch = require("torch")
        ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        heads = cache.shape[1]
        tiles = torch.empty((len(ids), heads, 2 * self.block_size * self.head_dim), dtype=cache.dtype)
        for index, part in ((self.key_index, keys), (self.value_index, values)):
            blocks = part.reshape(heads, len(ids), self.block_size * self.head_dim).permute(1, 0, 2)
            tiles[:, :, index] = blocks.to(cache.dtype)
        cache[ids] = tiles.view(len(ids), heads, self.block_size, 2 * self.head_dim)
