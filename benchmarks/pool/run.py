"""The KV pool, measured: questions about the same long documents and growing chats, with and without a pool.

    python benchmarks/pool/run.py --text ../shared/data/wikitext-2-raw-test.txt --quick
    python benchmarks/pool/run.py --text ../shared/data/wikitext-2-raw-test.txt          # 3 documents, 2k-8k, 2 chats

A prefill worker, a decode worker and a Redis pool of their own (``Cluster(pool=True)``),
the pool link shaped by tbf in its own network namespace (where allowed) at each of
``--gbps``. Two workloads with real reuse, cut from the text:

* documents: each gets ``--questions`` questions (another sentence of the text, asked
  after the document); every question's prompt starts with the whole document;
* chats: a document as the first user turn, then ``--turns`` turns; each turn's prompt is
  the previous prompt, the model's own answer to it and a new question, so the history
  grows and each turn's prefix is the previous turn's prompt.

Per bandwidth, each policy starts from an empty pool, and its requests run one after the
other (the first request of a document or chat stores its blocks, the later ones may reuse
them):

* ``no pool``: every prompt prefilled in full (``pool_fetch="never"``, nothing stored);
* ``raw pool``: blocks stored raw (bf16), every stored block fetched;
* ``static:<profile>``: blocks stored with one selector-free profile, every stored block fetched;
* ``controller``: the pool's controller picks the profile to store with, and each request
  fetches what the plan says beats prefilling.

Reported per bandwidth and policy: TTFT (mean, p50, p99) of the reuse requests and of the
first ones, hit rate, stored bytes per cached token (vs bf16), the perplexity increase the
library measured for the stored profiles, Redis memory, and token agreement of the first
32 answer tokens with ``no pool`` (for chats, whose later prompts hold the model's own
answers, only the first turn's prompt is the same across policies). Writes
results/<name>.json, .txt and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))  # run from a checkout without installing

from tensorwire.data import SMOLLM2_LIBRARY  # noqa: E402
from tensorwire.kv.presets import PRESETS  # noqa: E402
from tensorwire.kv.profiles import ProfileLibrary  # noqa: E402
from tensorwire.serve.cluster import Cluster, ClusterConfig, tokenizer  # noqa: E402
from tensorwire.serve.engine import SamplingParams  # noqa: E402
from tensorwire.serve.http.backend import GenerationRequest, KVOptions, Prefilled, Tokens  # noqa: E402
from tensorwire.serve.pool import pipeline_tag, pool_stats  # noqa: E402
from tensorwire.serve.pool.session import pool_library  # noqa: E402
from tensorwire.sysinfo import machine_info  # noqa: E402

BLOCK = 256
BF16_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # SmolLM2: 30 layers x (K, V) x 3 heads x 64 x 2 bytes
AGREEMENT_TOKENS = 32


def workloads(ids: list[int], tok, *, documents: int, lengths: tuple[int, int], questions: int, chats: int,
              turns: int, seed: int) -> list[dict[str, Any]]:
    """Documents (``documents`` of ``lengths`` tokens, spread evenly, each with ``questions``
    questions) and chats (``chats`` of ``turns`` turns on a document of the shortest length)
    from random places of the text; a question is another sentence of the text."""
    rng = np.random.default_rng(seed)
    text = tok.decode(ids[:200_000])
    sentences = [s.strip() for s in text.split(" . ") if 40 < len(s.strip()) < 200]

    def cut(size: int) -> list[int]:
        start = int(rng.integers(0, len(ids) - size))
        return ids[start:start + size]

    def ask(template: str) -> list[int]:
        return tok(template.format(sentences[int(rng.integers(len(sentences)))]), add_special_tokens=False).input_ids

    sizes = np.linspace(*lengths, documents).round().astype(int) if documents > 1 else [lengths[1]]
    out = [{"kind": "document", "base": cut(int(size)),
            "asks": [ask("\n\nQuestion: what does the text say about this: {}?\nAnswer:") for _ in range(questions)]}
           for size in sizes]  # fmt: skip
    for _ in range(chats):
        base = tok("User: read this text.\n\n", add_special_tokens=False).input_ids + cut(lengths[0])
        out.append({"kind": "chat", "base": base,
                    "asks": [ask("\nUser: and what about this: {}?\nAssistant:") for _ in range(turns)]})  # fmt: skip
    return out


async def serve_one(backend, ids: list[int], options: KVOptions, tenant: str, request_id: str) -> dict[str, Any]:
    began = time.perf_counter()
    row: dict[str, Any] = {"prompt_tokens": len(ids), "tokens": []}
    request = GenerationRequest(request_id, tuple(ids), SamplingParams(max_tokens=AGREEMENT_TOKENS, temperature=0),
                                options, tenant=tenant)  # fmt: skip
    async for event in backend.generate(request):
        if isinstance(event, Prefilled):
            row.update(pool=dict(event.pool or {}), timings=dict(event.timings))
        elif isinstance(event, Tokens):
            if not row["tokens"]:
                row["ttft_s"] = time.perf_counter() - began
            row["tokens"].extend(event.token_ids)
    row["jct_s"] = time.perf_counter() - began
    return row


def wait_stored(backend, timeout: float = 300.0) -> None:
    """The store runs after the answer, in the prefill worker: wait until it has none in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not asyncio.run(backend.health()).workers["prefill"].get("pool_stores"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"the prefill worker was still storing blocks after {timeout:g} s")


