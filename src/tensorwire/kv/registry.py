"""Stage registry: id -> ``"module:Class"``, imported only when a stage is built.

Built-in KV stages are listed below; a plugin adds its own through the entry-point group
``tensorwire.stages`` (``name = "package.module:Class"``). Ids are unique across stage kinds
and, once released, never change meaning: payloads name their stages by id.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from ..errors import StageConfigError

__all__ = ["BUILTIN_STAGES", "stage_ids", "stage_class"]

_KV = "tensorwire.kv"
BUILTIN_STAGES: dict[str, str] = {
    # transforms
    "identity": f"{_KV}.transforms.identity:Identity",
    "hadamard": f"{_KV}.transforms.hadamard:Hadamard",
    # selectors
    "keep_all": f"{_KV}.selectors.keep_all:KeepAll",
    "streaming_llm": f"{_KV}.selectors.streaming_llm:StreamingLLM",
    "key_norm": f"{_KV}.selectors.key_norm:KeyNorm",
    "snapkv": f"{_KV}.selectors.snapkv:SnapKV",
    # quantizers
    "cast": f"{_KV}.quantizers.cast:Cast",
    "uniform": f"{_KV}.quantizers.uniform:Uniform",
    "kivi": f"{_KV}.quantizers.kivi:KIVI",
    "headwise": f"{_KV}.quantizers.headwise:HeadwiseMixed",
    "layerwise": f"{_KV}.quantizers.layerwise:LayerwiseBits",
    "mixed": f"{_KV}.quantizers.mixed:MixedBits",
    # encoders: array -> bytes
    "raw": f"{_KV}.encoders.raw:Raw",
    "enec": f"{_KV}.encoders.enec:Enec",
    "ans": f"{_KV}.encoders.ans:ANS",
    # encoders: bytes -> bytes
    "zstd": f"{_KV}.encoders.zstd:Zstd",
    "lz4": f"{_KV}.encoders.lz4:LZ4",
}


@lru_cache(maxsize=1)
def _plugins() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group="tensorwire.stages") if ep.name not in BUILTIN_STAGES}


def stage_ids() -> list[str]:
    """Every registered stage id, built-in and plugin."""
    return sorted({**BUILTIN_STAGES, **_plugins()})


def stage_class(stage_id: str):
    """The class registered under ``stage_id``; raises StageConfigError for an unknown id."""
    target = BUILTIN_STAGES.get(stage_id) or _plugins().get(stage_id)
    if target is None:
        raise StageConfigError(f"unknown stage id {stage_id!r}; registered ids: {', '.join(stage_ids())}")
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)  # MissingDependency propagates with its extra
    try:
        return getattr(module, class_name)
    except AttributeError as exc:
        raise StageConfigError(f"stage {stage_id!r} points at {target}, which does not exist") from exc
