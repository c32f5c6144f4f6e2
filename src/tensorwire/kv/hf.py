"""transformers caches <-> tensorwire KV data, prefill with observation capture, continuation.

* :func:`prefill` runs the prompt once and returns the ``DynamicCache`` and, if asked, the
  last ``observe_window`` query vectors of every layer after RoPE (for attention-score
  selectors such as SnapKV). Queries are recomputed from the attention input inside a
  forward pre-hook, for the window only: no second forward pass.
* :func:`cache_to_data` / :func:`data_to_cache` convert between a ``DynamicCache`` and
  :class:`~tensorwire.kv.stage.KVCacheData`.
* A decoded cache is a :class:`PositionedCache`: a ``DynamicCache`` that remembers the
  original sequence length and the positions it kept. :func:`forward` and
  :func:`generate` continue from it with the RoPE positions of the original sequence
  (``seq_len``, ``seq_len + 1``, ...), which is what evicted caches need.

The offline model itself is loaded by :func:`tensorwire.models.load_smollm2`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from ..errors import require
from ..models import load_smollm2  # the README's documented path since 0.1; it lives in tensorwire.models
from .stage import KVCacheData, KVLayer, Observations

__all__ = [
    "PositionedCache",  # noqa: F822 (defined on first use by the module's __getattr__: transformers is optional)
    "positioned_cache_class",
    "load_smollm2",
    "model_shape",
    "cache_keyword",
    "prefill",
    "cache_to_data",
    "data_to_cache",
    "forward",
    "generate",
]


def _torch():
    return require("torch")


def model_shape(model) -> dict[str, int]:
    """``n_layers``, ``kv_heads``, ``q_heads``, ``head_dim`` and ``sliding_layers`` of a decoder-only model.

    ``sliding_layers`` counts the sliding-window attention layers (``config.layer_types``),
    whose caches hold only the window.
    """
    config = model.config
    q_heads = config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or []
    return {
        "n_layers": config.num_hidden_layers,
        "kv_heads": getattr(config, "num_key_value_heads", None) or q_heads,
        "q_heads": q_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // q_heads,
        "sliding_layers": sum(kind == "sliding_attention" for kind in layer_types),
    }


@lru_cache(maxsize=1)
def positioned_cache_class():
    """The :class:`PositionedCache` class (defined on first use: transformers is optional)."""
    transformers = require("transformers")

    class PositionedCache(transformers.DynamicCache):
        """A ``DynamicCache`` that knows the original length and the kept positions.

        ``seq_len`` is the position of the next token; ``positions[i]`` is layer ``i``'s
        ``(batch, kv_heads, kept)`` array of original positions.
        """

        seq_len: int = 0
        positions: list[np.ndarray] | None = None

    return PositionedCache


@lru_cache(maxsize=1)
def reserved_layer_class():
    """A ``DynamicLayer`` that writes new tokens into room reserved ahead (defined on first use).

    ``DynamicLayer.update`` concatenates the whole layer with the new tokens, a copy of the
    cache at every generated token. This layer keeps ``keys``/``values`` as views of
    larger buffers and writes new tokens in place; when the room runs out (or ``keys`` was
    replaced, e.g. by a batch reorder) it moves to buffers twice as large.
    """
    torch = _torch()
    transformers = require("transformers")

    class ReservedLayer(transformers.DynamicLayer):
        def __init__(self, reserve: int):
            super().__init__()
            self.reserve = reserve
            self._room: tuple | None = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            held, add = self.keys.shape[-2] if self.keys.numel() else 0, key_states.shape[-2]
            room = self._room
            fits = (
                room is not None
                and held + add <= room[0].shape[-2]
                and room[0].shape[:-2] == key_states.shape[:-2]
                and self.keys.data_ptr() == room[0].data_ptr()
                and self.values.data_ptr() == room[1].data_ptr()
            )
            if not fits:
                size = held + add + (self.reserve if room is None else held + add)
                k = key_states.new_empty((*key_states.shape[:-2], size, key_states.shape[-1]))
                v = value_states.new_empty((*value_states.shape[:-2], size, value_states.shape[-1]))
                if held:
                    k[..., :held, :] = self.keys
                    v[..., :held, :] = self.values
                self._room = room = (k, v)
            with torch.no_grad():
                room[0][..., held : held + add, :] = key_states
                room[1][..., held : held + add, :] = value_states
            self.keys, self.values = room[0][..., : held + add, :], room[1][..., : held + add, :]
            return self.keys, self.values

    return ReservedLayer


def __getattr__(name: str):
    if name == "PositionedCache":
        return positioned_cache_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@lru_cache(maxsize=None)
def _forward_cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters  # follows deprecate_kwarg's __wrapped__
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model) -> str:
    """The name under which ``model``'s forward takes the KV cache.

    ``"cache"`` where the installed transformers has it (transformers 5 renamed
    ``past_key_values`` to ``cache`` and answers the old name with a FutureWarning), else
    ``"past_key_values"`` (older releases, which ``transformers>=4.45`` still allows).
    """
    return _forward_cache_keyword(type(model))


def _attention_modules(model) -> list:
    layers = model.model.layers
    return [layer.self_attn for layer in layers]


@contextmanager
def _observe(model, window: int) -> Iterator[list]:
    """Capture each layer's last ``window`` queries (after RoPE) during one forward pass."""
    torch = _torch()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured: list = [None] * len(_attention_modules(model))

    def hook_for(index: int, attn):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            h = hidden[:, -window:]
            q = attn.q_proj(h).view(*h.shape[:-1], -1, attn.head_dim).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos[:, -window:], sin[:, -window:])
            captured[index] = q.detach().to(torch.float32).cpu().numpy()

        return hook

    handles = [attn.register_forward_pre_hook(hook_for(i, attn), with_kwargs=True) for i, attn in enumerate(_attention_modules(model))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def prefill(model, input_ids, observe_window: int = 0, cache=None):
    """Run the prompt once; returns ``(DynamicCache, Observations or None)``.

    With ``observe_window > 0`` the last ``observe_window`` query vectors of every layer
    are captured on the way (what SnapKV-style selectors score with). With ``cache`` (a
    :class:`PositionedCache` of the prompt's first tokens, e.g. fetched from a KV pool) only
    ``input_ids``, the rest of the prompt, run, at the positions that follow the cache's.
    """
    torch = _torch()
    transformers = require("transformers")
    input_ids = torch.as_tensor(input_ids).reshape(1, -1) if not hasattr(input_ids, "ndim") or input_ids.ndim == 1 else input_ids
    kwargs = {"input_ids": input_ids, "use_cache": True}
    if cache is None:  # as the model's own generate() caches: sliding-window layers keep only their window
        cache = transformers.DynamicCache(config=model.config)
    else:
        start = _next_position(cache)
        kwargs["position_ids"] = torch.arange(start, start + input_ids.shape[1]).unsqueeze(0)
    kwargs[cache_keyword(model)] = cache
    with torch.inference_mode():
        if observe_window > 0:
            with _observe(model, min(observe_window, input_ids.shape[1])) as captured:
                model(**kwargs)
            observations = Observations(list(captured))
        else:
            model(**kwargs)
            observations = None
    if "position_ids" in kwargs:
        _extend_positions(cache, kwargs["position_ids"][0].numpy())
    return cache, observations


def _extend_positions(cache, new_positions: np.ndarray) -> None:
    """A PositionedCache after a forward pass: the new tokens' positions follow the kept ones."""
    if getattr(cache, "positions", None) is not None:
        cache.positions = [np.concatenate([p, np.broadcast_to(new_positions, (*p.shape[:2], new_positions.size))], axis=2)
                           for p in cache.positions]  # fmt: skip
    cache.seq_len = int(new_positions[-1]) + 1


def cache_to_data(cache, observations: Observations | None = None) -> KVCacheData:
    """A ``DynamicCache`` (or PositionedCache) as float32 numpy arrays with positions.

    A sliding-window layer (transformers' ``DynamicSlidingWindowLayer``, made by
    ``DynamicCache(config=...)`` for models such as Gemma 2 or Mistral) holds only the most
    recent tokens: its positions are the last ones of the sequence, and the payload lists
    each layer's count (``positions: "tail"``).
    """
    torch = _torch()
    layers = []
    source_dtype = "F32"
    stored_positions = getattr(cache, "positions", None)
    seq_len = getattr(cache, "seq_len", 0) or max((_layer_length(layer) for layer in cache.layers), default=0)
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        source_dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(keys.dtype, "F32")
        k = keys.detach().to(torch.float32).cpu().numpy()
        v = values.detach().to(torch.float32).cpu().numpy()
        if stored_positions is not None:
            pos = np.asarray(stored_positions[index], dtype=np.int64)
        else:  # the layer's tokens are the most recent ones (all of them unless it slides)
            tail = np.arange(seq_len - k.shape[2], seq_len, dtype=np.int64)
            pos = np.broadcast_to(tail, k.shape[:3]).copy()
        layers.append(KVLayer(k, v, pos))
    return KVCacheData(layers, seq_len=int(seq_len), dtype=source_dtype, observations=observations)


def _layer_length(layer) -> int:
    """Tokens the layer has seen: a sliding-window layer counts those it dropped too."""
    held = layer.keys.shape[-2] if getattr(layer, "keys", None) is not None and layer.keys.numel() else 0
    return max(held, int(getattr(layer, "cumulative_length", 0)))


def data_to_cache(data: KVCacheData, device: str = "cpu", dtype: Any = None, reserve: int = 0):
    """Build a :class:`PositionedCache` from :class:`KVCacheData` (float32 unless ``dtype``).

    ``reserve``: room for that many more tokens per layer, written in place as the cache
    grows (:func:`reserved_layer_class`); 0 keeps transformers' concatenating layers. A
    layer that holds fewer tokens than the sequence's most recent ones (a sliding-window
    layer) becomes a ``DynamicSlidingWindowLayer`` with a window of its tokens plus one,
    as transformers keeps it.
    """
    torch = _torch()
    cache_utils = require("transformers.cache_utils")
    cache = positioned_cache_class()()
    tokens = [layer.keys.shape[2] for layer in data.layers]
    sliding = [t < data.seq_len and len(set(tokens)) > 1 for t in tokens]
    if reserve > 0 or any(sliding):
        reserved = reserved_layer_class()
        cache.layers = [cache_utils.DynamicSlidingWindowLayer(sliding_window=t + 1) if slides
                        else reserved(reserve) if reserve > 0 else cache_utils.DynamicLayer()
                        for t, slides in zip(tokens, sliding)]  # fmt: skip
    dtype = dtype or torch.float32
    for index, layer in enumerate(data.layers):
        k = torch.from_numpy(np.ascontiguousarray(layer.keys)).to(device=device, dtype=dtype)
        v = torch.from_numpy(np.ascontiguousarray(layer.values)).to(device=device, dtype=dtype)
        cache.update(k, v, index)
        if sliding[index]:
            cache.layers[index].cumulative_length = int(data.seq_len)
    cache.seq_len = int(data.seq_len)
    cache.positions = [layer.positions for layer in data.layers]
    return cache


def _next_position(cache) -> int:
    seq_len = getattr(cache, "seq_len", None)
    return int(seq_len) if seq_len else cache.get_seq_length()


def forward(model, cache, input_ids):
    """Feed ``input_ids`` after ``cache`` with the original sequence's RoPE positions.

    Returns the model output (``.logits`` of shape ``(1, len(input_ids), vocab)``); the
    cache grows by those tokens and its ``seq_len`` advances.
    """
    torch = _torch()
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    start = _next_position(cache)
    position_ids = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    with torch.inference_mode():
        out = model(input_ids=ids, position_ids=position_ids, use_cache=True, **{cache_keyword(model): cache})
    if hasattr(cache, "seq_len"):
        cache.seq_len = start + ids.shape[1]
    return out


def generate(model, cache, input_ids, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy continuation of ``input_ids`` after ``cache``; returns the new token ids."""
    out = forward(model, cache, input_ids)
    new: list[int] = []
    for step in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        new.append(token)
        if token == eos_token_id or step == max_new_tokens - 1:
            break
        out = forward(model, cache, [token])
    return new
