"""The bandwidth estimator: EWMA and harmonic mean, bad samples rejected."""

import pytest

from tensorwire.control import BandwidthEstimator, ControlWarning


def test_ewma_estimator():
    e = BandwidthEstimator("ewma", alpha=0.5)
    assert e.estimate is None
    for x in (1e9, 3e9):
        e.add(x)
    assert e.estimate == pytest.approx(2e9)


def test_harmonic_estimator_is_pulled_down_by_slow_transfers():
    e = BandwidthEstimator("harmonic", window=4)
    for x in (10e9, 10e9, 10e9, 1e9):
        e.add(x)
    assert e.estimate == pytest.approx(4 / (3 / 10e9 + 1 / 1e9))
    for x in (10e9,) * 4:
        e.add(x)
    assert e.estimate == pytest.approx(10e9)  # the window forgets


@pytest.mark.parametrize("bad", [float("nan"), -1.0, 0.0, float("inf"), None, "1e9", True])
def test_estimator_rejects_bad_samples(bad):
    e = BandwidthEstimator(initial=5e9)
    with pytest.warns(ControlWarning, match="ignored"):
        assert e.add(bad) is False
    assert e.estimate == 5e9 and e.samples == 0 and e.rejected == 1


def test_estimator_parameters_are_validated():
    with pytest.raises(ValueError, match="method"):
        BandwidthEstimator("median")
    with pytest.raises(ValueError, match="alpha"):
        BandwidthEstimator(alpha=0)
    with pytest.raises(ValueError, match="initial"):
        BandwidthEstimator(initial=float("nan"))
