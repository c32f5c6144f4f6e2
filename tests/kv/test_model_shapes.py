"""Pipelines on caches of other model families and shapes than SmolLM2's.

Tiny randomly initialised transformers models (no download): one KV head of head_dim 256,
many KV heads, sliding-window layers mixed with full-attention layers, and caches held in
float32, float16 and bfloat16. A lossless pipeline must hand back a cache on which
generation continues exactly; lossy ones must round-trip the shape; what a stage cannot
handle must be refused with a named error, never coded wrong.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tensorwire.errors import ShapeMismatch  # noqa: E402
from tensorwire.kv import Pipeline, hf  # noqa: E402
from tensorwire.kv.presets import PRESETS, resolve  # noqa: E402


def tiny(family: str, dtype=torch.float32, **overrides):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  max_position_embeddings=512, attn_implementation="eager")  # fmt: skip
    shapes = {
        "mqa-256": (transformers.LlamaConfig, dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256)),
        "many-heads": (transformers.LlamaConfig, dict(num_attention_heads=16, num_key_value_heads=16, head_dim=8)),
        "qwen2-gqa": (transformers.Qwen2Config, dict(num_attention_heads=6, num_key_value_heads=2)),
        "sliding-mixed": (transformers.Gemma2Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                          sliding_window=16, query_pre_attn_scalar=32)),
    }
    config_class, shape = shapes[family]
    config = config_class(**{**common, **shape, **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


FAMILIES = ["mqa-256", "many-heads", "qwen2-gqa", "sliding-mixed"]
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def prompt(n: int = 40, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, size=n)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_lossless_pipeline_continues_exactly(family, dtype):
    model = tiny(family, DTYPES[dtype])
    ids = prompt()
    cache, _ = hf.prefill(model, ids[:-8])
    data = hf.cache_to_data(cache)
    assert data.dtype == dtype
    shape = hf.model_shape(model)
    assert data.layers[-1].keys.shape == (1, shape["kv_heads"], 32, shape["head_dim"])  # the last layer is full
    payload = Pipeline.from_config(resolve("lossless")).encode(data)
    decoded = Pipeline.decode_data(payload, expect={k: shape[k] for k in ("n_layers", "kv_heads", "head_dim")})
    for got, sent in zip(decoded.layers, data.layers):
        assert np.array_equal(got.keys, sent.keys) and np.array_equal(got.values, sent.values)
    reference = hf.forward(model, hf.data_to_cache(data, dtype=DTYPES[dtype]), ids[-8:]).logits
    again = hf.forward(model, hf.data_to_cache(decoded, dtype=DTYPES[dtype]), ids[-8:]).logits
    assert torch.equal(again, reference)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_preset_round_trips_the_shape(family, preset):
    model = tiny(family)
    cache, observations = hf.prefill(model, prompt(70), observe_window=8)
    data = hf.cache_to_data(cache, observations)
    pipeline = Pipeline.from_config(resolve(preset))
    if family == "sliding-mixed" and pipeline.selector is not None and pipeline.selector.id != "keep_all":
        with pytest.raises(ShapeMismatch, match="sliding-window layers"):  # refused, never coded wrong
            pipeline.encode(data)
        return
    decoded = Pipeline.decode_data(pipeline.encode(data))
    assert len(decoded.layers) == len(data.layers)
    for got, sent in zip(decoded.layers, data.layers):
        assert got.keys.shape[:2] == sent.keys.shape[:2] and got.keys.shape[3] == sent.keys.shape[3]
        assert got.keys.shape == got.values.shape and np.isfinite(got.keys).all()
    hf.forward(model, hf.data_to_cache(decoded), [1, 2, 3])  # generation goes on


@pytest.mark.parametrize("stages", [[], [{"id": "enec"}], [{"id": "kivi", "k_bits": 4, "v_bits": 4, "residual": 8}, {"id": "ans"}]],
                         ids=["raw", "enec", "kivi-ans"])
def test_sliding_window_layers_travel_as_their_window(stages):
    model = tiny("sliding-mixed")
    ids = prompt()
    cache, _ = hf.prefill(model, ids[:-8])  # as the model's generate() caches: sliding layers keep their window
    assert [type(layer).__name__ for layer in cache.layers[:2]] == ["DynamicSlidingWindowLayer", "DynamicLayer"]
    data = hf.cache_to_data(cache)
    assert [layer.keys.shape[2] for layer in data.layers] == [15, 32, 15, 32] and data.seq_len == 32
    assert data.layers[0].positions[0, 0].tolist() == list(range(17, 32))
    pipeline = Pipeline.from_config({"stages": stages})
    blob = pipeline.encode(data)
    assert int.from_bytes(blob[8:10], "little") == 2  # positions "tail" need payload version 2
    decoded = Pipeline.decode_data(blob)
    assert [layer.keys.shape[2] for layer in decoded.layers] == [15, 32, 15, 32] and decoded.seq_len == 32
    assert np.array_equal(decoded.layers[2].positions, data.layers[2].positions)
    reference = hf.forward(model, cache, ids[-8:]).logits
    got = hf.forward(model, hf.data_to_cache(decoded), ids[-8:]).logits
    if not stages or stages[0]["id"] == "enec":  # lossless: generation continues exactly
        assert torch.equal(got, reference)
    else:
        assert torch.isfinite(got).all()


def test_a_selector_refuses_layers_of_different_lengths():
    model = tiny("sliding-mixed")
    data = hf.cache_to_data(hf.prefill(model, prompt()[:-8])[0])
    with pytest.raises(ShapeMismatch, match="sliding-window layers"):
        Pipeline.from_config({"stages": [{"id": "streaming_llm", "keep_fraction": 0.5}]}).encode(data)


def test_uniform_caches_are_still_written_as_version_1():
    model = tiny("qwen2-gqa")
    data = hf.cache_to_data(hf.prefill(model, prompt())[0])
    assert int.from_bytes(Pipeline().encode(data)[8:10], "little") == 1  # readable by tensorwire before 2026-12
