"""The analyzer: from the ranks' records, which rank is at fault and how (the CCL-D method).

It reads the records the way a collective works: no rank leaves a collective before the
last one has entered it, and a point-to-point transfer cannot end before it was sent.

straggler
    A rank whose compute between steps (from the end of its last collective of one step to
    its first collective of the next, both on its own clock) exceeds the peers' of the same
    step by more than its own history explains: the median excess of the last few steps is
    over a share of the step time and several times the job's noise. Measured per rank, so
    clocks need not agree, and against the peers of the same step, so a step that is slow
    for everyone (a bigger batch, a busy host) accuses no one.
slow link
    A pair whose transfers (receive end minus the later of send and receive start) take
    several times the other pairs' median: the delay is on the path, not at either end.
hang
    Ranks have waited in a collective longer than the timeout while a live rank (its
    heartbeat goes on) never entered it.
crash
    A rank fell silent (no heartbeat for ``crash_after_s``, no clean exit) while the others
    go on, or while the others' ops fail after its last sign of life.
desync
    At one sequence number of a process group, a rank called another op or size than the
    majority (or an op more or fewer, which shifts what it calls at each number after).

Online, the aggregator feeds records as they arrive and calls :meth:`Analyzer.check`; offline,
:func:`analyze_records` replays a saved file through the same code.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, field

__all__ = ["FAULT_KINDS", "Analyzer", "Finding", "Settings", "analyze_records"]

FAULT_KINDS = ("straggler", "slow_link", "hang", "crash", "desync")


@dataclass(frozen=True)
class Settings:
    """Thresholds of the analyzer (the benchmark ran these, with a 5 s hang timeout)."""

    hang_timeout_s: float = 10.0
    crash_after_s: float = 2.0
    straggler_rel: float = 0.10
    straggler_noise: float = 3.0
    straggler_min_ms: float = 3.0
    straggler_window: int = 5
    link_factor: float = 3.0
    link_min_ms: float = 5.0
    link_samples: int = 4
    link_hits: int = 2


@dataclass(frozen=True)
class Finding:
    kind: str
    ranks: tuple[int, ...]
    detected_ns: int
    onset_ns: int | None
    step: int | None
    evidence: str
    detail: dict = field(default_factory=dict)

    @property
    def seconds_to_detect(self) -> float | None:
        return None if self.onset_ns is None else (self.detected_ns - self.onset_ns) / 1e9

    def to_json(self) -> dict:
        out = asdict(self)
        out["ranks"] = list(self.ranks)
        out["seconds_to_detect"] = self.seconds_to_detect
        return out


@dataclass
class _Rank:
    world: int = 0
    last_t: int = 0
    bye: bool = False
    dropped: int = 0
    step: int = 0
    seq: int = 0
    cpu: list = field(default_factory=lambda: deque(maxlen=8))


class _Instance(dict):
    """One collective instance: rank -> its op, with running counts so that no rule rescans it."""

    def __init__(self):
        super().__init__()
        self.sigs: Counter = Counter()
        self.ended = 0


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.1f} ms"


class Analyzer:
    """Incremental analysis of a job's records; see the module docstring for the rules."""

    def __init__(self, settings: Settings | None = None, world: int | None = None):
        self.settings = settings or Settings()
        self.world = world or 0
        self.ranks: dict[int, _Rank] = defaultdict(_Rank)
        self.findings: list[Finding] = []
        self.records = 0
        self.orphans = 0
        self._reported: set[tuple[str, tuple[int, ...]]] = set()
        self._ops: dict[tuple[int, int], dict] = {}
        self._instances: dict[tuple[str, int], _Instance] = {}
        self._desync_checked: set[tuple[str, int]] = set()
        self._first_of_step: dict[str, dict[int, tuple[str, int]]] = defaultdict(dict)
        self._noted_step: dict[str, int] = defaultdict(int)
        self._last_end: dict[int, dict[int, int]] = defaultdict(dict)
        self._excess: dict[int, deque] = defaultdict(lambda: deque(maxlen=64))
        self._steps_seen = 0
        self._straggler_checked = 0
        self._transfers_seen = 0
        self._links_checked = 0
        self._step_t: dict[int, dict[int, int]] = defaultdict(dict)
        self._step_ns: deque = deque(maxlen=200)
        self._pairs: dict[tuple[int, int, int], dict[str, dict]] = {}
        self._transfers: dict[tuple[int, int], deque] = defaultdict(lambda: deque(maxlen=8))
        self._link_hits: Counter = Counter()
        self._errors: list[tuple[int, int, int, str]] = []  # rank, peer (-1: a collective), t1, message
        self._new: list[Finding] = []

    # -- input ------------------------------------------------------------------------------------
    def feed(self, records) -> None:
        for rec in records:
            self.records += 1
            kind, r = rec["k"], rec["r"]
            state = self.ranks[r]
            t = rec.get("t") or rec.get("t1") or rec.get("t0") or 0
            state.last_t = max(state.last_t, t)
            if kind == "op":
                self._on_op(dict(rec))
            elif kind == "end":
                op = self._ops.get((r, rec["id"]))
                if op is None:
                    self.orphans += 1
                else:
                    op["t1"], op["err"] = rec["t1"], rec["err"]
                    self._on_end(op)
            elif kind == "step":
                self._on_step(r, rec["n"], rec["t"])
            elif kind == "hb":
                state.dropped, state.step = rec["drop"], rec["step"]
                state.cpu.append((rec["t"], rec["cpu"], rec["steal"]))
            elif kind == "hello":
                state.world = rec["w"]
                self.world = max(self.world, rec["w"])
            elif kind == "bye":
                state.bye = True

    def _on_op(self, op: dict) -> None:
        r = op["r"]
        if op["peer"] < 0:
            self.ranks[r].seq = max(self.ranks[r].seq, op["seq"])
            key = (op["pg"], op["seq"])
            inst = self._instances.get(key)
            if inst is None:
                inst = self._instances[key] = _Instance()
            inst[r] = op
            inst.sigs[(op["op"], op["n"])] += 1
            first = self._first_of_step[op["pg"]]
            if op["step"] > self._noted_step[op["pg"]] and (op["step"] not in first or first[op["step"]][1] > op["seq"]):
                first[op["step"]] = key
            self._check_desync(key, inst)
        else:
            src, dst = (r, op["peer"]) if op["op"] == "send" else (op["peer"], r)
            self._pairs.setdefault((src, dst, op["seq"]), {})[op["op"]] = op
        if op["t1"] is None:
            self._ops[(r, op["id"])] = op
        else:
            self._on_end(op)

    def _on_end(self, op: dict) -> None:
        self._ops.pop((op["r"], op["id"]), None)
        if op["err"] is not None:
            self._errors.append((op["r"], op["peer"], op["t1"], op["err"]))
        if op["peer"] < 0:
            ends = self._last_end[op["r"]]
            ends[op["step"]] = max(ends.get(op["step"], 0), op["t1"])
            ends.pop(op["step"] - 3, None)
            key = (op["pg"], op["seq"])
            inst = self._instances.get(key)
            if inst is not None:
                inst.ended += 1
            if inst is not None and inst.ended >= len(inst) >= self.world:
                del self._instances[key]
                if self._first_of_step[op["pg"]].get(op["step"]) == key:
                    del self._first_of_step[op["pg"]][op["step"]]
                    self._noted_step[op["pg"]] = max(self._noted_step[op["pg"]], op["step"])
                    self._note_compute(op["step"], inst)
        else:
            src, dst = (op["r"], op["peer"]) if op["op"] == "send" else (op["peer"], op["r"])
            pair = self._pairs.get((src, dst, op["seq"]))
            if pair and len(pair) == 2 and all(o["t1"] is not None and o["err"] is None for o in pair.values()):
                del self._pairs[(src, dst, op["seq"])]
                send, recv = pair["send"], pair["recv"]
                self._transfers[(src, dst)].append((recv["t1"] - max(send["t0"], recv["t0"]), send["t0"]))
                self._transfers_seen += 1

    def _on_step(self, r: int, n: int, t: int) -> None:
        times = self._step_t[r]
        times[n] = t
        if n - 1 in times:
            self._step_ns.append(t - times.pop(n - 1))

    def _note_compute(self, step: int, inst: dict[int, dict]) -> None:
        """Each rank's compute before this step's first collective, less the peers' median."""
        compute = {}
        for r, o in inst.items():
            before = self._last_end[r].get(step - 1)
            if before is not None and o["err"] is None:
                compute[r] = (o["t0"] - before, o["t0"])
        if len(compute) < max(2, len(inst) // 2 + 1):
            return
        median = statistics.median(c for c, _ in compute.values())
        for r, (c, t0) in compute.items():
            self._excess[r].append((step, c - median, t0))
        self._steps_seen += 1

    # -- rules ------------------------------------------------------------------------------------
    def _report(self, kind: str, ranks, now: int, onset: int | None, step: int | None, evidence: str,
                **detail) -> None:
        key = (kind, tuple(sorted(ranks)))
        if key in self._reported:
            return
        self._reported.add(key)
        finding = Finding(kind, key[1], now, onset, step, evidence, detail)
        self.findings.append(finding)
        self._new.append(finding)

    def _check_desync(self, key: tuple[str, int], inst: _Instance) -> None:
        if key in self._desync_checked or len(inst) < max(2, self.world // 2 + 1):
            return
        sigs = inst.sigs
        if len(sigs) == 1:
            if len(inst) >= self.world:
                self._desync_checked.add(key)
            return
        (majority, count), *rest = sigs.most_common()
        if rest and rest[0][1] == count and len(inst) < self.world:
            return  # a tie with ranks still to come: wait for them
        self._desync_checked.add(key)
        odd = sorted(r for r, o in inst.items() if (o["op"], o["n"]) != majority)
        if any(("desync", (r,)) in self._reported for r in odd):
            return  # the ops after a skipped or extra one all differ: one report
        found = "; ".join(f"rank {r} called {inst[r]['op']}({inst[r]['n']} B)" for r in odd)
        tie = " (a tie: which side is wrong cannot be told)" if rest and rest[0][1] == count else ""
        onset = min(inst[r]["t0"] for r in odd)
        now = max(o["t0"] for o in inst.values())
        self._report("desync", odd, now, onset, inst[odd[0]]["step"],
                     f"at {key[0]} #{key[1]}: {found}, where {count} ranks called "
                     f"{majority[0]}({majority[1]} B){tie}", pg=key[0], seq=key[1])

    def _check_crash(self, now: int, final: bool = False) -> set[int]:
        """Silent ranks (no record for ``crash_after_s``, no clean exit) that crashed.

        A silent rank is named when the others go on without it, or when a peer's send or
        receive to it failed (gloo says "connection closed by peer"). When the job is over
        (``final``) every rank is silent, and only the second kind of evidence counts: the
        ranks that the launcher killed after a crash are silent too, but nobody's op failed
        on them first.
        """
        limit = now - int(self.settings.crash_after_s * 1e9)
        silent = {r for r, s in self.ranks.items() if not s.bye and (final or s.last_t < limit)}
        alive = [] if final else [r for r, s in self.ranks.items() if r not in silent and not s.bye]
        failed_on = defaultdict(list)
        for p, peer, t, e in self._errors:
            if peer >= 0:
                failed_on[peer].append((p, e))
        # ranks move through their collectives together: one that fell silent behind all the others
        # (in the collectives it entered) stopped first
        seqs = sorted((s.seq, r) for r, s in self.ranks.items())
        accused = {r for _, ranks in self._reported for r in ranks}
        crashed = set()
        for r in sorted(silent):
            if final and r in accused:
                continue  # its fault is already named (a hung rank the launcher stopped is silent too)
            on_it = [(p, e) for p, e in failed_on.get(r, []) if p != r]
            others_min = next((q for q, other in seqs if other != r), 0)
            behind = final and self.ranks[r].seq < others_min
            if not on_it and not alive and not behind:
                continue
            crashed.add(r)
            if on_it:
                why = f"ops of ranks {sorted({p for p, _ in on_it})} with it failed ({on_it[0][1][:110]})"
            elif alive:
                why = f"ranks {sorted(alive)} go on"
            else:
                why = f"it had entered {self.ranks[r].seq} collectives, every other rank at least {others_min}"
            self._report("crash", [r], now, self.ranks[r].last_t, self.ranks[r].step,
                         f"rank {r} fell silent at step {self.ranks[r].step} without a clean exit; {why}")
        return crashed

    def _check_hang(self, now: int, crashed: set[int], final: bool = False) -> None:
        """Ranks waiting in a collective that a rank never entered; once the job is over
        (``final``), at any age: a rank that never entered and fell silent has crashed."""
        timeout = 0 if final else int(self.settings.hang_timeout_s * 1e9)
        ranks = set(range(self.world)) if self.world else set(self.ranks)
        for (pg, seq), inst in sorted(self._instances.items(), key=lambda kv: kv[0][1]):
            waiting = [o for o in inst.values() if o["t1"] is None]
            if not waiting:
                continue
            since = min(o["t0"] for o in waiting)
            if now - since < timeout:
                continue
            missing = sorted(ranks - set(inst) - crashed)
            op = waiting[0]
            if final:
                for r in missing:
                    if not self.ranks[r].bye:
                        self._report("crash", [r], now, self.ranks[r].last_t, op["step"],
                                     f"ranks {sorted(inst)} were waiting in {op['op']} {pg} #{seq} (step "
                                     f"{op['step']}) when the job ended; rank {r} never entered it and fell "
                                     "silent without a clean exit")
                return
            if missing:
                lines = []
                for r in missing:
                    s = self.ranks.get(r)
                    alive = "no record ever" if s is None or not s.last_t else \
                        f"alive ({(now - s.last_t) / 1e9:.1f} s since its last record, at step {s.step})"
                    lines.append(f"rank {r} never entered it, {alive}")
                self._report("hang", missing, now, since, op["step"],
                             f"ranks {sorted(inst)} have waited {(now - since) / 1e9:.1f} s in {op['op']} "
                             f"{pg} #{seq} (step {op['step']}); " + "; ".join(lines), pg=pg, seq=seq)
            elif len(inst) >= len(ranks) and not crashed:
                self._report("hang", [], now, since, op["step"],
                             f"every rank has been inside {op['op']} {pg} #{seq} for "
                             f"{(now - since) / 1e9:.1f} s: the collective itself is stuck (link or backend)",
                             pg=pg, seq=seq)

    def _check_straggler(self, now: int) -> None:
        st = self.settings
        w = st.straggler_window
        if len(self._step_ns) < 3 or self._steps_seen < w or self._steps_seen == self._straggler_checked:
            return
        self._straggler_checked = self._steps_seen
        step_ns = statistics.median(self._step_ns)
        # the job's noise: the typical size of a rank's excess before the window under test
        history = [abs(x) for xs in self._excess.values() for _, x, _ in list(xs)[:-w]]
        noise = statistics.median(history) if len(history) >= 4 * w else 0.0
        threshold = max(st.straggler_min_ms * 1e6, st.straggler_rel * step_ns, st.straggler_noise * noise)
        for rank, xs in self._excess.items():
            if len(xs) < w:
                continue
            items = list(xs)
            own = [x for _, x, _ in items[:-w]]
            base = statistics.median(own) if len(own) >= w else 0.0
            recent = items[-w:]
            excess = statistics.median(x for _, x, _ in recent) - base
            if excess <= threshold:
                continue
            late = [(s, x, t0) for s, x, t0 in recent if x - base > threshold]
            self._report("straggler", [rank], now, late[0][2] if late else None, late[0][0] if late else None,
                         f"rank {rank} computed {_ms(excess)} longer than its peers before the first "
                         f"collective of its last {w} steps (median, beyond its own usual "
                         f"{_ms(base)}; the step takes {_ms(step_ns)}, threshold {_ms(threshold)})"
                         f"{self._cpu_note(rank)}", excess_ms=[round(x / 1e6, 2) for _, x, _ in recent],
                         steps=[s for s, _, _ in recent])

    def _cpu_note(self, rank: int) -> str:
        samples = self.ranks[rank].cpu
        if len(samples) < 2:
            return ""
        (t0, c0, s0), (t1, c1, s1) = samples[0], samples[-1]
        wall = (t1 - t0) / 1e9
        return f"; its CPU use {100 * (c1 - c0) / wall:.0f} %, host steal {s1 - s0:.2f} s over {wall:.1f} s" \
            if wall > 0 else ""

    def _check_links(self, now: int) -> None:
        st = self.settings
        if self._transfers_seen == self._links_checked:
            return
        self._links_checked = self._transfers_seen
        medians = {pair: statistics.median(t for t, _ in xs) for pair, xs in self._transfers.items()
                   if len(xs) >= st.link_samples}
        if len(medians) < 2:
            return
        worst = max(medians, key=medians.get)
        rest = statistics.median(v for p, v in medians.items() if p != worst)
        if medians[worst] > max(st.link_factor * rest, rest + st.link_min_ms * 1e6):
            self._link_hits[worst] += 1
        else:
            self._link_hits[worst] = 0
        if self._link_hits[worst] >= st.link_hits:
            slow = [t0 for t, t0 in self._transfers[worst] if t > rest + st.link_min_ms * 1e6]
            src, dst = worst
            self._report("slow_link", [src, dst], now, min(slow) if slow else None, None,
                         f"transfers {src} -> {dst} take {_ms(medians[worst])} (median of the last "
                         f"{len(self._transfers[worst])}) where the other {len(medians) - 1} pairs take "
                         f"{_ms(rest)}; both ends entered on time", src=src, dst=dst)

    def check(self, now: int) -> list[Finding]:
        """Apply every rule at time ``now`` (ns); returns the findings new since the last call."""
        crashed = self._check_crash(now)
        self._check_hang(now, crashed)
        self._check_straggler(now)
        self._check_links(now)
        new, self._new = self._new, []
        return new

    def finish(self, now: int) -> list[Finding]:
        """The job is over: apply the rules once more, knowing no rank will speak again."""
        new = self.check(now)
        self._check_crash(now, final=True)
        self._check_hang(now, set(), final=True)
        new += self._new
        self._new = []
        return new

    def visibility(self) -> dict:
        """What the analyzer could not see: ranks never heard from, records the probes dropped."""
        seen = set(self.ranks)
        expected = set(range(self.world))
        return {"world": self.world, "ranks_seen": len(seen), "never_heard": sorted(expected - seen),
                "dropped_records": {r: s.dropped for r, s in sorted(self.ranks.items()) if s.dropped},
                "orphan_ends": self.orphans, "records": self.records}


def analyze_records(records: list[dict], settings: Settings | None = None, tick_s: float = 0.1,
                    world: int | None = None, final: bool = True) -> Analyzer:
    """Replay saved records (in the order the aggregator received them) through the analyzer.

    ``final``: the job ended on its own, so ranks silent at the end stay silent (the crash
    rules that need it apply); False for a job the launcher stopped (the file's header says).
    """
    analyzer = Analyzer(settings, world)
    if not records:
        return analyzer
    ordered = sorted(records, key=lambda r: r.get("at", 0))
    tick = int(tick_s * 1e9)
    start = ordered[0].get("at", 0)
    boundary, batch = start + tick, []
    for rec in ordered:
        at = rec.get("at", 0)
        if at >= boundary:
            analyzer.feed(batch)
            analyzer.check(boundary)
            # the next tick after this record, without stepping through a long silence tick by tick
            batch, boundary = [], max(boundary + tick, at - (at - start) % tick)
            if at >= boundary:
                analyzer.check(boundary)
                boundary += tick
        batch.append(rec)
    analyzer.feed(batch)
    if final:
        analyzer.finish(boundary)
    else:
        analyzer.check(boundary)
    return analyzer
