"""PD-disaggregated serving, measured: real workers on a shaped link, policies side by side.

    python benchmarks/serve/run.py --text ../shared/data/wikitext-2-raw-test.txt --quick
    python benchmarks/serve/run.py --text ../shared/data/wikitext-2-raw-test.txt          # the full grid
    python benchmarks/serve/run.py --text ../shared/data/wikitext-2-raw-test.txt --load   # throughput vs load

A prefill worker and a decode worker (each its own process, ``tensorwire.serve.cluster``)
serve an open-loop Poisson stream of requests built from real text (prompts of 512-4096
tokens, 32-128 greedy output tokens) over a link shaped by ``tc tbf`` in a network
namespace (fixed rates) or by the prefill worker's token bucket (bandwidth traces: a
cluster shapes tbf at one rate). Every policy gets the same workload (the same prompts, lengths and
arrival times) on the same link, one policy after the other:

* ``raw``: every cache uncompressed (bf16, as the server holds it);
* ``static:<profile>``: every profile of the library, forced;
* ``kvserve-rule``: KVServe's rule (latency model x EWMA residual, with a cooldown);
* ``controller``: tensorwire's controller (latency model x bandit residuals);
* ``best static`` and ``oracle`` in hindsight, from the measured runs: the fixed policy
  (raw or one profile) with the lowest mean JCT, and per request the lowest JCT any
  fixed policy got for it (optimistic: it ignores that a different choice changes the
  queue behind it).

The learning policies run first on a fresh cluster, so each learns only from its own
transfers. A trace restarts the cluster for every policy, so every policy sees the trace
from its start.

Reported per link and policy: mean/p50/p99 JCT, TTFT and TPOT (from the client's view of
the worker protocol, as the HTTP front end relays it), attainment of the KV-move SLO the
policies are given, bytes on the wire, the profiles chosen, where the time goes (queue and
prefill, KV move, generation), and answer fidelity: agreement of the first 32 generated
tokens with generation in this process on the uncompressed float32 cache, and the
perplexity change of a held-back 64-token continuation on the cache each profile delivers
(computed in this process with the same pipeline, whose transfer is checked bit for bit
by the payload's checksums).

Writes results/<name>.json (machine, versions, config, every request) and .png, and
prints the table benchmarks/serve/README.md quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))  # run from a checkout without installing

from tensorwire.data import SMOLLM2_LIBRARY  # noqa: E402
from tensorwire.kv.profiles import ProfileLibrary  # noqa: E402
from tensorwire.serve.cluster import Cluster, ClusterConfig  # noqa: E402
from tensorwire.sysinfo import machine_info  # noqa: E402

LINKS = ("0.1", "0.5", "1", "2.5", "10", "trace:step", "trace:walk")
QUICK_LINKS = ("0.1", "1", "10", "trace:step")
TRACE_SCALE = 0.1  # the control traces run at 1-100 Gbit/s; x0.1 is 0.1-10 Gbit/s, what a writer here paces
FIDELITY_TOKENS = 32
CONTINUATION_TOKENS = 64
BUDGET = {"max_ppl_increase": 0.01, "max_retrieval_drop": 2.0}


@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float
    prompt: list[int]
    max_tokens: int
    continuation: list[int]

    @property
    def key(self) -> str:
        return hashlib.sha256(np.asarray(self.prompt, dtype=np.int32).tobytes()).hexdigest()[:16]


def workload(ids: list[int], n: int, rate_per_s: float, seed: int, lengths: tuple[int, int] = (512, 4096),
             outputs: tuple[int, int] = (32, 128)) -> list[Request]:  # fmt: skip
    """``n`` requests: prompt lengths spread evenly over ``lengths`` (both ends included) in a
    random order, output lengths uniform in ``outputs``, prompts from random places of the
    text, Poisson arrivals at ``rate_per_s``."""
    rng = np.random.default_rng(seed)
    sizes = np.linspace(lengths[0], lengths[1], n).round().astype(int) if n > 1 else np.array([lengths[1]])
    rng.shuffle(sizes)
    gaps = rng.exponential(1.0 / rate_per_s, n)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    requests = []
    for i, size in enumerate(sizes):
        start = int(rng.integers(0, len(ids) - size - CONTINUATION_TOKENS))
        requests.append(Request(i, float(arrivals[i]), ids[start:start + size], int(rng.integers(outputs[0], outputs[1] + 1)),
                                ids[start + size:start + size + CONTINUATION_TOKENS]))  # fmt: skip
    return requests


# -- fidelity, in this process ---------------------------------------------------------------
def fidelity_reference(requests: list[Request], library: ProfileLibrary, cache_path: Path, log) -> dict[str, Any]:
    """Per prompt: the first tokens of non-disaggregated greedy generation, and the held-back
    continuation's perplexity on the float32 cache, on the raw (bf16) cache and on each
    profile's decoded cache. Cached in ``cache_path`` by prompt."""
    import torch

    from tensorwire.kv import hf
    from tensorwire.kv.pipeline import Pipeline
    from tensorwire.serve.engine import Engine, SamplingParams
    from tensorwire.serve.workers.prefill import RAW_PIPELINE

    cached = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    todo = [r for r in requests if r.key not in cached]
    if not todo:
        return cached
    engine = Engine.load()

    def nll(data, last_token: int, continuation: list[int]) -> float:
        with torch.no_grad():
            logits = hf.forward(engine.model, hf.data_to_cache(data), [last_token, *continuation[:-1]]).logits[0]
        target = torch.tensor(continuation)
        return float(torch.nn.functional.cross_entropy(logits.float(), target))

    pipelines = {"raw": RAW_PIPELINE, **{p.name: p.pipeline for p in library}}
    for r in todo:
        began = time.perf_counter()
        data = engine.prefill(r.prompt, observe_window=64)
        tokens = list(engine.generate(data, r.prompt[-1], SamplingParams(max_tokens=FIDELITY_TOKENS, temperature=0)))
        base = nll(data, r.prompt[-1], r.continuation)
        ppl = {}
        for name, config in pipelines.items():
            decoded = Pipeline.decode_data(Pipeline.from_config(config).encode(data))
            ppl[name] = math.exp(nll(decoded, r.prompt[-1], r.continuation) - base) - 1.0
        cached[r.key] = {"tokens": tokens, "nll": base, "ppl_increase": ppl}
        log(f"fidelity reference for a {len(r.prompt)}-token prompt: {time.perf_counter() - began:.0f} s")
        cache_path.write_text(json.dumps(cached))
    return cached


