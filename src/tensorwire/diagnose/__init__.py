"""Diagnosis of slow and hung collectives in torch.distributed jobs (the CCL-D method).

``tensorwire diagnose run -- torchrun ...`` runs a job with :mod:`.probe` in every rank and
:mod:`.analyzer` beside it (:func:`.launch.run`); :func:`install` puts the probe in a job by
one call instead. Nothing here imports torch until it is used.
"""

from __future__ import annotations

from .analyzer import Analyzer, Finding, Settings, analyze_records
from .probe import install

__all__ = ["Analyzer", "Finding", "Settings", "analyze_records", "install"]
