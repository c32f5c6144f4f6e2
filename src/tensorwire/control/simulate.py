"""Trace-driven simulation of the controller against baselines and an oracle.

A :class:`World` holds the ground truth of one run: per request a link speed (from a
:class:`~tensorwire.control.traces.Trace`), a context length drawn from a workload mix,
and for every option (raw and each profile) the *true* expected latency: the latency
model evaluated with the profile's *true* throughputs, which differ from the library's
by a per-profile calibration error and, from the mismatch request on, by a 2x slowdown
of one profile's encode and decode. The latency a policy observes is the true one times
lognormal jitter, drawn once per (request, option), so every policy faces the same
randomness (common random numbers) and differences between policies are not noise.

Every policy sees the same requests in order, chooses, and observes its own outcome
(latency, payload bytes, wire time). Per policy the simulator reports mean and p99
latency, SLO violations, cumulative regret against the oracle, how many decisions after
the mismatch the policy kept choosing the slowed profile when the oracle would not, and
how often it sent raw where raw was the right call.

Entry points: :func:`simulate` (one trace, one seed), :func:`run_suite` (several traces x
seeds, what ``benchmarks/control/run.py`` and ``tensorwire simulate`` run) and
:func:`example_library` (a placeholder library in realistic ranges until a measured one
exists). :mod:`tensorwire.control.report` turns a suite's result into a table and a plot.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ControlWarning
from ..kv.profiles import RAW, ModelShape, Profile, ProfileLibrary
from .context import RequestContext
from .controller import Controller
from .latency_model import break_even_bandwidth, latency, raw_latency, to_gbps
from .policies import AlwaysRaw, KVServeRule, Oracle, StaticProfile
from .policy import BasePolicy
from .traces import TRACE_NAMES, Trace, make_trace

__all__ = ["Scenario", "World", "default_policies", "example_library", "run_suite", "simulate"]

MATERIAL = 1.10  # a pick of the slowed profile counts as wrong when it is > 10 % slower than the best
ABANDON_WINDOW = 10  # "abandoned": this many decisions in a row without a wrong pick
PLOTTED = ("controller", "controller-ucb", "kvserve-rule", "always-raw", "oracle")  # + the best static policy

PLACEHOLDER_NOTE = ("placeholder: hand-set numbers in realistic ranges (encode/decode 0.5-3 GB/s per thread, ratio 2-12), "
                    "NOT measured; replace with the library from the offline search")  # fmt: skip


def example_library() -> ProfileLibrary:
    """A placeholder library for SmolLM2-135M (the project's real model), numbers NOT measured.

    Ratios, quality losses and throughputs are set by hand in the ranges such pipelines
    reach (encode/decode 0.5-3 GB/s per thread, ratio 2-12), so that simulations and tests
    have something realistic to choose from until the offline search writes the measured
    library. Pipelines name registered stage ids; their parameters are illustrative.
    """
    G = 1e9
    rows = [
        # name, stages, ratio, ppl, retrieval drop, encode, decode (bytes/s, one thread), threads
        ("fp8-lz4", [{"id": "cast"}, {"id": "lz4"}], 2.1, 0.002, 0.1, 2.8 * G, 3.0 * G, 2),
        ("kivi4-zstd", [{"id": "kivi", "k_bits": 4, "v_bits": 4}, {"id": "zstd"}], 3.6, 0.006, 0.3, 1.6 * G, 2.4 * G, 2),
        ("hadamard-kivi4-ans", [{"id": "hadamard"}, {"id": "kivi", "k_bits": 4, "v_bits": 4}, {"id": "ans"}],
         4.2, 0.004, 0.2, 0.9 * G, 1.2 * G, 2),
        ("headwise-ans", [{"id": "headwise"}, {"id": "ans"}], 5.0, 0.010, 0.6, 0.7 * G, 0.9 * G, 4),
        ("kivi2-zstd", [{"id": "kivi", "k_bits": 2, "v_bits": 2}, {"id": "zstd"}], 6.8, 0.025, 1.5, 1.5 * G, 2.2 * G, 2),
        ("hadamard-kivi2-ans", [{"id": "hadamard"}, {"id": "kivi", "k_bits": 2, "v_bits": 2}, {"id": "ans"}],
         7.5, 0.015, 1.0, 0.8 * G, 1.0 * G, 2),
        ("streaming50-kivi4-lz4", [{"id": "streaming_llm", "keep_fraction": 0.5}, {"id": "kivi", "k_bits": 4, "v_bits": 4},
                                   {"id": "lz4"}], 7.0, 0.080, 12.0, 2.0 * G, 2.8 * G, 2),
        ("snapkv50-kivi2-zstd", [{"id": "snapkv"}, {"id": "kivi", "k_bits": 2, "v_bits": 2}, {"id": "zstd"}],
         12.0, 0.060, 4.0, 0.6 * G, 2.0 * G, 2),
    ]  # fmt: skip
    profiles = tuple(Profile(name, {"stages": stages}, ratio, ppl, drop, enc, dec, threads)
                     for name, stages, ratio, ppl, drop, enc, dec, threads in rows)  # fmt: skip
    model = ModelShape("SmolLM2-135M-Instruct", n_layers=30, kv_heads=3, head_dim=64, dtype="BF16")
    return ProfileLibrary(model, profiles, {"source": PLACEHOLDER_NOTE})


@dataclass(frozen=True)
class Scenario:
    """What the simulated requests look like and how the truth departs from the library.

    Parameters
    ----------
    n_requests : int
        Requests per run (the trace is cut or repeated to this length).
    lengths, length_weights : tuple
        Context lengths (tokens) and their probabilities (default: uniform).
    slo_base_s, slo_s_per_ktok : float
        Per-request SLO = ``slo_base_s + slo_s_per_ktok * tokens / 1000``.
    max_ppl_increase, max_retrieval_drop : float
        Quality budget of every request.
    noise_sigma : float
        Lognormal (mean-one) jitter of each observed latency.
    net_noise_sigma : float
        Lognormal jitter of each measured wire time (the bandwidth samples).
    calibration_sigma : float
        True throughput = library throughput x lognormal(0, this), per profile: how far the
        library is off on the serving machine.
    mismatch_profile : str or None
        Profile slowed down from ``mismatch_at``: a name, ``"auto"`` (the one the oracle
        would use most right after that point) or None (no mismatch).
    mismatch_at : float
        Fraction of the run at which the mismatch starts.
    mismatch_factor : float
        The slowed profile's encode and decode are this many times slower.
    latency_model : str
        ``"pipelined"`` or ``"serial"``: the truth and every policy use it.
    overhead_s : float
        Fixed per-request overhead (truth and policies).
    """

    n_requests: int = 2000
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    length_weights: tuple[float, ...] | None = None
    slo_base_s: float = 0.005
    slo_s_per_ktok: float = 0.02
    max_ppl_increase: float = 0.03
    max_retrieval_drop: float = 2.0
    noise_sigma: float = 0.08
    net_noise_sigma: float = 0.05
    calibration_sigma: float = 0.1
    mismatch_profile: str | None = "auto"
    mismatch_at: float = 0.5
    mismatch_factor: float = 2.0
    latency_model: str = "pipelined"
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if self.n_requests < 1:
            raise ValueError(f"n_requests is {self.n_requests}; expected >= 1")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths is {self.lengths}; expected positive token counts")
        if self.length_weights is not None and len(self.length_weights) != len(self.lengths):
            raise ValueError("length_weights must have one weight per length")
        if not 0.0 <= self.mismatch_at <= 1.0 or self.mismatch_factor <= 0:
            raise ValueError("mismatch_at must be in [0, 1] and mismatch_factor > 0")


def _mean_one_lognormal(rng: np.random.Generator, sigma: float, shape) -> np.ndarray:
    return np.exp(rng.normal(-0.5 * sigma * sigma, sigma, shape)) if sigma > 0 else np.ones(shape)


class World:
    """The ground truth of one simulated run (see the module docstring)."""

    def __init__(self, library: ProfileLibrary, trace: Trace, scenario: Scenario, seed: int = 0):
        self.library, self.scenario, self.seed = library, scenario, seed
        n = scenario.n_requests
        self.trace = trace.resized(n)
        self.bandwidth = self.trace.bandwidth_bps
        rng = np.random.default_rng([seed, 0x7E45])
        weights = None if scenario.length_weights is None else np.asarray(scenario.length_weights) / sum(scenario.length_weights)
        self.tokens = rng.choice(np.asarray(scenario.lengths), size=n, p=weights)
        self.kv_bytes = self.tokens.astype(np.float64) * library.model.bytes_per_token
        self.slo = scenario.slo_base_s + scenario.slo_s_per_ktok * self.tokens / 1000.0
        self.arms: tuple[str, ...] = (RAW, *library.names)
        self.index = {a: i for i, a in enumerate(self.arms)}
        profiles = list(library)
        A = len(self.arms)
        calib = _mean_one_lognormal(rng, scenario.calibration_sigma, (2, len(profiles)))
        self.true_encode = np.array([p.encode_rate for p in profiles]) * calib[0]
        self.true_decode = np.array([p.decode_rate for p in profiles]) * calib[1]
        self.ratio = np.array([1.0] + [p.ratio for p in profiles])
        self.noise = _mean_one_lognormal(rng, scenario.noise_sigma, (n, A))
        self.net_noise = _mean_one_lognormal(rng, scenario.net_noise_sigma, n)
        self.allowed = np.array([True] + [p.meets(scenario.max_ppl_increase, scenario.max_retrieval_drop) for p in profiles])
        self.mismatch_index = round(scenario.mismatch_at * n)
        self.expected = self._expected(slow=None)
        self.mismatch_profile = self._pick_mismatch()
        if self.mismatch_profile is not None:
            self.expected = self._expected(slow=self.mismatch_profile)
        masked = np.where(self.allowed[None, :], self.expected, np.inf)
        self.oracle_choice = np.argmin(masked, axis=1)

    def _expected(self, slow: str | None) -> np.ndarray:
        sc = self.scenario
        n_layers = self.library.model.n_layers if sc.latency_model == "pipelined" else 1
        enc = np.broadcast_to(self.true_encode, (len(self.kv_bytes), self.true_encode.size)).copy()
        dec = enc.copy()
        dec[:] = self.true_decode
        if slow is not None:
            j = self.index[slow] - 1
            enc[self.mismatch_index:, j] /= sc.mismatch_factor
            dec[self.mismatch_index:, j] /= sc.mismatch_factor
        kv, bw = self.kv_bytes[:, None], self.bandwidth[:, None]
        compressed = latency(sc.latency_model, kv, self.ratio[None, 1:], enc, dec, bw, n_layers, sc.overhead_s)
        return np.concatenate([raw_latency(kv, bw, sc.overhead_s), compressed], axis=1)

    def _pick_mismatch(self) -> str | None:
        name = self.scenario.mismatch_profile
        if name is None:
            return None
        if name != "auto":
            if name not in self.index or name == RAW:
                raise ValueError(f"mismatch_profile {name!r} is not a profile of the library ({', '.join(self.library.names)})")
            return name
        # The profile the oracle would use most in the 200 requests after the mismatch:
        # slowing it down is the change that matters.
        window = slice(self.mismatch_index, min(self.mismatch_index + 200, len(self.kv_bytes)))
        masked = np.where(self.allowed[None, :], self.expected[window], np.inf)
        counts = np.bincount(np.argmin(masked, axis=1), minlength=len(self.arms))
        counts[0] = 0
        return self.arms[int(np.argmax(counts))] if counts.max() > 0 else None

    def true_latency(self, ctx: RequestContext, arm: str) -> float:
        """Expected latency of ``arm`` for request ``ctx.request_id`` (what the oracle knows)."""
        return float(self.expected[ctx.request_id, self.index[arm]])

    def outcome(self, i: int, arm: str) -> tuple[float, float, float]:
        """(observed latency, payload bytes, wire time) of request ``i`` sent with ``arm``."""
        a = self.index[arm]
        payload = self.kv_bytes[i] / self.ratio[a]
        return float(self.expected[i, a] * self.noise[i, a]), float(payload), float(payload / self.bandwidth[i] * self.net_noise[i])

    def context(self, i: int) -> RequestContext:
        sc = self.scenario
        return RequestContext(tokens=int(self.tokens[i]), slo_s=float(self.slo[i]), max_ppl_increase=sc.max_ppl_increase,
                              max_retrieval_drop=sc.max_retrieval_drop, request_id=i)  # fmt: skip

    def high_bandwidth_threshold(self) -> float:
        """1.2 x the highest profiled break-even bandwidth among allowed profiles: above it raw wins."""
        n_layers = self.library.model.n_layers if self.scenario.latency_model == "pipelined" else 1
        be = [break_even_bandwidth(p.ratio, p.encode_rate, p.decode_rate, n_layers=n_layers)
              for p in self.library if p.meets(self.scenario.max_ppl_increase, self.scenario.max_retrieval_drop)]  # fmt: skip
        return 1.2 * max(be, default=0.0)


def default_policies(library: ProfileLibrary, world: World, seed: int = 0) -> list[BasePolicy]:
    """The controller (Thompson and UCB), KVServe's rule, always-raw, one static policy per
    profile within the budget, and the oracle, all with the scenario's latency model."""
    sc = world.scenario
    kw: dict[str, Any] = {"latency_model": sc.latency_model, "overhead_s": sc.overhead_s}
    policies: list[BasePolicy] = [
        Controller(library, seed=seed, **kw),
        Controller(library, bandit="ucb", seed=seed, **kw),
        KVServeRule(library, **kw),
        AlwaysRaw(library, **kw),
    ]
    policies += [StaticProfile(library, p.name, **kw) for p in library.filter(sc.max_ppl_increase, sc.max_retrieval_drop)]
    policies.append(Oracle(library, world.true_latency, **kw))
    return policies


def _run_policy(policy: BasePolicy, world: World) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(world.kv_bytes)
    choice = np.empty(n, dtype=np.int16)
    lat = np.empty(n)
    fallbacks = np.zeros(n, dtype=bool)
    oracle = isinstance(policy, Oracle)
    for i in range(n):
        ctx = world.context(i)
        if oracle:
            ctx = dataclasses.replace(ctx, bandwidth_bps=float(world.bandwidth[i]))
        d = policy.choose(ctx)
        observed, payload, wire = world.outcome(i, d.choice)
        policy.observe(d, observed, payload, wire)
        choice[i], lat[i], fallbacks[i] = world.index[d.choice], observed, d.fallback
    return choice, lat, fallbacks


def _abandon_after(wrong: np.ndarray, window: int = ABANDON_WINDOW) -> int | None:
    """Decisions after the mismatch until the first ``window`` in a row without a wrong pick."""
    n = wrong.size
    if n == 0:
        return 0
    # run[k] = number of consecutive non-wrong decisions starting at k
    run = np.zeros(n + 1, dtype=np.int64)
    for k in range(n - 1, -1, -1):
        run[k] = 0 if wrong[k] else run[k + 1] + 1
    need = min(window, n)
    hits = np.flatnonzero(run[:n] >= need)
    if hits.size:
        return int(hits[0])
    return None


def _metrics(world: World, choice: np.ndarray, lat: np.ndarray, oracle_lat: np.ndarray, oracle_choice: np.ndarray) -> dict[str, Any]:
    m = world.mismatch_index
    out: dict[str, Any] = {
        "mean_s": float(lat.mean()),
        "p50_s": float(np.percentile(lat, 50)),
        "p99_s": float(np.percentile(lat, 99)),
        "slo_violations": int((lat > world.slo).sum()),
        "regret_s": float((lat - oracle_lat).sum()),
        "mean_vs_oracle": float(lat.mean() / oracle_lat.mean()),
        "choices": {world.arms[a]: int(c) for a, c in enumerate(np.bincount(choice, minlength=len(world.arms))) if c},
    }
    raw_best = oracle_choice == 0
    out["raw_when_oracle_raw"] = float((choice[raw_best] == 0).mean()) if raw_best.any() else None
    high = world.bandwidth >= world.high_bandwidth_threshold()
    out["raw_share_high_bw"] = float((choice[high] == 0).mean()) if high.any() else None
    if world.mismatch_profile is not None:
        j = world.index[world.mismatch_profile]
        # A wrong pick: the slowed profile where it is materially (> 10 %) slower than the
        # best option; near-ties (e.g. on a link-bound path, where a slower codec hides
        # behind the transfer) are not mistakes worth counting.
        after = world.expected[m:]
        materially_slower = after[:, j] > MATERIAL * after[np.arange(len(after)), oracle_choice[m:]]
        wrong = (choice[m:] == j) & materially_slower
        out["slow_picks_after_mismatch"] = int((choice[m:] == j).sum())
        out["wrong_slow_picks"] = int(wrong.sum())
        out["abandon_after"] = _abandon_after(wrong)
    return out


def simulate(
    library: ProfileLibrary,
    trace: Trace,
    scenario: Scenario = Scenario(),
    seed: int = 0,
    policies: Callable[[ProfileLibrary, World, int], Sequence[BasePolicy]] = default_policies,
) -> dict[str, Any]:
    """One run: every policy on the same requests. Returns metrics and per-request series."""
    world = World(library, trace, scenario, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ControlWarning)  # dropped profiles are reported in the result instead
        pols = list(policies(library, world, seed))
    runs = {}
    for policy in pols:
        start = time.perf_counter()
        choice, lat, fallbacks = _run_policy(policy, world)
        runs[policy.name] = (choice, lat, time.perf_counter() - start, int(fallbacks.sum()))
    if "oracle" not in runs:
        raise ValueError("the policy set must include an Oracle (named 'oracle'): regret is measured against it")
    oracle_choice, oracle_lat = runs["oracle"][0], runs["oracle"][1]
    metrics = {}
    for name, (choice, lat, seconds, fallbacks) in runs.items():
        metrics[name] = _metrics(world, choice, lat, oracle_lat, oracle_choice)
        metrics[name]["decide_us"] = 1e6 * seconds / len(lat)  # choose + observe per request (Python)
        metrics[name]["fallbacks"] = fallbacks
    statics = {k: v["mean_s"] for k, v in metrics.items() if k.startswith("static:") or k == "always-raw"}
    best_static = min(statics, key=statics.get) if statics else None
    return {
        "trace": {"name": trace.name, "description": trace.description},
        "seed": seed,
        "mismatch": {"profile": world.mismatch_profile, "at_request": world.mismatch_index, "factor": scenario.mismatch_factor},
        "high_bandwidth_gbps": to_gbps(world.high_bandwidth_threshold()),
        "best_static": best_static,
        "policies": metrics,
        "series": {
            "gbps": np.round(world.trace.gbps, 4).tolist(),
            "tokens": world.tokens.tolist(),
            "slo_s": np.round(world.slo, 7).tolist(),
            "arms": list(world.arms),
            # 0.1 us resolution keeps the JSON small without changing any plotted or summed value
            "policies": {name: {"choice": r[0].tolist(), "latency_s": np.round(r[1], 7).tolist()} for name, r in runs.items()},
        },
    }


def _checks(run: dict[str, Any], controller: str = "controller") -> dict[str, bool | None]:
    p = run["policies"]
    c = p[controller]
    best = p[run["best_static"]]["mean_s"] if run["best_static"] else math.inf
    abandon = c.get("abandon_after", 0)
    return {
        "within_5pct_of_oracle": c["mean_vs_oracle"] <= 1.05,
        "le_best_static": c["mean_s"] <= best,
        "abandons_slow_within_10": None if run["mismatch"]["profile"] is None else (abandon is not None and abandon <= 10),
        "raw_at_high_bw": None if c["raw_share_high_bw"] is None else c["raw_share_high_bw"] >= 0.9,
    }


def run_suite(
    library: ProfileLibrary,
    traces: Sequence[str | Trace] = TRACE_NAMES,
    scenario: Scenario = Scenario(),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    library_label: str = "",
    mismatch_at: dict[str, float] | None = None,
    keep_series: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every trace x seed; per trace the median (and min-max) of each metric over seeds.

    ``mismatch_at`` overrides the scenario's per trace name (the step trace's mismatch is put
    in its last, 5 Gbps third by default, where compression is in use). Per-request series
    are kept for the first seed only.
    """
    mismatch_at = {"step": 0.8, **(mismatch_at or {})}
    out: dict[str, Any] = {"library": {"label": library_label, "model": library.model.to_dict(), "machine": library.machine,
                                       "profiles": [p.to_dict() for p in library]},
                           "scenario": dataclasses.asdict(scenario), "seeds": list(seeds), "traces": {}}  # fmt: skip
    for t in traces:
        trace_for = (lambda s, t=t: make_trace(t, scenario.n_requests, seed=s)) if isinstance(t, str) else (lambda s, t=t: t)
        name = t if isinstance(t, str) else t.name
        sc = dataclasses.replace(scenario, mismatch_at=mismatch_at.get(name, scenario.mismatch_at))
        runs = []
        for s in seeds:
            if progress:
                progress(f"trace {name}, seed {s}")
            run = simulate(library, trace_for(s), sc, seed=s)
            run["checks"] = _checks(run)
            if not (keep_series and s == seeds[0]):
                run.pop("series")
            else:  # the plotted policies only: the JSON stays small
                keep = set(PLOTTED) | {run["best_static"]}
                run["series"]["policies"] = {k: v for k, v in run["series"]["policies"].items() if k in keep}
            runs.append(run)
        out["traces"][name] = {"runs": runs, "summary": _summary(runs)}
    return out


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(runs[0]["policies"])
    keys = ("mean_s", "p99_s", "slo_violations", "regret_s", "mean_vs_oracle", "raw_when_oracle_raw", "raw_share_high_bw",
            "wrong_slow_picks", "abandon_after", "decide_us")  # fmt: skip
    summary: dict[str, Any] = {}
    for name in names:
        row = {}
        for k in keys:
            vals = [r["policies"][name].get(k) for r in runs]
            if k == "abandon_after":
                row["abandon_after_all"] = vals
            vals = [v for v in vals if v is not None]
            if vals:
                row[k] = {"median": float(np.median(vals)), "min": float(min(vals)), "max": float(max(vals))}
        summary[name] = row
    summary["_checks"] = {k: [r["checks"][k] for r in runs] for k in runs[0]["checks"]}
    summary["_best_static"] = [r["best_static"] for r in runs]
    summary["_mismatch"] = [r["mismatch"]["profile"] for r in runs]
    return summary