def agreement(served: list[int], reference: list[int], n: int = FIDELITY_TOKENS) -> float:
    """Share of the first ``n`` positions where the served answer has the reference's token
    (an answer that ends where the reference ends agrees there)."""
    a, b = served[:n], reference[:n]
    span = max(len(a), len(b))
    return 1.0 if span == 0 else sum(x == y for x, y in zip(a, b)) / span


# -- one policy on one cluster ------------------------------------------------------------------
async def run_requests(backend, requests: list[Request], policy: str, slo_s: float) -> list[dict[str, Any]]:
    from tensorwire.serve.engine import SamplingParams
    from tensorwire.serve.http.backend import Finished, GenerationRequest, KVOptions, Prefilled, Tokens

    if policy in ("controller", "kvserve-rule"):
        options = KVOptions(slo_s=slo_s, policy=policy, **BUDGET)
    else:
        options = KVOptions(compression=policy.removeprefix("static:"), slo_s=slo_s, **BUDGET)
    began = time.perf_counter()

    async def one(r: Request) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - began)))
        submitted = time.perf_counter()
        row: dict[str, Any] = {"index": r.index, "prompt_tokens": len(r.prompt), "max_tokens": r.max_tokens,
                               "submitted_s": submitted - began, "tokens": [], "token_times": []}  # fmt: skip
        request = GenerationRequest(f"bench-{policy}-{r.index}", tuple(r.prompt),
                                    SamplingParams(max_tokens=r.max_tokens, temperature=0), options)  # fmt: skip
        try:
            async for event in backend.generate(request):
                now = time.perf_counter() - submitted
                if isinstance(event, Prefilled):
                    row.update(profile=event.profile, choice=(event.decision or {}).get("choice"),
                               reason=(event.decision or {}).get("reason"), kv_bytes_raw=event.kv_bytes_raw,
                               kv_bytes_sent=event.kv_bytes_sent, timings=dict(event.timings), prefilled_s=now)  # fmt: skip
                elif isinstance(event, Tokens):
                    row["tokens"].extend(event.token_ids)
                    row["token_times"].extend([now] * len(event.token_ids))
                elif isinstance(event, Finished):
                    row["attempts"] = list(event.timings.get("attempts", []))
            row["jct_s"] = time.perf_counter() - submitted
        except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {exc}"
        return row

    return list(await asyncio.gather(*(one(r) for r in requests)))


