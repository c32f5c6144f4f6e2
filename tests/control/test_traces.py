"""Bandwidth traces: the built-in shapes, trace files, and what is rejected."""

import json

import numpy as np
import pytest

from tensorwire.control.traces import Trace, bursty_trace, make_trace, random_walk_trace, step_trace


def test_step_trace():
    t = step_trace(9)
    assert t.gbps.tolist() == pytest.approx([1, 1, 1, 100, 100, 100, 5, 5, 5])
    assert len(step_trace(10)) == 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_walk_and_bursty_stay_in_bounds(seed):
    walk = random_walk_trace(3000, seed=seed).gbps
    assert walk.min() >= 1.0 - 1e-9 and walk.max() <= 50.0 + 1e-9
    assert walk.max() / walk.min() > 5  # it does wander
    bursty = bursty_trace(3000, seed=seed).gbps
    assert bursty.min() >= 11.0 - 1e-9 and bursty.max() <= 48.0 + 1e-9
    jumps = np.abs(np.diff(np.log(bursty)))
    assert jumps.max() > 0.3 and np.median(jumps) < 0.1  # calm most of the time, sudden changes sometimes
    assert np.array_equal(bursty_trace(100, seed=seed).bandwidth_bps, bursty_trace(100, seed=seed).bandwidth_bps)


def test_trace_files(tmp_path):
    (tmp_path / "a.txt").write_text("gbps\n# measured\n10\n20.5\n\n30,extra\n")
    t = Trace.load(tmp_path / "a.txt")
    assert t.name == "a" and t.gbps.tolist() == pytest.approx([10, 20.5, 30])
    (tmp_path / "b.json").write_text(json.dumps({"gbps": [1, 2]}))
    assert Trace.load(tmp_path / "b.json").gbps.tolist() == pytest.approx([1, 2])
    assert len(make_trace(str(tmp_path / "a.txt"), 7)) == 7  # repeated to the run's length
    (tmp_path / "bad.txt").write_text("10\nfast\n")
    with pytest.raises(ValueError, match="fast"):
        Trace.load(tmp_path / "bad.txt")


@pytest.mark.parametrize("values", [[], [1.0, -2.0], [float("nan")], [0.0]])
def test_bad_traces_are_rejected(values):
    with pytest.raises(ValueError, match="trace"):
        Trace.from_gbps("t", values)


def test_unknown_trace_name():
    with pytest.raises(ValueError, match="unknown trace"):
        make_trace("sine", 10)
