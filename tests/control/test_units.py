"""Checks and display forms of sizes, times and link speeds."""

import math

import pytest

from tensorwire.control.units import format_bandwidth, format_seconds, is_positive


@pytest.mark.parametrize("t, text", [(2.5, "2.5 s"), (0.0123, "12.3 ms"), (4e-6, "4 us"), (math.inf, "inf"),
                                     (math.nan, "nan")])  # fmt: skip
def test_format_seconds(t, text):
    assert format_seconds(t) == text


def test_format_bandwidth():
    assert format_bandwidth(1.25e9) == "10 Gbps" and format_bandwidth(None) == "unknown"


@pytest.mark.parametrize("x, ok", [(1, True), (2.5e9, True), (0, False), (-1.0, False), (math.nan, False),
                                   (math.inf, False), (True, False), ("3", False), (None, False)])  # fmt: skip
def test_is_positive(x, ok):
    assert is_positive(x) is ok
