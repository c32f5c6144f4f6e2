"""Named pipeline configs: the peers' methods as tensorwire pipelines, and starting points.

``tensorwire kv eval --pipeline kivi-2`` takes these names; any JSON pipeline config works
too. The peer methods are re-implemented as stages here (KIVI, CacheGen-style layer-wise
quantisation + entropy coding, kvpress's SnapKV/Knorm/StreamingLLM presses), so that every
method is measured with the same model, text and evaluator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .stage import StageConfigError

__all__ = ["PRESETS", "resolve"]

PRESETS: dict[str, dict[str, Any]] = {
    # The bf16 cache sent as is: what a server transfers without compression.
    "bf16": {"stages": [{"id": "cast", "dtype": "BF16"}]},
    # Lossless: the float32 cache through the tensorwire block codec.
    "lossless": {"stages": [{"id": "enec", "level": "max"}]},
    "kivi-4": {"stages": [{"id": "kivi", "k_bits": 4, "v_bits": 4, "group_size": 32, "residual": 128}]},
    "kivi-2": {"stages": [{"id": "kivi", "k_bits": 2, "v_bits": 2, "group_size": 32, "residual": 128}]},
    # CacheGen-style: more bits for early layers, then entropy coding of the codes.
    "cachegen": {"stages": [
        {"id": "layerwise", "early_bits": 6, "late_bits": 4, "early_fraction": 0.33, "group_size": 32, "residual": 0},
        {"id": "ans"},
    ]},
    "snapkv-0.5": {"stages": [{"id": "snapkv", "keep_fraction": 0.5, "window": 32, "kernel": 5}, {"id": "cast", "dtype": "BF16"}]},
    "knorm-0.5": {"stages": [{"id": "key_norm", "keep_fraction": 0.5}, {"id": "cast", "dtype": "BF16"}]},
    "streaming-0.5": {"stages": [{"id": "streaming_llm", "keep_fraction": 0.5, "sinks": 4}, {"id": "cast", "dtype": "BF16"}]},
    "fp8": {"stages": [{"id": "cast", "dtype": "F8_E4M3"}, {"id": "enec", "level": "max"}]},
}  # fmt: skip


def resolve(spec: str) -> dict[str, Any]:
    """A pipeline config from a preset name, a JSON string, or a path to a JSON file."""
    if spec in PRESETS:
        return PRESETS[spec]
    text = spec
    if not spec.lstrip().startswith(("{", "[")):
        path = Path(spec)
        if not path.is_file():
            raise StageConfigError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file nor JSON")
        text = path.read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StageConfigError(f"the pipeline config is not valid JSON: {exc}") from exc
    return config if isinstance(config, dict) else {"stages": config}
