"""The probe's buffer and channel, against a real aggregator (torch's TCPStore) in this process."""

from __future__ import annotations

import socket
import time

import pytest

pytest.importorskip("torch")

from tensorwire.diagnose.aggregator import Aggregator
from tensorwire.diagnose.probe import QUEUE_KEY, Probe
from tensorwire.diagnose.records import read_records


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_records_reach_the_aggregator(tmp_path):
    agg = Aggregator(poll_s=0.02).start()
    probe = Probe(agg.address, rank=0, world=1, flush_s=0.02).start()
    try:
        rec = probe.begin("all_reduce", "default", 4096)
        probe.end(rec)
        probe.mark_step()
        send = probe.begin("isend", "default", 16, peer=3)
        assert wait_for(lambda: any(r["k"] == "op" and r.get("op") == "send" and r["t1"] is None
                                    for r in agg.records)), "an op in flight is announced"
        probe.end(send)
        probe.stop()
        assert wait_for(lambda: any(r["k"] == "bye" for r in agg.records))
    finally:
        agg.stop()
    kinds = [r["k"] for r in agg.records]
    assert kinds[0] == "hello" and "hb" in kinds and "step" in kinds and kinds[-1] == "bye"
    ops = [r for r in agg.records if r["k"] == "op"]
    assert ops[0]["op"] == "all_reduce" and ops[0]["seq"] == 1 and ops[0]["t1"] >= ops[0]["t0"]
    assert ops[1]["op"] == "send" and ops[1]["peer"] == 3 and ops[1]["step"] == 1
    end, = [r for r in agg.records if r["k"] == "end"]
    assert end["id"] == ops[1]["id"]
    assert all("at" in r for r in agg.records)
    agg.save(tmp_path / "records.jsonl", world=1)
    assert read_records(tmp_path / "records.jsonl")[1] == agg.records


def test_pair_sequence_numbers_follow_the_direction():
    probe = Probe(None, rank=1, world=3)
    recs = [probe.begin(op, "default", 8, peer=p) for op, p in
            (("send", 2), ("recv", 0), ("isend", 2), ("irecv", 2), ("recv", 0))]
    assert [(r["op"], r["seq"]) for r in recs] == [("send", 1), ("recv", 1), ("send", 2), ("recv", 1), ("recv", 2)]


def test_unreachable_aggregator_costs_records_not_the_job():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nobody listens there
    probe = Probe(f"127.0.0.1:{port}", rank=0, world=1, flush_s=0.01, connect_timeout_s=0.2).start()
    t0 = time.perf_counter()
    for _ in range(1000):
        probe.end(probe.begin("all_reduce", "default", 4))
    job_s = time.perf_counter() - t0
    assert wait_for(lambda: probe.dropped > 0)
    probe.stop()
    assert probe.sent == 0
    assert job_s < 5.0  # the job's thread never waits on the network (a generous bound, not a benchmark)


def test_full_buffer_drops_oldest_and_counts():
    probe = Probe(None, rank=0, world=1, max_buffer=10)
    for _ in range(25):
        probe.end(probe.begin("barrier", "default", 0))
    assert probe.dropped == 15


def test_bad_batch_costs_only_itself():
    import datetime

    import torch.distributed as dist

    agg = Aggregator(poll_s=0.02).start()
    host, _, port = agg.address.rpartition(":")
    client = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=5))
    client.queue_push(QUEUE_KEY, b'{"k": "op"')
    client.queue_push(QUEUE_KEY, b'{"k": "bye", "r": 2, "t": 5}\n')
    try:
        assert wait_for(lambda: agg.records)
    finally:
        agg.stop()
    assert [r["k"] for r in agg.records] == ["bye"]
    assert len(agg.bad_batches) == 1 and "cut short" in agg.bad_batches[0]
