"""A small hand-written profile library shared by the control tests."""

import pytest

from tensorwire.control import RequestContext
from tensorwire.kv.profiles import ModelShape, Profile, ProfileLibrary

G = 1e9


def small_library(extra_profiles=()) -> ProfileLibrary:
    """Three profiles for a SmolLM2-shaped cache (30 layers, 3 KV heads, head_dim 64, bf16).

    fast-lossy: ratio 6 but 3 % ppl; balanced: ratio 4, fast codec; gentle: ratio 2.2, very fast.
    """
    model = ModelShape("SmolLM2-135M-Instruct", n_layers=30, kv_heads=3, head_dim=64)
    profiles = [
        Profile("fast-lossy", {"stages": [{"id": "kivi", "k_bits": 2, "v_bits": 2}, {"id": "zstd"}]}, 6.0, 0.03, 2.5, 1.2 * G, 2.0 * G, 2),
        Profile("balanced", {"stages": [{"id": "kivi", "k_bits": 4, "v_bits": 4}, {"id": "zstd"}]}, 4.0, 0.006, 0.3, 1.5 * G, 2.5 * G, 2),
        Profile("gentle", {"stages": [{"id": "cast"}, {"id": "lz4"}]}, 2.2, 0.001, 0.1, 2.8 * G, 3.0 * G, 2),
        *extra_profiles,
    ]
    return ProfileLibrary(model, tuple(profiles), {"cpu": "test", "threads": 2})


@pytest.fixture
def library() -> ProfileLibrary:
    return small_library()


TOKENS = 4096  # 94 MB of bf16 cache for the SmolLM2 shape


def ctx(**kw) -> RequestContext:
    """A request for the small library's model: 4096 tokens, 200 ms SLO, a loose quality budget."""
    base = {"tokens": TOKENS, "slo_s": 0.2, "max_ppl_increase": 0.05, "max_retrieval_drop": 5.0}
    return RequestContext(**{**base, **kw})
