"""Token selectors: keep_all, streaming_llm, key_norm, snapkv."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorwire.kv.selectors.keep_all import KeepAll
from tensorwire.kv.selectors.key_norm import KeyNorm
from tensorwire.kv.selectors.snapkv import SnapKV, window_scores
from tensorwire.kv.stage import ObservationError
from tensorwire.kv.selectors.streaming_llm import StreamingLLM
from tensorwire.kv.selectors.topk import budget, top_k
from tensorwire.kv.stage import KVCacheData, KVLayer, Observations, Selector, ShapeMismatch, Stage, StageConfigError
from tensorwire.testing.conformance import SelectorSuite
from tensorwire.testing.strategies import kv_tensor


def make_cache(
    seed: int,
    batch: int = 1,
    kv_heads: int = 3,
    tokens: int = 300,
    head_dim: int = 64,
    n_layers: int = 2,
    group: int = 3,
    observed: int | None = 32,
) -> KVCacheData:
    """A prefill cache (positions 0..tokens-1) with the last ``observed`` queries per layer."""
    rng = np.random.default_rng(seed)
    shape = (batch, kv_heads, tokens, head_dim)
    positions = np.broadcast_to(np.arange(tokens, dtype=np.int64), shape[:3]).copy()
    layers = [KVLayer(kv_tensor(shape, rng), kv_tensor(shape, rng), positions) for _ in range(n_layers)]
    obs = None
    if observed is not None:
        w = min(observed, tokens)
        obs = Observations([kv_tensor((batch, kv_heads * group, w, head_dim), rng) for _ in range(n_layers)])
    return KVCacheData(layers, seq_len=tokens, observations=obs)


fractions = st.sampled_from([1e-3, 0.1, 0.25, 0.5, 0.9, 1.0])
SELECTORS = [
    st.just(KeepAll()),
    st.builds(StreamingLLM, keep_fraction=fractions, sinks=st.sampled_from([0, 1, 4, 400])),
    st.builds(KeyNorm, keep_fraction=fractions),
    st.builds(SnapKV, keep_fraction=fractions, window=st.sampled_from([1, 4, 32, 400]), kernel=st.sampled_from([1, 5])),
]


@given(
    selector=st.one_of(*SELECTORS),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 4),
    tokens=st.sampled_from([1, 2, 7, 33, 300]),
    observed=st.sampled_from([1, 5, 32]),
    seed=st.integers(0, 2**16),
)
def test_indices_are_sorted_unique_in_range_and_of_the_budgeted_size(
    selector, batch, kv_heads, tokens, observed, seed
) -> None:
    cache = make_cache(seed, batch, kv_heads, tokens, head_dim=8, n_layers=2, group=2, observed=observed)
    chosen = selector.select(cache)
    k = selector.kept(tokens)
    assert 1 <= k <= tokens
    assert len(chosen) == cache.n_layers
    for idx in chosen:
        assert idx.dtype == np.int64 and idx.shape == (batch, kv_heads, k) and idx.flags.c_contiguous
        assert idx.min() >= 0 and idx.max() < tokens
        assert (np.diff(idx, axis=-1) > 0).all()  # sorted and unique
    # The pipeline gathers keys, values and positions with the indices.
    layer = cache.layers[0]
    gathered = np.take_along_axis(layer.keys, chosen[0][..., None], axis=2)
    assert gathered.shape == (batch, kv_heads, k, 8)
    np.testing.assert_array_equal(np.take_along_axis(layer.positions, chosen[0], axis=2), chosen[0])


@given(fraction=st.floats(1e-6, 1.0), tokens=st.integers(0, 10**6))
def test_budget_formula(fraction: float, tokens: int) -> None:
    k = budget(fraction, tokens)
    assert k == (0 if tokens == 0 else max(1, min(tokens, round(fraction * tokens))))
    for selector in (StreamingLLM(fraction), KeyNorm(fraction)):
        assert selector.kept(tokens) == k
    assert SnapKV(fraction, window=32).kept(tokens) == max(k, min(32, tokens))
    assert KeepAll().kept(tokens) == tokens


@pytest.mark.parametrize(
    "selector", [KeepAll(), StreamingLLM(1.0), KeyNorm(1.0), SnapKV(1.0), SnapKV(0.1, window=300)], ids=repr
)
def test_full_budget_keeps_every_token(selector: Selector) -> None:
    cache = make_cache(0, batch=2, tokens=300)
    for idx in selector.select(cache):
        np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(300), (2, 3, 300)))


class TestSelectorConformance(SelectorSuite):
    stages = [KeepAll(), StreamingLLM(0.5, sinks=4), KeyNorm(0.25), SnapKV(0.25, window=4, kernel=5),
              SnapKV(0.5, window=2, kernel=1)]  # fmt: skip


def test_only_snapkv_needs_observations() -> None:
    assert SnapKV.needs_observations
    assert not any(s.needs_observations for s in (KeepAll(), StreamingLLM(0.5), KeyNorm(0.5)))
    # Selectors that do not need them ignore them, and work without them.
    cache = make_cache(1, observed=None)
    for selector in (KeepAll(), StreamingLLM(0.5), KeyNorm(0.5)):
        assert len(selector.select(cache)) == 2


# --- streaming_llm ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fraction, sinks, tokens, expected",
    [
        (0.1, 4, 300, list(range(4)) + list(range(274, 300))),
        (0.5, 4, 7, [0, 1, 2, 3]),  # budget 4 (3.5 rounds to 4) is all sinks
        (0.5, 2, 7, [0, 1, 5, 6]),
        (0.5, 0, 7, [3, 4, 5, 6]),
        (0.3, 4, 10, [0, 1, 2]),  # budget smaller than sinks: the first tokens win
        (0.9, 4, 3, [0, 1, 2]),  # fewer tokens than sinks
        (1e-3, 4, 1, [0]),
        (1e-3, 0, 300, [299]),
    ],
)
def test_streaming_keeps_sinks_and_recent_tokens(fraction, sinks, tokens, expected) -> None:
    selector = StreamingLLM(fraction, sinks=sinks)
    assert selector.indices(tokens).tolist() == expected
    cache = make_cache(2, batch=2, kv_heads=2, tokens=tokens, head_dim=8, observed=None)
    for idx in selector.select(cache):
        assert (idx == np.array(expected)).all()


# --- key_norm ---------------------------------------------------------------------------------


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 4),
    tokens=st.sampled_from([1, 7, 300]),
    fraction=fractions,
    seed=st.integers(0, 2**16),
)
def test_key_norm_keeps_the_lowest_norm_keys_per_head(batch, kv_heads, tokens, fraction, seed) -> None:
    cache = make_cache(seed, batch, kv_heads, tokens, head_dim=16, observed=None)
    selector = KeyNorm(fraction)
    k = selector.kept(tokens)
    for layer, idx in zip(cache.layers, selector.select(cache)):
        norms = np.linalg.norm(layer.keys.astype(np.float64), axis=-1)
        for b in range(batch):
            for h in range(kv_heads):
                kept_norms = norms[b, h, idx[b, h]]
                dropped = np.delete(norms[b, h], idx[b, h])
                assert dropped.size == tokens - k
                if dropped.size:
                    assert kept_norms.max() <= dropped.min() * (1 + 1e-6)


def test_key_norm_heads_choose_independently() -> None:
    keys = np.ones((1, 2, 4, 2), dtype=np.float32)
    keys[0, 0, 1] = 0.1  # head 0: token 1 has the smallest key
    keys[0, 1, 3] = 0.1  # head 1: token 3
    layer = KVLayer(keys, keys, np.broadcast_to(np.arange(4), (1, 2, 4)).copy())
    (idx,) = KeyNorm(0.25).select(KVCacheData([layer], seq_len=4))
    assert idx.tolist() == [[[1], [3]]]


# --- snapkv -----------------------------------------------------------------------------------


def test_snapkv_keeps_a_token_the_window_attends_to() -> None:
    cache = make_cache(3, batch=1, kv_heads=3, tokens=300, head_dim=64, n_layers=1, group=3)
    layer, queries = cache.layers[0], cache.observations.queries[0]
    direction = queries[0].mean(axis=(0, 1))  # what every window query has in common
    layer.keys[0, :, 100] = 8 * direction / np.linalg.norm(direction) * np.linalg.norm(queries, axis=-1).mean()
    scores = window_scores(layer.keys, queries, prefix=268, kernel=1)
    assert scores.shape == (1, 3, 268) and scores.dtype == np.float32
    assert (scores.argmax(axis=-1) == 100).all()
    # Budget: the 32-token window plus one token -> exactly token 100 among the earlier ones.
    (idx,) = SnapKV(keep_fraction=33 / 300, window=32, kernel=1).select(cache)
    assert idx[0, :, 0].tolist() == [100] * 3
    assert (idx[..., 1:] == np.arange(268, 300)).all()
    # Pooling spreads the score over neighbours: with 5 earlier tokens, the phrase 98..102.
    (idx,) = SnapKV(keep_fraction=37 / 300, window=32, kernel=5).select(cache)
    assert idx[0, :, :5].tolist() == [[98, 99, 100, 101, 102]] * 3


def test_snapkv_kv_heads_listen_only_to_their_query_heads() -> None:
    # 6 query heads on 2 KV heads: heads 0-2 read KV head 0, heads 3-5 read KV head 1.
    cache = make_cache(4, batch=1, kv_heads=2, tokens=100, head_dim=32, n_layers=1, group=3, observed=8)
    layer, queries = cache.layers[0], cache.observations.queries[0]
    queries[0, 3:] = 0.0
    queries[0, 3:, :, 0] = 10.0  # KV head 1's queries all point along channel 0
    layer.keys[0, :, 40] = 0.0
    layer.keys[0, :, 40, 0] = 10.0  # token 40 points there too, in both KV heads
    (idx,) = SnapKV(keep_fraction=9 / 100, window=8, kernel=1).select(cache)
    assert idx[0, 1, 0] == 40
    assert idx[0, 0, 0] != 40  # KV head 0's queries are unrelated to token 40


def test_snapkv_matches_a_torch_reference() -> None:
    torch = pytest.importorskip("torch")
    cache = make_cache(5, batch=2, kv_heads=3, tokens=120, head_dim=16, n_layers=1, group=3, observed=12)
    keys, queries = cache.layers[0].keys, cache.observations.queries[0]
    w, prefix = 12, 108
    # Independent formulation: repeat KV heads, full causal attention of the last w tokens.
    k = torch.from_numpy(keys).double().repeat_interleave(3, dim=1)
    q = torch.from_numpy(queries).double()
    logits = q @ k.transpose(-1, -2) / math.sqrt(16)
    query_pos = torch.arange(120 - w, 120)[:, None]
    logits = logits.masked_fill(torch.arange(120)[None, :] > query_pos, float("-inf"))
    attn = logits.softmax(dim=-1)[..., :prefix].mean(dim=-2)  # (batch, q_heads, prefix)
    pooled = torch.nn.functional.avg_pool1d(attn, kernel_size=5, stride=1, padding=2)
    expected = pooled.view(2, 3, 3, prefix).mean(dim=2).numpy()
    np.testing.assert_allclose(window_scores(keys, queries, prefix, kernel=5), expected, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("tokens", [1, 7, 32])
def test_snapkv_keeps_everything_when_the_window_covers_the_cache(tokens: int) -> None:
    cache = make_cache(6, batch=2, kv_heads=3, tokens=tokens, head_dim=8, observed=32)
    selector = SnapKV(keep_fraction=0.1, window=32)
    assert selector.kept(tokens) == tokens
    for idx in selector.select(cache):
        assert (idx == np.arange(tokens)).all()


def test_snapkv_uses_the_queries_there_are() -> None:
    # The prefill observed 4 queries, the selector's window is 32: the 4 score, 32 are kept.
    cache = make_cache(7, tokens=300, observed=4)
    selector = SnapKV(keep_fraction=0.25, window=32)
    for idx in selector.select(cache):
        assert idx.shape == (1, 3, 75)
        assert (idx[..., -32:] == np.arange(268, 300)).all()
    # More observed queries than the window: only the last `window` of them score.
    cache = make_cache(8, tokens=300, observed=64)
    short = make_cache(8, tokens=300, observed=64)
    short.observations.queries = [q[:, :, -16:] for q in short.observations.queries]
    for a, b in zip(SnapKV(0.25, window=16).select(cache), SnapKV(0.25, window=16).select(short)):
        np.testing.assert_array_equal(a, b)


def _replace_queries(layer: int, change):
    def mutate(cache: KVCacheData) -> None:
        cache.observations.queries[layer] = change(cache.observations.queries[layer])

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: setattr(c, "observations", None), "has no observations.*observe_window"),
        (lambda c: setattr(c.observations, "queries", []), "has no observations.*observe_window"),
        (lambda c: c.observations.queries.pop(), "queries for 1 layers, the cache has 2"),
        (_replace_queries(1, lambda q: q[..., :8]), "layer 1.*head_dim=64"),
        (_replace_queries(0, lambda q: q[:, :4]), "layer 0.*multiple"),  # 4 query heads on 3 KV heads
        (_replace_queries(0, lambda q: q[:, :2]), "layer 0.*multiple"),  # fewer query heads than KV heads
        (_replace_queries(0, lambda q: q[0]), "layer 0.*shape \\(9, 32, 64\\)"),
        (_replace_queries(0, lambda q: np.zeros((2, 9, 32, 64))), "layer 0.*batch=1"),
        (_replace_queries(0, lambda q: np.zeros((1, 9, 0, 64))), "layer 0.*window >= 1"),
    ],
)
def test_snapkv_observation_errors(mutate, message: str) -> None:
    cache = make_cache(9)
    mutate(cache)
    with pytest.raises(ObservationError, match=message):
        SnapKV(0.5).select(cache)
    assert issubclass(ObservationError, ValueError)


# --- shared checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("selector", [KeepAll(), StreamingLLM(0.5), KeyNorm(0.5), SnapKV(0.5)], ids=repr)
def test_layers_with_different_token_counts_are_rejected(selector: Selector) -> None:
    cache = make_cache(10)
    layer = cache.layers[1]
    cache.layers[1] = KVLayer(layer.keys[:, :, :-1], layer.values[:, :, :-1], layer.positions[:, :, :-1])
    with pytest.raises(ShapeMismatch, match="layer 1 has batch 1 and 299 tokens, layer 0 has batch 1 and 300"):
        selector.select(cache)


@pytest.mark.parametrize("selector", [KeepAll(), KeyNorm(0.5)], ids=repr)
def test_a_cache_without_layers_is_rejected(selector: Selector) -> None:
    with pytest.raises(ShapeMismatch, match="no layers"):
        selector.select(KVCacheData([], seq_len=0))


def test_keys_and_values_must_agree() -> None:
    cache = make_cache(11, observed=None)
    cache.layers[0].values = cache.layers[0].values[:, :2]
    with pytest.raises(ShapeMismatch, match="layer 0 has keys"):
        KeyNorm(0.5).select(cache)


@pytest.mark.parametrize("cls", [StreamingLLM, KeyNorm, SnapKV])
@pytest.mark.parametrize("fraction", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_keep_fraction_out_of_range(cls, fraction) -> None:
    with pytest.raises(StageConfigError, match="keep_fraction must be in \\(0, 1\\]"):
        cls(keep_fraction=fraction)
    with pytest.raises(StageConfigError, match="keep_fraction"):
        Stage.from_config({"id": cls.id, "keep_fraction": fraction})


@pytest.mark.parametrize(
    "params, message",
    [
        ({"id": "streaming_llm", "sinks": -1}, "sinks must be an int >= 0"),
        ({"id": "streaming_llm", "sinks": 2.0}, "sinks must be an int >= 0"),
        ({"id": "snapkv", "window": 0}, "window must be an int >= 1"),
        ({"id": "snapkv", "window": "32"}, "window must be an int >= 1"),
        ({"id": "snapkv", "kernel": 4}, "kernel must be an odd int >= 1"),
        ({"id": "snapkv", "kernel": 0}, "kernel must be an odd int >= 1"),
        ({"id": "key_norm"}, "bad parameters"),  # keep_fraction has no default
    ],
)
def test_bad_parameters(params: dict, message: str) -> None:
    config = {"keep_fraction": 0.5, **params} if params["id"] != "key_norm" else params
    with pytest.raises(StageConfigError, match=message):
        Stage.from_config(config)


def test_top_k_rejects_an_impossible_budget() -> None:
    with pytest.raises(ValueError, match="cannot keep 4 of 3 tokens"):
        top_k(np.zeros((1, 1, 3)), 4)


def test_window_scores_rejects_queries_that_do_not_fit() -> None:
    keys = np.zeros((1, 2, 10, 8), dtype=np.float32)
    with pytest.raises(ObservationError, match="do not fit keys"):
        window_scores(keys, np.zeros((1, 3, 2, 8), dtype=np.float32), prefix=8, kernel=1)  # 3 heads on 2
    with pytest.raises(ObservationError, match="do not fit keys"):
        window_scores(keys, np.zeros((1, 2, 4, 8), dtype=np.float32), prefix=8, kernel=1)  # window inside prefix
