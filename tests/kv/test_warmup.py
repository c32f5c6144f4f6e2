"""Compiling the KV kernels ahead: every preset and shipped profile on a synthetic cache."""

from __future__ import annotations

import numpy as np

from tensorwire.cli import main
from tensorwire.kv import Pipeline
from tensorwire.kv.warmup import shipped_pipelines, synthetic_cache, warm_up


def test_the_synthetic_cache_is_shaped_like_a_real_one():
    cache = synthetic_cache(n_layers=3, kv_heads=2, tokens=40, head_dim=32, q_heads=6, window=8)
    assert len(cache.layers) == 3 and cache.seq_len == 40
    assert cache.layers[0].keys.shape == (1, 2, 40, 32) and cache.layers[0].keys.dtype == np.float32
    assert cache.observations.queries[0].shape == (1, 6, 8, 32)


def test_every_shipped_pipeline_is_warmed():
    pipelines = shipped_pipelines()
    ids = {stage["id"] for config in pipelines for stage in config["stages"]}
    assert {"kivi", "ans", "snapkv", "enec", "zstd", "layerwise"} <= ids  # the kernels a request may need
    cache = synthetic_cache(n_layers=30, kv_heads=3, head_dim=64)  # the shipped library's model (mixed widths per layer)
    for config in pipelines:  # each runs on the synthetic cache (observations for the selectors)
        Pipeline.decode_data(Pipeline.from_config(config).encode(cache))
    assert warm_up(pipelines[:1]) > 0


def test_cli_kv_warm(capsys):
    assert main(["kv", "warm"]) == 0
    assert "compiled or loaded the KV kernels" in capsys.readouterr().out
