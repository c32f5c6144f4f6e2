"""The search space derived from the stage registry: derivation, plugins, conditionals, rules."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorwire.kv import registry
from tensorwire.kv.pipeline import Pipeline
from tensorwire.kv.selectors.topk import batch_and_tokens
from tensorwire.kv.stage import KVCacheData, Selector
from tensorwire.search.space import (
    NONE,
    CandidateRejected,
    SearchSpace,
    SearchSpaceError,
    StageSpace,
    config_key,
    lossy_key,
)
from tensorwire.testing.strategies import kv_cache_data

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class EveryNth(Selector):
    """Keep every ``stride``-th token: a selector from outside the package (a plugin)."""

    stride: int = 2

    id = "every_nth_test"
    search_space: ClassVar[dict[str, tuple]] = {"stride": (2, 3)}

    def __post_init__(self) -> None:
        self.check(isinstance(self.stride, int) and self.stride >= 1, f"stride must be an int >= 1, got {self.stride!r}")

    def kept(self, tokens: int) -> int:
        return -(-tokens // self.stride)

    def select(self, cache: KVCacheData) -> list[np.ndarray]:
        _, tokens = batch_and_tokens(cache)
        index = np.arange(0, tokens, self.stride, dtype=np.int64)
        return [np.ascontiguousarray(np.broadcast_to(index, (*layer.keys.shape[:2], index.size))) for layer in cache.layers]


def declaring_ids() -> set[str]:
    return {i for i in registry.stage_ids() if getattr(registry.stage_class(i), "search_space", None) is not None}


def trials(space: SearchSpace, n: int, seed: int = 0):
    """``n`` trials drawn by optuna's random sampler, each with the config the space suggests."""
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, space.suggest(trial)))
        study.tell(trial, 0.0)
    return out


# -- derivation ----------------------------------------------------------------------------
def test_every_stage_that_declares_a_search_space_joins():
    space = SearchSpace.from_registry()
    assert set(space.stage_ids()) == declaring_ids()
    assert {"identity", "keep_all"}.isdisjoint(space.stage_ids())  # no search_space: same as an empty slot
    assert space.slot_ids("selector")[0] == NONE and space.slot_ids("transform")[0] == NONE
    assert NONE not in space.slot_ids("quantizer")  # required by default
    for stage in space.stage_spaces():
        assert dict(stage.params) == dict(registry.stage_class(stage.id).search_space)


def test_a_plugin_stage_joins_without_code_changes(monkeypatch):
    monkeypatch.setitem(registry.BUILTIN_STAGES, EveryNth.id, f"{__name__}:EveryNth")
    space = SearchSpace.from_registry()
    assert EveryNth.id in space.slot_ids("selector")
    assert f"{EveryNth.id}.stride" in space.distributions()
    picked = [c for _, c in trials(space, 300) if any(s["id"] == EveryNth.id for s in c["stages"])]
    assert picked, "the random sampler never picked the plugin selector in 300 trials"
    pipeline = space.build({"stages": [{"id": EveryNth.id, "stride": 3}, {"id": "kivi"}, {"id": "raw"}]})
    data = kv_cache_data(n_layers=2, batch=1, heads=2, tokens=7, head_dim=64, seed=1)
    decoded = Pipeline.decode_data(pipeline.encode(data))
    assert decoded.layers[0].positions[0, 0].tolist() == [0, 3, 6]


# -- optuna parameters ---------------------------------------------------------------------
def test_parameters_are_conditional_on_the_chosen_stages():
    space = SearchSpace.from_registry()
    for trial, config in trials(space, 60):
        chosen = {s["id"] for s in config["stages"]}
        for name in trial.params:
            if "." in name:
                assert name.split(".")[0] in chosen, (name, config)
        for stage in config["stages"]:
            for param in space_params(space, stage["id"]):
                assert param in trial.params
        assert config["stages"][-1]["id"] in {"raw", "enec", "ans", "zstd", "lz4"}


def space_params(space: SearchSpace, stage_id: str) -> list[str]:
    return [s.param_name(p) for s in space.stage_spaces() if s.id == stage_id for p in s.searched]


