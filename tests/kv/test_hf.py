"""transformers integration on the real SmolLM2 (GQA: 9 query heads, 3 KV heads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensorwire.kv import Pipeline, hf


@pytest.fixture(scope="module")
def prompt(smollm2, sample_text):
    _, tokenizer = smollm2
    ids = tokenizer(sample_text.read_text()).input_ids
    return torch.tensor(ids[:160]), torch.tensor(ids[160:176])


def test_model_shape_is_gqa(smollm2):
    assert hf.model_shape(smollm2[0]) == {"n_layers": 30, "kv_heads": 3, "q_heads": 9, "head_dim": 64, "sliding_layers": 0}


def test_prefill_captures_queries_after_rope(smollm2, prompt):
    model, _ = smollm2
    cache, observations = hf.prefill(model, prompt[0], observe_window=16)
    assert len(observations.queries) == 30 and observations.window == 16
    assert observations.queries[3].shape == (1, 9, 16, 64)
    data = hf.cache_to_data(cache, observations)
    assert data.seq_len == 160 and data.layers[0].keys.shape == (1, 3, 160, 64)
    # The captured queries must be the ones the model attended with: rebuild layer 2's last
    # attention row from them and the cached keys, and compare with the model's own weights.
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            attentions = model(input_ids=prompt[0][None], output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    q = observations.queries[2][0, :, -1]  # (9, 64)
    k = np.repeat(data.layers[2].keys[0], 3, axis=0)  # GQA: query head h reads kv head h // 3
    scores = np.einsum("hd,htd->ht", q, k) / 8.0
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights, attentions[2][0, :, -1].numpy(), atol=2e-5)


def test_decoded_lossless_cache_continues_exactly(smollm2, prompt):
    model, _ = smollm2
    prefix, continuation = prompt
    cache, _ = hf.prefill(model, prefix)
    payload = Pipeline().encode(cache)
    with torch.inference_mode():
        reference = model(input_ids=continuation[None], use_cache=True, **{hf.cache_keyword(model): cache}).logits
    decoded = Pipeline.decode(payload, expect={"n_layers": 30, "kv_heads": 3, "head_dim": 64})
    assert decoded.seq_len == 160
    # What the lossless format promises: the cache comes back bit for bit ...
    for got, sent in zip(decoded.layers, cache.layers):
        assert torch.equal(got.keys, sent.keys[:, :, :160]) and torch.equal(got.values, sent.values[:, :, :160])
    logits = hf.forward(model, decoded, continuation).logits
    # ... so the continuation is the same forward pass on the same bits, shapes and (contiguous)
    # layout in one process: bit-identical too. A mismatch here is a position or cache-handling
    # difference between hf.forward and the model's own call, not float rounding.
    assert torch.equal(logits, reference)
    assert decoded.seq_len == 176 and decoded.get_seq_length() == 176


def test_evicted_cache_uses_original_positions(smollm2, prompt):
    model, _ = smollm2
    prefix, continuation = prompt
    cache, _ = hf.prefill(model, prefix)
    p = Pipeline.from_config({"stages": [{"id": "streaming_llm", "keep_fraction": 0.5, "sinks": 4}]})
    decoded = Pipeline.decode(p.encode(cache))
    assert decoded.get_seq_length() == 80 and decoded.seq_len == 160
    assert decoded.positions[0][0, 0, :4].tolist() == [0, 1, 2, 3]
    assert decoded.positions[0][0, 0, -1] == 159
    nll = lambda logits: torch.nn.functional.cross_entropy(logits[0, :-1], continuation[1:]).item()  # noqa: E731
    right = nll(hf.forward(model, decoded, continuation).logits)
    wrong = Pipeline.decode(p.encode(cache))
    wrong.seq_len = 0  # falls back to the cache length: RoPE positions shifted by 80
    assert nll(hf.forward(model, wrong, continuation).logits) > right


def test_generate_continues_greedily(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is").input_ids
    cache, _ = hf.prefill(model, torch.tensor(ids[:-1]))
    decoded = Pipeline.decode(Pipeline.from_config({"stages": [{"id": "cast", "dtype": "BF16"}]}).encode(cache))
    answer = tokenizer.decode(hf.generate(model, decoded, ids[-1:], max_new_tokens=3))
    assert "Paris" in answer


def test_reserved_cache_grows_in_place_and_generates_the_same(smollm2, prompt):
    model, _ = smollm2
    prefix, continuation = prompt
    data = hf.cache_to_data(hf.prefill(model, prefix)[0])
    plain, reserved = hf.data_to_cache(data), hf.data_to_cache(data, reserve=4)
    buffer = reserved.layers[0].keys.data_ptr()
    # 8 tokens one by one: 4 in the reserved room, then the room doubles once.
    for token in continuation[:8].tolist():
        expected = hf.forward(model, plain, [token]).logits
        got = hf.forward(model, reserved, [token]).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # strided views may change the kernels' sums
    assert reserved.get_seq_length() == plain.get_seq_length() == 168 and reserved.seq_len == 168
    assert torch.equal(reserved.layers[5].keys, plain.layers[5].keys)
    assert reserved.layers[0].keys.data_ptr() != buffer  # moved once, when the reserved room ran out
    for layer in reserved.layers:
        layer.crop(-3)
    assert reserved.get_seq_length() == 165
    hf.forward(model, reserved, continuation[8:9].tolist())  # writes after the crop, in the same buffer
    assert torch.equal(reserved.layers[0].keys[:, :, :165], plain.layers[0].keys[:, :, :165])
