"""The analyzer's rules on synthetic records (simulate.py) and on hand-made edge cases."""

from __future__ import annotations

import pytest

from tensorwire.diagnose.analyzer import Analyzer, Settings, analyze_records
from tensorwire.diagnose.faults import Fault
from tensorwire.diagnose.report import report_json, report_text
from tensorwire.diagnose.simulate import simulate, synthetic_records

WORLD = 16
FAULTS = {
    "straggler": Fault("straggler", 5, 12, seconds=0.05),
    "slow_link": Fault("slow_link", 5, 12, seconds=0.02, peer=6),
    "hang": Fault("hang", 5, 12),
    "crash": Fault("crash", 5, 12),
    "desync_op": Fault("desync", 5, 12, mode="op"),
    "desync_size": Fault("desync", 5, 12, mode="size"),
}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_each_fault_is_named_alone(name):
    fault = FAULTS[name]
    result = simulate(WORLD, fault, steps=24, settings=Settings(hang_timeout_s=3.0))
    assert result.right, result.findings
    assert result.seconds_to_detect is not None and result.seconds_to_detect >= 0
    if fault.kind == "hang":  # reported after the timeout, and well within twice it
        assert 3.0 <= result.seconds_to_detect < 6.0
    if fault.kind == "straggler":  # within a few steps of 0.2 s
        assert result.seconds_to_detect < 10 * 0.25


@pytest.mark.parametrize("seed", range(3))
def test_clean_runs_raise_nothing(seed):
    assert simulate(WORLD, None, steps=30, seed=seed).findings == []


def test_straggler_below_the_noise_is_not_accused():
    # 1 % of a step is inside the jitter: no rule may name it
    result = simulate(WORLD, Fault("straggler", 3, 10, seconds=0.002), steps=30)
    assert result.findings == []


def test_hung_job_replayed_as_stopped_names_no_crash():
    records = synthetic_records(8, 20, Fault("hang", 2, 10), hang_timeout_s=2.0)
    stopped = analyze_records(records, Settings(hang_timeout_s=2.0), final=False)
    assert [(f.kind, f.ranks) for f in stopped.findings] == [("hang", (2,))]


def test_report_text_and_json():
    analyzer = analyze_records(synthetic_records(8, 20, Fault("desync", 1, 8)), Settings())
    text = report_text(analyzer)
    assert "DESYNC" in text and "rank 1" in text and "8/8 ranks seen" in text
    data = report_json(analyzer, command=["x"])
    assert data["findings"][0]["kind"] == "desync" and data["findings"][0]["ranks"] == [1]
    assert data["settings"]["hang_timeout_s"] == Settings().hang_timeout_s
    assert data["command"] == ["x"]


def _op(r, seq, t0, t1, op="all_reduce", n=4, step=1, peer=-1, err=None, id_=None):
    return {"k": "op", "r": r, "id": id_ if id_ is not None else seq, "pg": "default", "seq": seq, "op": op,
            "n": n, "peer": peer, "step": step, "t0": t0, "t1": t1, "err": err}


def test_visibility_names_what_was_not_seen():
    a = Analyzer(world=4)
    a.feed([{"k": "hello", "r": 0, "w": 4, "pid": 1, "host": "h", "t": 1},
            {"k": "hb", "r": 0, "t": 2, "cpu": 0.0, "steal": 0.0, "rss": 0, "rx": 0, "tx": 0, "drop": 17, "step": 0},
            {"k": "end", "r": 0, "id": 99, "t1": 3, "err": None}])
    vis = a.visibility()
    assert vis["never_heard"] == [1, 2, 3]
    assert vis["dropped_records"] == {0: 17}
    assert vis["orphan_ends"] == 1
    assert "never heard from ranks [1, 2, 3]" in report_text(a)


def test_desync_tie_of_two_waits_for_no_majority():
    a = Analyzer(world=2)
    a.feed([_op(0, 1, 10, None), _op(1, 1, 10, None, op="all_gather")])
    finding, = a.findings
    assert finding.kind == "desync" and "tie" in finding.evidence


def test_a_shifted_sequence_is_reported_once():
    a = Analyzer(world=3)
    # rank 2 calls one all_reduce too many: every later number differs, one report
    ops = [_op(r, s, 10 * s, 10 * s + 1, n=4 if (r != 2 or s == 1) else 8, id_=s) for s in range(1, 6) for r in range(3)]
    a.feed(ops)
    assert [(f.kind, f.ranks) for f in a.findings] == [("desync", (2,))]


def test_crash_named_by_failed_sends_after_the_job_ends():
    s = 1_000_000_000
    a = Analyzer(world=3)
    a.feed([{"k": "hello", "r": r, "w": 3, "pid": r, "host": "h", "t": 0} for r in range(3)])
    a.feed([_op(0, 1, s, s + 10, op="send", peer=1, err="RuntimeError: Connection closed by peer", id_=1),
            _op(2, 1, s, s + 10, op="recv", peer=1, err="RuntimeError: Connection closed by peer", id_=1)])
    a.finish(2 * s)
    assert [(f.kind, f.ranks) for f in a.findings] == [("crash", (1,))]


def test_silent_rank_while_others_go_on_is_a_crash():
    s = 1_000_000_000
    a = Analyzer(Settings(crash_after_s=1.0), world=2)
    a.feed([{"k": "hello", "r": 0, "w": 2, "pid": 1, "host": "h", "t": 0},
            {"k": "hello", "r": 1, "w": 2, "pid": 2, "host": "h", "t": 0},
            {"k": "step", "r": 1, "n": 5, "t": 3 * s}])
    assert [(f.kind, f.ranks) for f in a.check(3 * s)] == [("crash", (0,))]


def test_clean_exit_is_never_a_crash():
    a = Analyzer(world=2)
    a.feed([{"k": "hello", "r": r, "w": 2, "pid": r, "host": "h", "t": 0} for r in range(2)]
           + [{"k": "bye", "r": r, "t": 1} for r in range(2)])
    assert a.finish(10**12) == []


def test_stuck_collective_with_every_rank_inside():
    s = 1_000_000_000
    a = Analyzer(Settings(hang_timeout_s=1.0), world=2)
    a.feed([_op(r, 1, s, None) for r in range(2)]
           + [{"k": "hb", "r": r, "t": 3 * s, "cpu": 0.0, "steal": 0.0, "rss": 0, "rx": 0, "tx": 0, "drop": 0,
               "step": 1} for r in range(2)])
    finding, = a.check(3 * s)
    assert finding.kind == "hang" and finding.ranks == () and "stuck" in finding.evidence


def test_replay_jumps_over_a_long_silence():
    records = synthetic_records(4, 10, None)
    late = dict(records[-1], at=records[-1]["at"] + 3600 * 10**9)  # an hour later: no hour of ticks
    assert analyze_records(records + [late]).findings == []