def test_numeric_candidates_are_asked_by_rank():
    stage = StageSpace.of("kivi", {"k_bits": (8, 2, 4, 3), "v_bits": (2, 4), "group_size": (32, 64, 128)})
    assert stage.ordered == {"k_bits": (2, 3, 4, 8), "group_size": (32, 64, 128)}
    dists = stage.distributions()
    assert dists["kivi.k_bits:rank"] == optuna.distributions.IntDistribution(0, 3)
    assert isinstance(dists["kivi.v_bits"], optuna.distributions.CategoricalDistribution)  # two values: a category
    assert "score:rank" not in str(StageSpace.of("headwise").distributions())  # strings stay categories
    space = SearchSpace.from_registry({"kivi": {"k_bits": (8, 2, 4, 3)}, "raw": {}})
    study = optuna.create_study(directions=["minimize"])
    study.enqueue_trial({"kivi.k_bits:rank": 2})
    trial = study.ask()
    assert space.suggest(trial)["stages"][0]["k_bits"] == 4
    seen = {c["stages"][0]["k_bits"] for _, c in trials(space, 40)}
    assert seen == {2, 3, 4, 8}


def test_sizes_by_hand():
    # selectors: none + 2; quantizer: kivi with 2 settings; chains: raw, raw+zstd, enec(fast|max), enec+zstd(fast only).
    space = SearchSpace.from_registry({"snapkv": {"keep_fraction": (0.5, 0.9)}, "kivi": {"k_bits": (2, 4), "v_bits": (2,)},
                                       "raw": None, "enec": None, "zstd": {"level": (3,)}})  # fmt: skip
    assert space.slot_ids("encoder") == ("raw", "raw+zstd", "enec", "enec+zstd")
    assert space.size(skip=False) == 3 * 2 * 6
    # kivi emits codes: enec fast (and so enec+zstd) is skipped, and enec max + zstd is pointless.
    assert space.size() == 3 * 2 * 3
    keys = {config_key(space.build(c)) for c in space.configs()}
    assert len(keys) == space.size()


@functools.lru_cache(maxsize=1)
def small_space() -> tuple[SearchSpace, frozenset[str]]:
    space = SearchSpace.from_registry({"hadamard": None, "streaming_llm": {"keep_fraction": (0.5, 0.9)},
                                       "cast": None, "kivi": {"k_bits": (2, 8), "v_bits": (4,)}, "raw": None,
                                       "enec": None, "ans": None, "lz4": None})  # fmt: skip
    return space, frozenset(config_key(Pipeline.from_config(c)) for c in space.configs(skip=False))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1))
def test_every_suggestion_is_listed_and_builds_or_is_rejected_by_name(seed):
    space, listed = small_space()
    for _, config in trials(space, 3, seed):
        assert config_key(Pipeline.from_config(config)) in listed
        try:
            space.build(config)
        except CandidateRejected as exc:
            assert str(exc).startswith("skipped: ") and space.skip_reason(config) is not None


def test_range_specs_become_optuna_ranges():
    stage = StageSpace.of("zstd", {"level": ("int", 1, 5, 2)})
    (dist,) = stage.distributions().values()
    assert isinstance(dist, optuna.distributions.IntDistribution) and (dist.low, dist.high, dist.step) == (1, 5, 2)
    assert [c["level"] for c in stage.configs()] == [1, 3, 5]
    snap = StageSpace.of("snapkv", {"keep_fraction": ("float", 0.1, 1.0, "log")})
    (dist,) = snap.distributions().values()
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.log
    with pytest.raises(SearchSpaceError, match="cannot be enumerated"):
        list(snap.configs())
    space = SearchSpace.from_registry({"snapkv": {"keep_fraction": ("float", 0.2, 0.9)}, "kivi": {}, "raw": {}})
    for _, config in trials(space, 10):
        fraction = [s for s in config["stages"] if s["id"] == "snapkv"]
        assert not fraction or 0.2 <= fraction[0]["keep_fraction"] <= 0.9


def test_single_candidates_are_fixed_not_searched():
    stage = StageSpace.of("kivi", {"k_bits": (4,), "v_bits": (2, 4)})
    assert list(stage.distributions()) == ["kivi.v_bits"]
    (trial, config), *_ = trials(SearchSpace.from_registry({"kivi": {"k_bits": (4,), "v_bits": (2, 4)}, "raw": {}}), 1)
    assert config["stages"][0]["k_bits"] == 4 and "kivi.k_bits" not in trial.params


