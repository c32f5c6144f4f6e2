"""Residual bandits: learning, forgetting, change detection, bad samples, reproducibility."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tensorwire.control.bandit import DiscountedThompson, DiscountedUCB, ResidualPrior
from tensorwire.errors import ControlWarning


def noisy(rng, level, sigma=0.08):
    return level * math.exp(rng.normal(0.0, sigma))


def test_fresh_arm_is_the_prior():
    b = DiscountedThompson(seed=0)
    s = b.state("never-seen")
    assert s.n == 0 and s.mean_log == 0 and s.std_log == pytest.approx(0.1)
    assert b.expected("never-seen") == 1.0
    assert 1.0 < b.upper("never-seen", 0.9) < 1.3


def test_learns_a_constant_residual():
    rng = np.random.default_rng(1)
    b = DiscountedThompson(seed=0)
    for _ in range(200):
        b.step()
        b.update("p", noisy(rng, 1.3))
    assert b.expected("p") == pytest.approx(1.3, rel=0.05)
    assert b.state("p").sigma_log == pytest.approx(0.08, rel=0.3)
    samples = [b.sample("p") for _ in range(500)]
    assert np.median(samples) == pytest.approx(1.3, rel=0.05)


def test_same_seed_same_samples():
    a, b = DiscountedThompson(seed=7), DiscountedThompson(seed=7)
    for arm in ("x", "y"):
        for bandit in (a, b):
            bandit.update(arm, 1.1)
    assert [a.sample("x") for _ in range(10)] == [b.sample("x") for _ in range(10)]


@pytest.mark.parametrize("cls", [DiscountedThompson, DiscountedUCB])
def test_a_2x_slowdown_is_learned_within_a_few_observations(cls):
    rng = np.random.default_rng(2)
    b = cls(seed=0)
    for _ in range(300):  # long, stable history: the hard case for a discounted posterior
        b.step()
        b.update("p", noisy(rng, 1.0))
    for k in range(1, 4):
        b.step()
        b.update("p", noisy(rng, 2.0))
        if b.expected("p") > 1.5:
            break
    assert b.expected("p") > 1.5, "the change detector should restart the arm within 3 observations"
    assert k <= 2 and b.restarts.get("p") == 1


def test_a_moderate_shift_is_caught_by_cusum():
    rng = np.random.default_rng(3)
    b = DiscountedThompson(seed=0)
    for _ in range(300):
        b.step()
        b.update("p", noisy(rng, 1.0))
    for _ in range(8):  # +35 %: ~4 noise standard deviations, not enough for one observation alone
        b.step()
        b.update("p", noisy(rng, 1.35))
    assert b.restarts.get("p", 0) >= 1
    assert b.expected("p") == pytest.approx(1.35, rel=0.1)


def test_no_false_restarts_on_stationary_noise():
    rng = np.random.default_rng(4)
    b = DiscountedThompson(seed=0)
    for _ in range(500):
        b.step()
        b.update("p", noisy(rng, 1.1))
    assert b.restarts.get("p", 0) <= 2  # CUSUM(k=0.5, h=5): about one per ~450 observations


def test_forgotten_arm_widens_back_to_the_prior():
    rng = np.random.default_rng(5)
    b = DiscountedThompson(discount=0.95, seed=0)
    for _ in range(10):
        b.step()
        b.update("slow", noisy(rng, 2.0))
    tight = b.state("slow")
    for _ in range(200):  # other arms are used; "slow" is only discounted
        b.step()
    loose = b.state("slow")
    assert loose.n < 0.01 * tight.n
    assert loose.std_log > 2 * tight.std_log
    assert loose.mean_log < 0.1 * tight.mean_log  # back towards "as measured": it will be re-tried


def test_ucb_is_optimistic_and_deterministic():
    b = DiscountedUCB(c=1.0)
    b.update("p", 1.2)
    assert b.sample("p") < b.expected("p")
    assert b.sample("p") == b.sample("p")
    assert DiscountedUCB(c=0.0).sample("fresh") == 1.0


@pytest.mark.parametrize("bad", [math.nan, -1.0, 0.0, math.inf, "fast", None])
def test_bad_residual_is_ignored_with_a_warning(bad):
    b = DiscountedThompson(seed=0)
    b.update("p", 1.2)
    before = b.state("p")
    with pytest.warns(ControlWarning, match="ignored"):
        assert b.update("p", bad) is False
    assert b.state("p") == before


def test_extreme_residual_is_clipped():
    b = DiscountedThompson(seed=0)
    b.update("p", 1e9)
    assert math.isfinite(b.state("p").mean_log) and b.expected("p") <= 20.0


@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=60), st.floats(0.8, 1.0))
def test_posterior_stays_finite(residuals, discount):
    b = DiscountedThompson(discount=discount, seed=0)
    for r in residuals:
        b.step()
        b.update("p", r)
        s = b.state("p")
        assert all(math.isfinite(v) for v in (s.n, s.mean_log, s.std_log, s.sigma_log))
        assert s.std_log > 0 and 0 < b.sample("p") < math.inf


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="discount"):
        DiscountedThompson(discount=0.0)
    with pytest.raises(ValueError, match="change"):
        DiscountedThompson(change=0.0)
    with pytest.raises(ValueError, match="c is"):
        DiscountedUCB(c=-1)
    with pytest.raises(ValueError, match="ResidualPrior"):
        ResidualPrior(tau=0.0)