def link_config(link: str, base: ClusterConfig) -> ClusterConfig:
    if link.startswith("trace:"):
        return replace(base, gbps=None, trace=link.removeprefix("trace:"), trace_scale=TRACE_SCALE)
    return replace(base, gbps=float(link), trace=None)


def run_link(link: str, policies: list[str], requests: list[Request], base: ClusterConfig, slo_s: float,
             log) -> tuple[str, dict[str, list[dict[str, Any]]]]:  # fmt: skip
    from tensorwire.serve.cluster import tokenizer

    config = link_config(link, base)
    tok = tokenizer()
    runs: dict[str, list[dict[str, Any]]] = {}
    shaper = "none"
    fresh_each = config.trace is not None  # a trace starts when the prefill worker does
    cluster = None
    try:
        for policy in policies:
            if cluster is None or fresh_each:
                if cluster is not None:
                    cluster.stop()
                cluster = Cluster(config).start()
                shaper = cluster.shaper
            began = time.perf_counter()
            runs[policy] = asyncio.run(run_requests(cluster.backend(tok), requests, policy, slo_s))
            failed = sum("error" in row for row in runs[policy])
            log(f"{link}: {policy}: {time.perf_counter() - began:.0f} s, {failed} failed")
    finally:
        if cluster is not None:
            cluster.stop()
    return shaper, runs


# -- metrics ------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def summarise(rows: list[dict[str, Any]], reference: dict[str, Any], requests: list[Request], slo_s: float) -> dict[str, Any]:
    by_index = {r.index: r for r in requests}
    ok = [row for row in rows if "jct_s" in row and row["tokens"]]
    tpot = [(row["token_times"][-1] - row["token_times"][0]) / (len(row["tokens"]) - 1) for row in ok if len(row["tokens"]) > 1]
    kv_move = [row["timings"].get("kv_latency_s", 0.0) for row in ok]
    fidelity = [agreement(row["tokens"], reference[by_index[row["index"]].key]["tokens"]) for row in ok]
    ppl = [reference[by_index[row["index"]].key]["ppl_increase"].get(row.get("profile") or "raw", 0.0) for row in ok]
    prefill = [row["timings"].get("prefill_s", 0.0) for row in ok]
    ttft = [row["token_times"][0] for row in ok]
    jct = [row["jct_s"] for row in ok]
    profiles: dict[str, int] = {}
    for row in ok:
        profiles[row.get("profile") or "raw"] = profiles.get(row.get("profile") or "raw", 0) + 1
    return {
        "requests": len(rows), "failed": len(rows) - len(ok),
        "jct_s": _stats(jct), "ttft_s": _stats(ttft), "tpot_s": _stats(tpot), "kv_move_s": _stats(kv_move),
        "slo_attainment": float(np.mean([t <= slo_s for t in kv_move])) if ok else None,
        "kv_bytes_sent": int(sum(row.get("kv_bytes_sent") or 0 for row in ok)),
        "kv_bytes_raw": int(sum(row.get("kv_bytes_raw") or 0 for row in ok)),
        "token_agreement": float(np.mean(fidelity)) if fidelity else None,
        "ppl_increase": float(np.mean(ppl)) if ppl else None,
        "profiles": profiles,
        # Where the time goes, mean seconds per request: the prefill worker's compute, the KV
        # move (encode, wire and decode, overlapped layer by layer), the wait before and
        # between them (queues), and generation after the first token.
        "breakdown_s": {
            "prefill": float(np.mean(prefill)) if ok else None,
            "kv_move": float(np.mean(kv_move)) if ok else None,
            "kv_wire": float(np.mean([row["timings"].get("wire_s", 0.0) for row in ok])) if ok else None,
            "queue_other": float(np.mean([t - p - k for t, p, k in zip(ttft, prefill, kv_move)])) if ok else None,
            "generation": float(np.mean([j - t for j, t in zip(jct, ttft)])) if ok else None,
        },
    }


