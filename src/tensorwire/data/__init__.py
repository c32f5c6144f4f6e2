"""Files that ship inside the package: a sample text and the measured SmolLM2 profile library."""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLE_TEXT", "SMOLLM2_LIBRARY"]

HERE = Path(__file__).parent
SAMPLE_TEXT = HERE / "river_town.txt"  # original prose written for tensorwire
# Measured by `tensorwire profile` on this project's reference machine (FORMAT.md section 7).
SMOLLM2_LIBRARY = HERE / "profiles-smollm2-135m.json"