def run_policy(cluster, backend, work, policy: str) -> list[dict[str, Any]]:
    client = cluster.pool_client()
    client.flushdb()
    if policy == "no pool":
        options = KVOptions(compression="raw", pool_fetch="never", pool_store="none")
    elif policy == "controller":
        options = KVOptions(compression="raw", max_ppl_increase=0.01, max_retrieval_drop=2.0)
    else:
        store = "raw" if policy == "raw pool" else policy.removeprefix("static:")
        options = KVOptions(compression="raw", pool_fetch="always", pool_store=store)
    rows = []
    for d, item in enumerate(work):
        prompt: list[int] = []
        for q, ask in enumerate(item["asks"]):
            if item["kind"] == "document":
                prompt = item["base"] + ask
            else:  # the history grows by the previous prompt's answer and the next question
                prompt = (prompt + rows[-1]["tokens"] + ask) if q else item["base"] + ask
            row = asyncio.run(serve_one(backend, prompt, options, "bench", f"pool-{d}-{q}"))
            row.update(workload=item["kind"], document=d, question=q)
            rows.append(row)
            wait_stored(backend)
    return rows


def summarise(rows, reference, block_raw_bytes_per_token: float, stats: dict[str, Any], names: dict[str, str],
              quality: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """One policy's numbers; ``names`` maps pipeline tags to profile names, ``quality`` names to
    the library's perplexity increase."""
    def pct(values):
        return {"mean": float(np.mean(values)), "p50": float(np.percentile(values, 50)),
                "p99": float(np.percentile(values, 99))} if values else None  # fmt: skip

    reuse = [r for r in rows if r["question"] > 0]
    agree = []
    for r, ref in zip(rows, reference):
        if r["workload"] == "chat" and r["question"] > 0:
            continue  # a later turn's prompt holds this policy's own earlier answers
        n = max(len(r["tokens"]), len(ref["tokens"]), 1)
        agree.append(sum(a == b for a, b in zip(r["tokens"], ref["tokens"])) / n)
    stored = {names.get(tag, tag): n["blocks"] for tag, n in stats.get("by_pipeline", {}).items()}
    hit = sum(r["pool"].get("fetched_tokens", 0) for r in rows)
    cached = sum(r["prompt_tokens"] - 1 for r in rows)
    return {"ttft_reuse_s": pct([r["ttft_s"] for r in reuse]), "ttft_first_s": pct([r["ttft_s"] for r in rows if r["question"] == 0]),
            "fetched_token_share": hit / cached if cached else 0.0, "token_agreement": float(np.mean(agree)),
            "bytes_per_token": stats.get("bytes_per_token"), "vs_bf16": (stats.get("bytes_per_token") or 0) / block_raw_bytes_per_token,
            "redis_used_memory": stats["used_memory"], "blocks": stats["blocks"], "stored_blocks_by_profile": stored,
            "library_ppl_increase": max((quality.get(p, 0.0) for p in stored), default=None),
            "ttft_reuse_by_workload_s": {k: pct([r["ttft_s"] for r in reuse if r["workload"] == k]) for k in ("document", "chat")},
            "decisions": {k: sum(r["pool"].get("decision") == k for r in rows) for k in ("fetch", "recompute", "miss", "off")}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, help="the corpus to cut documents from (required unless --from-json)")
    p.add_argument("--quick", action="store_true",
                   help="one 4096-token document (3 questions), one chat (3 turns), raw/2 static/controller")  # fmt: skip
    p.add_argument("--gbps", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="pool link rates")
    p.add_argument("--documents", type=int, default=3)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--chats", type=int, default=2)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--policies", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name")
    p.add_argument("--from-json", type=Path, help="re-summarise a results JSON instead of running")
    args = p.parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        return report(result, args.from_json.with_suffix(""))
    if args.text is None:
        p.error("--text is required")
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    tok = tokenizer()
    ids = tok(args.text.read_text()).input_ids
    library = pool_library(ProfileLibrary.load(SMOLLM2_LIBRARY))
    if args.quick:
        work = workloads(ids, tok, documents=1, lengths=(2048, 4096), questions=3, chats=1, turns=3, seed=args.seed)
        policies = args.policies or ["no pool", "raw pool", *(f"static:{n}" for n in library.names[:2]), "controller"]
    else:
        work = workloads(ids, tok, documents=args.documents, lengths=(2048, 8000), questions=args.questions,
                         chats=args.chats, turns=args.turns, seed=args.seed)  # fmt: skip
        policies = args.policies or ["no pool", "raw pool", *(f"static:{n}" for n in library.names), "controller"]
    names = {pipeline_tag(p.pipeline): p.name for p in library} | {pipeline_tag(PRESETS["bf16"]): "raw"}
    quality = {p.name: p.ppl_increase for p in library} | {"raw": 0.0}
    name = args.name or ("pool-quick" if args.quick else "pool")
    result: dict[str, Any] = {"machine": machine_info(("torch", "transformers", "redis")),
                              "config": {"gbps": args.gbps, "policies": policies, "block_tokens": BLOCK,
                                         "workloads": [{"kind": w["kind"], "base_tokens": len(w["base"]),
                                                        "requests": len(w["asks"])} for w in work]},
                              "links": {}}  # fmt: skip
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    for gbps in args.gbps:
        config = ClusterConfig(gbps=None, shaper="none", pool=True, pool_block_tokens=BLOCK, pool_gbps=gbps,
                               pool_maxmemory="2gb", peer_timeout_s=120.0)  # fmt: skip
        with Cluster(config) as cluster:
            backend = cluster.backend(tok)
            link: dict[str, Any] = {"pool_shaper": cluster.pool_shaper, "runs": {}, "summary": {}}
            for policy in policies:
                began = time.perf_counter()
                rows = run_policy(cluster, backend, work, policy)
                link["runs"][policy] = rows
                link["summary"][policy] = {"stats": pool_stats(cluster.pool_client(), BLOCK)}
                log(f"{gbps:g} Gbit/s: {policy}: {time.perf_counter() - began:.0f} s")
            reference = link["runs"].get("no pool") or link["runs"][policies[0]]
            for policy, rows in link["runs"].items():
                link["summary"][policy].update(summarise(rows, reference, BF16_BYTES_PER_TOKEN,
                                                         link["summary"][policy]["stats"], names, quality))  # fmt: skip
        result["links"][f"{gbps:g}"] = link
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return report(result, out / name)


def report(result: dict[str, Any], stem: Path) -> int:
    table = format_table(result)
    stem.with_suffix(".txt").write_text(table + "\n")
    plot(result, stem.with_suffix(".png"))
    print(table)
    return 0


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'pool Gbit/s':<12}{'policy':<30}{'TTFT reuse':>11}{'p50':>7}{'p99':>7}{'TTFT 1st':>9}{'fetched':>8}"
             f"{'B/token':>8}{'vs bf16':>8}{'ppl+':>7}{'agree':>6}"]  # fmt: skip
    for gbps, link in result["links"].items():
        summary = link["summary"]
        for policy, s in summary.items():
            reuse, first = s["ttft_reuse_s"], s["ttft_first_s"]
            ppl = s.get("library_ppl_increase")
            lines.append(f"{gbps:<12}{policy[:29]:<30}{reuse['mean']:>10.2f}s{reuse['p50']:>6.2f}s{reuse['p99']:>6.2f}s"
                         f"{first['mean']:>8.1f}s{s['fetched_token_share']:>8.0%}{(s['bytes_per_token'] or 0):>8.0f}"
                         f"{s['vs_bf16']:>8.2f}{'' if ppl is None else f'{ppl:+.2%}':>7}{s['token_agreement']:>6.0%}")  # fmt: skip
        cold = summary.get("no pool", {}).get("ttft_reuse_s")
        if cold:
            best = min((s["ttft_reuse_s"]["mean"], p) for p, s in summary.items() if p != "no pool")
            lines.append(f"{'':<12}reuse TTFT: no pool / best = {cold['mean'] / best[0]:.1f}x ({best[1]})")
            docs = {p: s["ttft_reuse_by_workload_s"]["document"] for p, s in summary.items()}
            if docs.get("no pool") and all(docs.values()):
                best = min((d["mean"], p) for p, d in docs.items() if p != "no pool")
                lines.append(f"{'':<12}documents only: no pool / best = {docs['no pool']['mean'] / best[0]:.1f}x ({best[1]})")
        if cold and "raw pool" in summary and "controller" in summary:
            better = min(cold["mean"], summary["raw pool"]["ttft_reuse_s"]["mean"])
            lines.append(f"{'':<12}controller / better of raw pool and no pool = "
                         f"{summary['controller']['ttft_reuse_s']['mean'] / better:.2f}")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(result["links"])
    policies = list(next(iter(result["links"].values()))["summary"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        means = [result["links"][g]["summary"][policy]["ttft_reuse_s"]["mean"] for g in links]
        ax.bar(np.arange(len(links)) + (i - (len(policies) - 1) / 2) * width, means, width, label=policy[:40])
    ax.set_xticks(np.arange(len(links)), [f"{g} Gbit/s" for g in links])
    ax.set_yscale("log")
    ax.set_ylabel("TTFT of reuse requests, mean (s)")
    ax.set_title("KV pool on Redis: TTFT when the prefix is stored (pool link shaped)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