# -- rules and invalid candidates ----------------------------------------------------------
def test_skip_rules():
    space = SearchSpace.from_registry()
    kivi = {"id": "kivi", "k_bits": 2, "v_bits": 2}
    with pytest.raises(CandidateRejected, match="enec-fast-on-codes"):
        space.build({"stages": [kivi, {"id": "enec", "level": "fast"}]})
    with pytest.raises(CandidateRejected, match="ans-on-floats"):
        space.build({"stages": [{"id": "cast", "dtype": "BF16"}, {"id": "ans"}]})
    with pytest.raises(CandidateRejected, match="bytes-after-entropy-coder"):
        space.build({"stages": [kivi, {"id": "enec"}, {"id": "zstd"}]})  # enec's default level is max
    assert space.build({"stages": [kivi, {"id": "raw"}, {"id": "zstd"}]}).quantizer.id == "kivi"
    assert space.build({"stages": [{"id": "cast", "dtype": "BF16"}, {"id": "enec", "level": "fast"}, {"id": "zstd"}]})
    assert "ans+zstd" not in space.slot_ids("encoder") and "enec+zstd" in space.slot_ids("encoder")


def test_invalid_candidates_are_rejected_cheaply():
    space = SearchSpace.from_registry({"headwise": {"high_bits": (2,), "low_bits": (2, 3)}, "raw": {}})
    outcomes = {}
    for config in space.configs():
        try:
            space.build(config)
            outcomes[config["stages"][0]["low_bits"]] = "ok"
        except CandidateRejected as exc:
            outcomes[config["stages"][0]["low_bits"]] = str(exc)
    assert outcomes[2] == "ok"
    assert outcomes[3].startswith("invalid: ") and "high_bits" in outcomes[3]
    with pytest.raises(CandidateRejected, match="keep_fraction"):
        space.build({"stages": [{"id": "snapkv", "keep_fraction": 1.5}, {"id": "kivi"}]})


def test_keys():
    a = Pipeline.from_config({"stages": [{"id": "kivi"}, {"id": "zstd"}]})
    b = Pipeline.from_config({"stages": [{"id": "kivi", "k_bits": 2, "v_bits": 2, "group_size": 32, "residual": 128},
                                         {"id": "zstd", "level": 3}]})  # fmt: skip
    assert config_key(a) == config_key(b) == config_key(b.to_config())
    c = Pipeline.from_config({"stages": [{"id": "kivi"}, {"id": "ans"}]})
    assert config_key(a) != config_key(c) and lossy_key(a) == lossy_key(c)
    assert lossy_key(a) != lossy_key(Pipeline.from_config({"stages": [{"id": "kivi", "k_bits": 4}]}))


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ({"kivi": {"bits": (2,)}}, "not its parameters"),
        ({"kivi": {"k_bits": ()}}, "non-empty tuple"),
        ({"kivi": {"k_bits": 4}}, "non-empty tuple"),
        ({"snapkv": {"keep_fraction": (0.5, math.nan)}}, "finite float"),
        ({"kivi": {"k_bits": (2, 2)}}, "distinct"),
        ({"kivi": {"k_bits": ([2], 4)}}, "candidates are None"),
        ({"zstd": {"level": ("int", 5, 1)}}, "low <= high"),
        ({"zstd": {"level": ("int", 1, 5, "linear")}}, "4th item"),
        ({"snapkv": {"keep_fraction": ("float", 0.0, 1.0, "log")}}, "low > 0"),
        ({"identity": None}, "declares no search_space"),
        ({"kivi": ["k_bits"]}, "expected a dict"),
        ({"raw": {}}, "quantizer slot has no candidate"),
    ],
)
def test_bad_spaces(stages, match):
    with pytest.raises(SearchSpaceError, match=match):
        SearchSpace.from_registry(stages)


def test_bad_optional_slots():
    with pytest.raises(SearchSpaceError, match="do not exist"):
        SearchSpace.from_registry(["kivi", "raw"], optional=["compressor"])
    with pytest.raises(SearchSpaceError, match="cannot be empty"):
        SearchSpace.from_registry(["kivi", "raw"], optional=["encoder"])
    only_encoders = SearchSpace.from_registry(["raw", "zstd"], optional=["transform", "selector", "quantizer"])
    assert only_encoders.size() == 4  # float32 planes: raw, and raw + zstd at its 3 levels
