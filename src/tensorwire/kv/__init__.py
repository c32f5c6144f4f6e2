"""KV-cache compression (the KVServe method): composable pipelines of stages.

``Pipeline`` encodes a transformers cache into a self-describing payload and decodes it
back into a cache that generation continues from; ``Stage.from_config`` builds any
registered stage. See ``stage.py`` for the stage kinds and ``pipeline.py`` for the order.
"""

from .pipeline import Pipeline
from .stage import KVCacheData, KVLayer, Observations, Plane, ShapeMismatch, Stage, StageConfigError

__all__ = ["Pipeline", "Stage", "KVCacheData", "KVLayer", "Observations", "Plane", "StageConfigError", "ShapeMismatch"]
