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
    """``n_layers``, ``kv_heads``, ``q_heads``, ``head_dim`` of a decoder-only transformers model."""
    config = model.config
    q_heads = config.num_attention_heads
    return {
        "n_layers": config.num_hidden_layers,
        "kv_heads": getattr(config, "num_key_value_heads", None) or q_heads,
        "q_heads": q_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // q_heads,
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
    if cache is None:
        cache = transformers.DynamicCache()
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
    """A ``DynamicCache`` (or PositionedCache) as float32 numpy arrays with positions."""
    torch = _torch()
    layers = []
    source_dtype = "F32"
    stored_positions = getattr(cache, "positions", None)
    seq_len = getattr(cache, "seq_len", 0) or None
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        source_dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(keys.dtype, "F32")
        k = keys.detach().to(torch.float32).cpu().numpy()
        v = values.detach().to(torch.float32).cpu().numpy()
        if stored_positions is not None:
            pos = np.asarray(stored_positions[index], dtype=np.int64)
        else:
            pos = np.broadcast_to(np.arange(k.shape[2], dtype=np.int64), k.shape[:3]).copy()
        layers.append(KVLayer(k, v, pos))
    if seq_len is None:
        seq_len = layers[0].keys.shape[2] if layers else 0
    return KVCacheData(layers, seq_len=int(seq_len), dtype=source_dtype, observations=observations)


def data_to_cache(data: KVCacheData, device: str = "cpu", dtype: Any = None):
    """Build a :class:`PositionedCache` from :class:`KVCacheData` (float32 unless ``dtype``)."""
    torch = _torch()
    cache = positioned_cache_class()()
    dtype = dtype or torch.float32
    for index, layer in enumerate(data.layers):
        k = torch.from_numpy(np.ascontiguousarray(layer.keys)).to(device=device, dtype=dtype)
        v = torch.from_numpy(np.ascontiguousarray(layer.values)).to(device=device, dtype=dtype)
        cache.update(k, v, index)
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
