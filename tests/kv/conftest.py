from __future__ import annotations

from pathlib import Path

import pytest

from tensorwire.data import SAMPLE_TEXT  # original prose written for tensorwire (no licence strings attached)


@pytest.fixture(scope="session")
def sample_text() -> Path:
    return SAMPLE_TEXT
