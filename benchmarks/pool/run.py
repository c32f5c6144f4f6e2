"""The KV pool, measured: questions about the same long documents, with and without a pool.

    python benchmarks/pool/run.py --text ../shared/data/wikitext-2-raw-test.txt --quick
    python benchmarks/pool/run.py --text ../shared/data/wikitext-2-raw-test.txt          # 3 documents, 2k-8k

A prefill worker, a decode worker and a Redis pool of their own (``Cluster(pool=True)``),
the pool link shaped by tbf in its own network namespace (where allowed) at each of
``--gbps``. Documents are cut from the text; each gets ``--questions`` questions (another
sentence of the text, asked after the document). Per bandwidth, each policy starts from an
empty pool, and its requests run one after the other (the first question of a document
stores its blocks, the others may reuse them):

* ``no pool``: every prompt prefilled in full (``pool_fetch="never"``, nothing stored);
* ``raw pool``: blocks stored raw (bf16), every stored block fetched;
* ``static:<profile>``: blocks stored with one selector-free profile, every stored block fetched;
* ``controller``: the pool's controller picks the profile to store with, and each request
  fetches what the plan says beats prefilling.

Reported per bandwidth and policy: TTFT (mean, p50, p99) of the reuse requests and of the
first ones, hit rate, stored bytes per cached token (vs bf16), Redis memory, and token
agreement of the first 32 answer tokens with ``no pool``. Writes results/<name>.json,
.txt and .png.
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
from tensorwire.kv.profiles import ProfileLibrary  # noqa: E402
from tensorwire.serve.cluster import Cluster, ClusterConfig, tokenizer  # noqa: E402
from tensorwire.serve.engine import SamplingParams  # noqa: E402
from tensorwire.serve.http.backend import GenerationRequest, KVOptions, Prefilled, Tokens  # noqa: E402
from tensorwire.serve.pool import pool_stats  # noqa: E402
from tensorwire.serve.pool.session import pool_library  # noqa: E402
from tensorwire.sysinfo import machine_info  # noqa: E402

BLOCK = 256
AGREEMENT_TOKENS = 32


def documents(ids: list[int], tok, n: int, lengths: tuple[int, int], questions: int, seed: int) -> list[list[list[int]]]:
    """``n`` documents of ``lengths`` tokens (spread evenly) from random places of the text, each
    with ``questions`` prompts: the document, then a question made of another sentence."""
    rng = np.random.default_rng(seed)
    sizes = np.linspace(*lengths, n).round().astype(int) if n > 1 else [lengths[1]]
    text = tok.decode(ids[:200_000])
    sentences = [s.strip() for s in text.split(" . ") if 40 < len(s.strip()) < 200]
    out = []
    for size in sizes:
        start = int(rng.integers(0, len(ids) - size))
        doc = ids[start:start + size]
        asks = [tok(f"\n\nQuestion: what does the text say about this: {sentences[int(rng.integers(len(sentences)))]}?"
                    "\nAnswer:", add_special_tokens=False).input_ids for _ in range(questions)]  # fmt: skip
        out.append([doc + ask for ask in asks])
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


def run_policy(cluster, backend, docs, policy: str) -> list[dict[str, Any]]:
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
    for d, prompts in enumerate(docs):
        for q, ids in enumerate(prompts):
            row = asyncio.run(serve_one(backend, ids, options, "bench", f"pool-{d}-{q}"))
            row.update(document=d, question=q)
            rows.append(row)
            wait_stored(backend)
    return rows


def summarise(rows, reference, block_raw_bytes_per_token: float, stats: dict[str, Any]) -> dict[str, Any]:
    def pct(values):
        return {"mean": float(np.mean(values)), "p50": float(np.percentile(values, 50)),
                "p99": float(np.percentile(values, 99))} if values else None  # fmt: skip

    reuse = [r for r in rows if r["question"] > 0]
    agree = []
    for r, ref in zip(rows, reference):
        n = max(len(r["tokens"]), len(ref["tokens"]), 1)
        agree.append(sum(a == b for a, b in zip(r["tokens"], ref["tokens"])) / n)
    hit = sum(r["pool"].get("fetched_tokens", 0) for r in rows)
    cached = sum(r["prompt_tokens"] - 1 for r in rows)
    return {"ttft_reuse_s": pct([r["ttft_s"] for r in reuse]), "ttft_first_s": pct([r["ttft_s"] for r in rows if r["question"] == 0]),
            "fetched_token_share": hit / cached if cached else 0.0, "token_agreement": float(np.mean(agree)),
            "bytes_per_token": stats.get("bytes_per_token"), "vs_bf16": (stats.get("bytes_per_token") or 0) / block_raw_bytes_per_token,
            "redis_used_memory": stats["used_memory"], "blocks": stats["blocks"],
            "decisions": {k: sum(r["pool"].get("decision") == k for r in rows) for k in ("fetch", "recompute", "miss", "off")}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="one 4096-token document, 3 questions, raw/controller/1 static")
    p.add_argument("--gbps", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="pool link rates")
    p.add_argument("--documents", type=int, default=3)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--policies", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name")
    args = p.parse_args(argv)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    tok = tokenizer()
    ids = tok(args.text.read_text()).input_ids
    library = pool_library(ProfileLibrary.load(SMOLLM2_LIBRARY))
    if args.quick:
        docs = documents(ids, tok, 1, (4096, 4096), 3, args.seed)
        policies = args.policies or ["no pool", "raw pool", f"static:{library.names[0]}", "controller"]
    else:
        docs = documents(ids, tok, args.documents, (2048, 8000), args.questions, args.seed)
        policies = args.policies or ["no pool", "raw pool", *(f"static:{n}" for n in library.names), "controller"]
    name = args.name or ("pool-quick" if args.quick else "pool")
    result: dict[str, Any] = {"machine": machine_info(("torch", "transformers", "redis")),
                              "config": {"gbps": args.gbps, "policies": policies, "block_tokens": BLOCK,
                                         "documents": [len(d[0]) for d in docs], "questions": len(docs[0])},
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
                rows = run_policy(cluster, backend, docs, policy)
                link["runs"][policy] = rows
                stats = pool_stats(cluster.pool_client(), BLOCK)
                link["summary"][policy] = {"stats": stats}
                log(f"{gbps:g} Gbit/s: {policy}: {time.perf_counter() - began:.0f} s")
            reference = link["runs"].get("no pool") or link["runs"][policies[0]]
            per_token = 30 * 2 * 3 * 64 * 2  # SmolLM2's bf16 cache per token
            for policy, rows in link["runs"].items():
                link["summary"][policy].update(summarise(rows, reference, per_token, link["summary"][policy]["stats"]))
        result["links"][f"{gbps:g}"] = link
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    table = format_table(result)
    (out / f"{name}.txt").write_text(table + "\n")
    print(table)
    return 0


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'pool Gbit/s':<12}{'policy':<30}{'TTFT reuse':>11}{'p99':>7}{'TTFT 1st':>9}{'fetched':>8}{'B/token':>8}"
             f"{'vs bf16':>8}{'agree':>6}"]  # fmt: skip
    for gbps, link in result["links"].items():
        cold = link["summary"].get("no pool", {}).get("ttft_reuse_s")
        for policy, s in link["summary"].items():
            reuse, first = s["ttft_reuse_s"], s["ttft_first_s"]
            lines.append(f"{gbps:<12}{policy[:29]:<30}{reuse['mean']:>10.2f}s{reuse['p99']:>6.1f}s{first['mean']:>8.1f}s"
                         f"{s['fetched_token_share']:>8.0%}{(s['bytes_per_token'] or 0):>8.0f}{s['vs_bf16']:>8.2f}"
                         f"{s['token_agreement']:>6.0%}")  # fmt: skip
        if cold:
            best = min((s["ttft_reuse_s"]["mean"], p) for p, s in link["summary"].items() if p != "no pool")
            lines.append(f"{'':<12}reuse TTFT: no pool / best = {cold['mean'] / best[0]:.1f}x ({best[1]})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
