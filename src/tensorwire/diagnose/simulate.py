"""The analyzer at scale: synthetic records of a data-parallel job of thousands of ranks.

Real jobs of 4,000 ranks are out of reach here; the records such a job's probes would send
are not. Each step every rank computes (a time with jitter), enters one collective (a ring of
point-to-point transfers, as ring all-reduce moves data), and the step ends when the
last rank's data has gone round. Faults change the records the way the real injector changes
a real job (faults.py). The analyzer reads them through the same replay as a saved file,
and the wall time it takes is measured.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from .analyzer import Analyzer, Settings, analyze_records
from .faults import Fault

__all__ = ["SimulationResult", "simulate", "synthetic_records"]


def synthetic_records(world: int, steps: int, fault: Fault | None = None, *, step_s: float = 0.2,
                      jitter: float = 0.03, link_ms: float = 1.0, flush_s: float = 0.1, hang_timeout_s: float = 10.0,
                      seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    ns = 1_000_000_000
    t = 1_700_000_000 * ns
    out: list[dict] = []
    ids = [0] * world
    seq = 0
    pair_seq = [0] * world

    def add(rec: dict, when: int) -> None:
        rec["at"] = when + int(flush_s * ns * rng.random())
        out.append(rec)

    def op(r, name, n, peer, step, t0, t1, s, err=None):
        ids[r] += 1
        add({"k": "op", "r": r, "id": ids[r], "pg": "default", "seq": s, "op": name, "n": n, "peer": peer,
             "step": step, "t0": t0, "t1": t1, "err": err}, t1 if t1 is not None else t0 + int(flush_s * ns))

    for r in range(world):
        add({"k": "hello", "r": r, "w": world, "pid": 1000 + r, "host": f"node{r // 8}", "t": t}, t)
    dead: set[int] = set()
    end_t = t
    for step in range(1, steps + 1):
        faulty = fault is not None and step >= fault.step
        enter = {}
        for r in range(world):
            if r in dead:
                continue
            add({"k": "step", "r": r, "n": step, "t": t}, t)
            compute = step_s * 0.7 * (1 + rng.gauss(0, jitter))
            if faulty and r == fault.rank and fault.kind == "straggler":
                compute += fault.seconds
            enter[r] = t + int(compute * ns)
        if faulty and fault.kind in ("hang", "crash") and step == fault.step:
            dead.add(fault.rank)
            enter.pop(fault.rank, None)
            seq += 1
            for r, e in enter.items():
                err = "RuntimeError: Connection closed by peer" if fault.kind == "crash" else None
                op(r, "ddp_bucket", 4 << 20, -1, step, e, e + int(0.05 * ns) if err else None, seq, err)
            if fault.kind == "crash":
                end_t = max(enter.values()) + int(0.05 * ns)
            else:  # the others wait; only heartbeats go on until the timeout has passed twice
                end_t = max(enter.values()) + int(2 * hang_timeout_s * ns)
                for beat in range(int(2 * hang_timeout_s / 0.25)):
                    bt = max(enter.values()) + int(beat * 0.25 * ns)
                    for r in range(world):
                        add({"k": "hb", "r": r, "t": bt, "cpu": 0.0, "steal": 0.0, "rss": 1 << 30, "rx": 0, "tx": 0,
                             "drop": 0, "step": step}, bt)
            break
        last_in = max(enter.values())
        seq += 1
        transfer = {}
        for r in range(world):
            dst = (r + 1) % world
            ms = link_ms * (1 + abs(rng.gauss(0, 0.2)))
            if faulty and fault.kind == "slow_link" and (r, dst) == (fault.rank, fault.peer):
                ms += fault.seconds * 1000
            transfer[r] = int(ms * 1e6)
            pair_seq[r] += 1
            send_t0 = last_in + int(0.0005 * ns * rng.random())
            op(r, "send", 1 << 20, dst, step, send_t0, send_t0 + transfer[r], pair_seq[r])
            op(dst, "recv", 1 << 20, r, step, last_in, send_t0 + transfer[r], pair_seq[r])
        done = last_in + 2 * (world - 1) // max(world - 1, 1) * max(transfer.values()) + int(0.002 * ns)
        for r, e in enter.items():
            n = 4 << 20
            name = "ddp_bucket"
            if faulty and fault.kind == "desync" and r == fault.rank and step == fault.step:
                name, n = ("all_gather", n * world) if fault.mode == "op" else (name, n + 4)
            op(r, name, n, -1, step, e, done, seq)
            if step % 2 == 0:
                add({"k": "hb", "r": r, "t": done, "cpu": step * step_s, "steal": 0.0, "rss": 1 << 30, "rx": 0,
                     "tx": 0, "drop": 0, "step": step}, done)
        t = done + int(0.01 * ns)
        end_t = t
    if fault is None or fault.kind not in ("hang", "crash"):
        for r in range(world):
            add({"k": "bye", "r": r, "t": end_t}, end_t)
    return out


@dataclass
class SimulationResult:
    world: int
    fault: Fault | None
    records: int
    simulated_s: float
    analyze_s: float
    findings: list
    right: bool
    seconds_to_detect: float | None


def simulate(world: int, fault: Fault | None, steps: int = 30, settings: Settings | None = None,
             seed: int = 0) -> SimulationResult:
    """Generate the records of one run and time the analyzer replaying them."""
    settings = settings or Settings()
    records = synthetic_records(world, steps, fault, hang_timeout_s=settings.hang_timeout_s, seed=seed)
    start = time.perf_counter()
    # a hung job does not end by itself: the launcher stops it, and says so in the file
    analyzer: Analyzer = analyze_records(records, settings, final=fault is None or fault.kind != "hang")
    elapsed = time.perf_counter() - start
    want = None
    if fault is not None:
        want = (fault.kind, tuple(sorted((fault.rank, fault.peer))) if fault.kind == "slow_link" else (fault.rank,))
    named = [(f.kind, f.ranks) for f in analyzer.findings]
    right = named == [want] if want else not named
    first = next((f for f in analyzer.findings if (f.kind, f.ranks) == want), None)
    span = (max(r["at"] for r in records) - min(r["at"] for r in records)) / 1e9
    return SimulationResult(world, fault, len(records), span, elapsed, [f.to_json() for f in analyzer.findings], right,
                            first.seconds_to_detect if first else None)