def hindsight(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The best fixed policy and the per-request oracle over the fixed policies (raw and each
    static profile), both by the KV move, the part of a request a policy decides: JCT also
    holds prefill and generation, whose run-to-run noise on a shared 2-core machine (TPOT
    varies by about 20 % between runs) a minimum over seven runs would pick up as gain."""
    fixed = {p: rows for p, rows in runs.items() if p == "raw" or p.startswith("static:")}
    complete = {p: rows for p, rows in fixed.items() if all("jct_s" in row for row in rows)}
    if not complete:
        return {}

    def move(row):
        return row["timings"].get("kv_latency_s", 0.0)

    best = min(complete, key=lambda p: np.mean([move(row) for row in complete[p]]))
    n = len(next(iter(complete.values())))
    oracle = []
    for i in range(n):
        p = min(complete, key=lambda q: move(complete[q][i]))
        oracle.append({**complete[p][i], "oracle_choice": p})
    return {"best_static": best, "oracle_rows": oracle}


def targets(link_results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, measured (JCT and the KV move; links without both policies are left out)."""
    out: dict[str, Any] = {}

    def mean(rows, key, longest=False):
        rows = [r for r in rows if "jct_s" in r]
        if longest:
            top = max(r["prompt_tokens"] for r in rows)
            rows = [r for r in rows if r["prompt_tokens"] == top]
        return float(np.mean([r["jct_s"] if key == "jct" else r["timings"].get("kv_latency_s", 0.0) for r in rows]))

    for link, res in link_results.items():
        runs = res["runs"]
        if "controller" not in runs or "raw" not in runs:
            continue
        c, r = runs["controller"], runs["raw"]
        entry = {"controller_vs_raw_jct": mean(r, "jct") / mean(c, "jct"),
                 "controller_vs_raw_jct_longest_prompts": mean(r, "jct", True) / mean(c, "jct", True),
                 "controller_vs_raw_kv_move": mean(r, "move") / mean(c, "move")}  # fmt: skip
        if res.get("oracle_rows"):
            entry["controller_vs_oracle_jct"] = mean(c, "jct") / mean(res["oracle_rows"], "jct")
            entry["controller_vs_oracle_kv_move"] = mean(c, "move") / mean(res["oracle_rows"], "move")
        out[link] = entry
    return out


# -- output -------------------------------------------------------------------------------------
def short(policy: str) -> str:
    if not policy.startswith("static:"):
        return policy
    return "s:" + "+".join(part.split(":")[0] for part in policy.removeprefix("static:").split("/"))


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'link':<11}{'policy':<22}{'JCT':>7}{'p99':>6}{'TTFT':>6}{'KV mv':>6}{'TPOT':>5}{'SLO':>5}"
             f"{'MB':>6}{'agr':>5}{'ppl%':>6}"]  # fmt: skip
    for link, res in result["links"].items():
        for policy, s in res["summary"].items():
            if s["jct_s"] is None:
                lines.append(f"{link:<11}{short(policy):<26} all {s['failed']} failed")
                continue
            mark = " *" if policy == res.get("best_static") else ""
            lines.append(f"{link:<11}{short(policy)[:20] + mark:<22}{s['jct_s']['mean']:>7.1f}{s['jct_s']['p99']:>6.1f}"
                         f"{s['ttft_s']['mean']:>6.1f}{s['kv_move_s']['mean']:>6.2f}"
                         f"{(s['tpot_s'] or {}).get('mean', math.nan) * 1e3:>5.0f}"
                         f"{s['slo_attainment']:>5.0%}{s['kv_bytes_sent'] / 1e6:>6.0f}{s['token_agreement']:>5.0%}"
                         f"{s['ppl_increase'] * 100:>6.2f}")  # fmt: skip
    lines.append("seconds (JCT, p99, TTFT, KV move), TPOT in ms, MB on the wire; agr: first 32 tokens as local;")
    lines.append("ppl%: held-back continuation. * best static and oracle (per request): by KV move, in hindsight;")
    lines.append(f"SLO: KV move within {result['config']['slo_s']:g} s")
    lines.append("")
    lines.append(f"{'link':<11}{'where the time goes (controller), s:':<40}{'prefill':>8}{'KV move':>8}{'(wire)':>7}"
                 f"{'queue':>7}{'generate':>9}")  # fmt: skip
    for link, res in result["links"].items():
        for policy in ("raw", "controller"):
            b = res["summary"].get(policy, {}).get("breakdown_s")
            if b and b["prefill"] is not None:
                lines.append(f"{link:<11}{policy:<40}{b['prefill']:>8.2f}{b['kv_move']:>8.2f}{b['kv_wire']:>7.2f}"
                             f"{b['queue_other']:>7.2f}{b['generation']:>9.2f}")  # fmt: skip
    lines.append("")
    for link, t in result["targets"].items():
        parts = [f"raw/controller: JCT {t['controller_vs_raw_jct']:.2f}x ({t['controller_vs_raw_jct_longest_prompts']:.2f}x "
                 f"longest), KV move {t['controller_vs_raw_kv_move']:.2f}x"]  # fmt: skip
        if "controller_vs_oracle_jct" in t:
            parts.append(f"controller/oracle: JCT {t['controller_vs_oracle_jct']:.2f}, KV move {t['controller_vs_oracle_kv_move']:.2f}")
        lines.append(f"{link:<11}" + "; ".join(parts))
    return "\n".join(lines)


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(result["links"])
    policies = ["raw", "kvserve-rule", "controller", "best static", "oracle"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(policies)
    for k, policy in enumerate(policies):
        means = []
        for link in links:
            res = result["links"][link]
            name = res.get("best_static") if policy == "best static" else policy
            s = res["summary"].get(name or "", {}).get("jct_s")
            means.append(s["mean"] if s else math.nan)
        axes[0].bar(np.arange(len(links)) + k * width, means, width, label=policy)
    axes[0].set_xticks(np.arange(len(links)) + 0.4 - width / 2, links)
    axes[0].set_xlabel("link (Gbit/s or trace)")
    axes[0].set_ylabel("mean JCT, s")
    axes[0].legend(fontsize=8)
    parts = ["prefill", "kv_move", "queue_other", "generation"]
    bottom = np.zeros(len(links))
    for part in parts:
        values = np.array([result["links"][link]["summary"].get("controller", {}).get("breakdown_s", {}).get(part) or 0.0
                           for link in links])  # fmt: skip
        axes[1].bar(links, values, bottom=bottom, label=part)
        bottom += values
    axes[1].set_ylabel("seconds per request (controller)")
    axes[1].legend(fontsize=8)
    fig.suptitle("PD-disaggregated serving, SmolLM2-135M on CPU: " + result["config"]["label"])
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def load_sweep(ids: list[int], args, base: ClusterConfig, log) -> list[dict[str, Any]]:
    """Throughput of the controller at increasing arrival rates on one link."""
    from tensorwire.serve.cluster import tokenizer

    rows = []
    with Cluster(link_config(args.load_link, base)) as cluster:
        backend = cluster.backend(tokenizer())
        for rate in args.load_rates:
            requests = workload(ids, args.load_requests, rate, args.seed, lengths=(512, 2048))
            began = time.perf_counter()
            served = asyncio.run(run_requests(backend, requests, "controller", args.slo_s))
            wall = time.perf_counter() - began
            done = [r for r in served if "jct_s" in r]
            rows.append({"arrival_rate_per_s": rate, "requests": len(served), "completed": len(done), "wall_s": wall,
                         "requests_per_s": len(done) / wall, "tokens_per_s": sum(len(r["tokens"]) for r in done) / wall,
                         "jct_s": _stats([r["jct_s"] for r in done]), "rows": served})  # fmt: skip
            log(f"load {rate:g}/s: {rows[-1]['requests_per_s']:.3f} req/s, {rows[-1]['tokens_per_s']:.1f} tok/s")
    return rows


def resummarise(path: Path, ids: list[int]) -> int:
    """Recompute the summaries, targets, table and plot of a results file from its requests
    (the workload is rebuilt from the same text and seed, for the fidelity references)."""
    result = json.loads(path.read_text())
    c = result["config"]
    requests = workload(ids, c["requests"], c["rate_per_s"], c["seed"])
    if [len(r.prompt) for r in requests] != c["prompt_tokens"]:
        raise SystemExit(f"{path}: the text does not rebuild the workload of this run")
    reference = fidelity_reference(requests, ProfileLibrary.load(result["library"]["path"]), path.parent / "fidelity-cache.json",
                                   print)  # fmt: skip
    for res in result["links"].values():
        res.pop("best_static", None), res.pop("oracle_rows", None)
        res.update(hindsight(res["runs"]))
        res["summary"] = {policy: summarise(rows, reference, requests, result["config"]["slo_s"]) for policy, rows in res["runs"].items()}
        if res.get("oracle_rows"):
            res["summary"]["oracle"] = summarise(res["oracle_rows"], reference, requests, result["config"]["slo_s"])
    result["targets"] = targets(result["links"])
    path.write_text(json.dumps(result, indent=1))
    table = format_table(result)
    path.with_suffix(".txt").write_text(table + "\n")
    plot(result, path.with_suffix(".png"))
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, required=True, help="real text to build prompts from (WikiText-2 raw test)")
    p.add_argument("--quick", action="store_true", help=f"links {', '.join(QUICK_LINKS)} and 4 requests each")
    p.add_argument("--links", nargs="+", help=f"Gbit/s values and trace:NAME (default {' '.join(LINKS)})")
    p.add_argument("--requests", type=int, help="requests per policy and link (default 8; --quick 4)")
    p.add_argument("--rate", type=float, default=1 / 30, help="Poisson arrivals per second (default 1/30)")
    p.add_argument("--slo-s", type=float, default=1.0, help="the KV-move SLO given to the policies (default 1 s)")
    p.add_argument("--policies", nargs="+", help="default: controller kvserve-rule raw and every static profile")
    p.add_argument("--library", type=Path, default=Path(SMOLLM2_LIBRARY))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shaper", default="auto", choices=("auto", "tbf", "token-bucket"))
    p.add_argument("--load", action="store_true", help="only the throughput sweep")
    p.add_argument("--load-link", default="1")
    p.add_argument("--load-rates", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    p.add_argument("--load-requests", type=int, default=8)
    p.add_argument("--name", help="results/<name>.json and .png (default: serve, serve-quick or load)")
    p.add_argument("--from-json", type=Path, help="summarise, tabulate and plot a results file again (same --text)")
    args = p.parse_args(argv)

    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    from transformers import AutoTokenizer

    from tensorwire.models import smollm2_folder

    ids = AutoTokenizer.from_pretrained(smollm2_folder())(args.text.read_text()).input_ids
    if args.from_json:
        return resummarise(args.from_json, ids)
    library = ProfileLibrary.load(args.library)
    base = ClusterConfig(decode_workers=1, shaper=args.shaper, library=str(args.library), peer_timeout_s=120.0)
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine_info(("torch", "transformers", "numba", "matplotlib")),
                              "data": {"text": args.text.name, "sha256": hashlib.sha256(args.text.read_bytes()).hexdigest()},
                              "library": {"path": str(args.library), "profiles": list(library.names)}}  # fmt: skip
    if args.load:
        name = args.name or "load"
        result["config"] = {"link": args.load_link, "rates": args.load_rates, "requests": args.load_requests,
                            "slo_s": args.slo_s, "seed": args.seed, "cluster": asdict(base)}  # fmt: skip
        result["load"] = load_sweep(ids, args, base, log)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(f"{'arrivals/s':>10}{'done':>6}{'req/s':>8}{'tok/s':>8}{'JCT mean':>9}{'p99':>7}")
        for row in result["load"]:
            print(f"{row['arrival_rate_per_s']:>10.3g}{row['completed']:>6}{row['requests_per_s']:>8.3f}"
                  f"{row['tokens_per_s']:>8.1f}{row['jct_s']['mean']:>8.1f}s{row['jct_s']['p99']:>6.1f}s")  # fmt: skip
        return 0

    links = args.links or (QUICK_LINKS if args.quick else LINKS)
    n = args.requests or (4 if args.quick else 8)
    policies = args.policies or ["controller", "kvserve-rule", "raw", *(f"static:{p}" for p in library.names)]
    requests = workload(ids, n, args.rate, args.seed)
    name = args.name or ("serve-quick" if args.quick else "serve")
    result["config"] = {"links": list(links), "requests": n, "rate_per_s": args.rate, "slo_s": args.slo_s,
                        "policies": policies, "seed": args.seed, "budget": BUDGET, "trace_scale": TRACE_SCALE,
                        "cluster": asdict(base), "prompt_tokens": [len(r.prompt) for r in requests],
                        "prompt_keys": [r.key for r in requests],
                        "max_tokens": [r.max_tokens for r in requests], "arrivals_s": [r.arrival_s for r in requests],
                        "label": f"{n} requests per policy, Poisson {args.rate:.3g}/s, prompts 512-4096"}  # fmt: skip
    log(f"{n} requests, prompts {sorted(len(r.prompt) for r in requests)}; fidelity references first")
    reference = fidelity_reference(requests, library, out / "fidelity-cache.json", log)
    result["links"] = {}
    for link in links:
        shaper, runs = run_link(link, policies, requests, base, args.slo_s, log)
        res: dict[str, Any] = {"shaper": shaper, "runs": runs}
        res.update(hindsight(runs))
        res["summary"] = {policy: summarise(rows, reference, requests, args.slo_s) for policy, rows in runs.items()}
        if res.get("oracle_rows"):
            res["summary"]["oracle"] = summarise(res["oracle_rows"], reference, requests, args.slo_s)
        result["links"][link] = res
        result["targets"] = targets(result["links"])
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))  # after every link: a stopped run keeps its links
    table = format_table(result)
    (out / f"{name}.txt").write_text(table + "\n")
    plot(result, out / f"{name}.png")
    print(table)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
