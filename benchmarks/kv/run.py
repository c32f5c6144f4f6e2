"""KV-cache compression side by side: peers and tensorwire pipelines on SmolLM2 + WikiText-2.

One process, one model, one set of text windows and retrieval cases for every method:

* quality (deterministic): ratio vs the bf16 cache, continuation perplexity increase,
  needle retrieval accuracy, reconstruction error;
* speed: encode and decode of one real 2048-token cache, one thread, interleaved across
  methods (A B C A B C ...), ``--repeats`` rounds after a warm-up, median and min-max.

Writes ``results/kv.json`` (machine, versions, settings, every repeat), prints a table and
saves ``results/kv_ratio_quality.png`` (ratio vs perplexity increase and vs retrieval).

    .venv/bin/python benchmarks/kv/run.py --text ../shared/data/wikitext-2-raw-test.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# Peers, re-implemented as tensorwire stages (see src/tensorwire/kv/presets.py) plus the
# tensorwire compositions found by exploring the strategy space.
METHODS: dict[str, dict] = {
    "uncompressed (bf16)": {"stages": [{"id": "cast", "dtype": "BF16"}]},
    "KIVI-4": {"stages": [{"id": "kivi", "k_bits": 4, "v_bits": 4, "group_size": 32, "residual": 128}]},
    "KIVI-2": {"stages": [{"id": "kivi", "k_bits": 2, "v_bits": 2, "group_size": 32, "residual": 128}]},
    "CacheGen-style": {"stages": [
        {"id": "layerwise", "early_bits": 6, "late_bits": 4, "early_fraction": 0.33, "group_size": 32, "residual": 0},
        {"id": "ans"}]},
    "SnapKV 0.5": {"stages": [{"id": "snapkv", "keep_fraction": 0.5, "window": 32, "kernel": 5}, {"id": "cast", "dtype": "BF16"}]},
    "Knorm 0.5": {"stages": [{"id": "key_norm", "keep_fraction": 0.5}, {"id": "cast", "dtype": "BF16"}]},
    "StreamingLLM 0.5": {"stages": [{"id": "streaming_llm", "keep_fraction": 0.5, "sinks": 4}, {"id": "cast", "dtype": "BF16"}]},
}  # fmt: skip


def tensorwire_methods() -> dict[str, dict]:
    path = HERE / "compositions.json"
    return json.loads(path.read_text()) if path.exists() else {}


def speed_rounds(pipelines: dict, cache, repeats: int) -> dict[str, dict]:
    from tensorwire.codec.cpu import one_thread

    with one_thread():
        return _speed_rounds(pipelines, cache, repeats)


def _speed_rounds(pipelines: dict, cache, repeats: int) -> dict[str, dict]:
    from tensorwire.kv import Pipeline

    kv_bytes = cache.nbytes(2)
    for pipe in pipelines.values():  # warm-up: numba compiles on first call
        Pipeline.decode_data(pipe.encode(cache))
    times: dict[str, dict[str, list[float]]] = {name: {"encode": [], "decode": []} for name in pipelines}
    for _ in range(repeats):
        for name, pipe in pipelines.items():
            t0 = time.perf_counter()
            payload = pipe.encode(cache)
            t1 = time.perf_counter()
            Pipeline.decode_data(payload)
            t2 = time.perf_counter()
            times[name]["encode"].append(t1 - t0)
            times[name]["decode"].append(t2 - t1)
    out = {}
    for name, t in times.items():
        out[name] = {
            f"{k}_gbps": kv_bytes / statistics.median(v) / 1e9 for k, v in t.items()
        } | {f"{k}_gbps_range": [kv_bytes / max(v) / 1e9, kv_bytes / min(v) / 1e9] for k, v in t.items()} | {
            f"{k}_seconds": v for k, v in t.items()
        }
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for row in rows:
        ours = row["family"] == "tensorwire"
        style = {"marker": "o" if ours else "s", "color": "tab:blue" if ours else "tab:gray"}
        axes[0].scatter(row["ratio"], 100 * row["ppl_increase"], **style)
        axes[0].annotate(row["name"], (row["ratio"], 100 * row["ppl_increase"]), fontsize=7)
        if row["retrieval"] is not None:
            axes[1].scatter(row["ratio"], row["retrieval"], **style)
            axes[1].annotate(row["name"], (row["ratio"], row["retrieval"]), fontsize=7)
    axes[0].set(xlabel="compression ratio vs bf16 KV", ylabel="perplexity increase (%)", yscale="symlog")
    axes[1].set(xlabel="compression ratio vs bf16 KV", ylabel="retrieval accuracy (%)")
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M-Instruct, WikiText-2 raw test; blue = tensorwire, gray = peers (same evaluator)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--needles", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--question", choices=("after", "in_prompt"), default="after",
                        help="retrieval question after the compressed context, or inside the compressed prompt")
    parser.add_argument("--only", nargs="*", help="method names to run (default: all)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--peers", help="JSON results of peers run elsewhere (e.g. kvpress in its own venv) to merge")
    parser.add_argument("--merge-only", action="store_true",
                        help="measure nothing: add --peers to OUT/kv.json (replacing their earlier rows) and redo the table and plot")
    parser.add_argument("--library-from", metavar="KV_JSON",
                        help="only write results/profiles.json from an earlier run's kv.json, then stop")
    args = parser.parse_args()
    if args.merge_only:
        return merge_peers(Path(args.out), Path(args.peers))
    if args.library_from:
        write_library(json.loads(Path(args.library_from).read_text()), Path(args.out) / "profiles.json")
        return 0

    from tensorwire.kv import Pipeline
    from tensorwire.models import load_smollm2
    from tensorwire.kv.quality import EvalSettings, Evaluator
    from tensorwire.sysinfo import machine_info

    methods = {name: (cfg, "peer") for name, cfg in METHODS.items()}
    methods |= {name: (cfg, "tensorwire") for name, cfg in tensorwire_methods().items()}
    if args.only:
        methods = {k: v for k, v in methods.items() if k in args.only}
    pipelines = {name: Pipeline.from_config(cfg) for name, (cfg, _) in methods.items()}

    model, tokenizer = load_smollm2()
    settings = EvalSettings(args.text, args.context, args.continuation, args.windows, args.needles, question=args.question)
    evaluator = Evaluator(model, tokenizer, settings)
    # Quality rows are kept as they come, so that a run stopped late resumes where it was.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "kv.partial.jsonl"
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            row = json.loads(line)
            same = row["name"] in pipelines and row["pipeline"] == pipelines[row["name"]].to_config()
            if same and row["settings"] == vars(settings):
                done[row["name"]] = row
    rows, prepared = [], False
    for name, pipe in pipelines.items():
        if name in done:
            rows.append({k: v for k, v in done[name].items() if k != "settings"})
            continue
        if not prepared:  # the baselines, prefilled only when a method is left to measure
            prepared, began = True, time.perf_counter()
            evaluator.windows()
            evaluator.needles()
            print(f"baselines prefilled in {time.perf_counter() - began:.0f} s", file=sys.stderr)
        r = evaluator.evaluate(pipe, speed=False)
        rows.append({"name": name, "family": methods[name][1], **r.to_dict()})
        with partial.open("a") as f:
            f.write(json.dumps(rows[-1] | {"settings": vars(settings)}) + "\n")
        print(f"  {name}: ratio {r.ratio:.2f} ppl {r.ppl_increase * 100:+.2f}% retrieval {r.retrieval}", file=sys.stderr)
    speeds = speed_rounds(pipelines, evaluator.windows()[0].cache, args.repeats)
    for row in rows:
        row.update(speeds[row["name"]])
    if args.peers:
        rows += json.loads(Path(args.peers).read_text())["rows"]

    result = {"machine": machine_info(("torch", "transformers")), "settings": vars(settings) | {"repeats": args.repeats, "model": "SmolLM2-135M-Instruct",
                                                                 "shape": evaluator.shape},
              "data": {"text": args.text, "text_sha256_16": evaluator.text_id}, "rows": rows}  # fmt: skip
    (out / "kv.json").write_text(json.dumps(result, indent=2))
    write_library(result, out / "profiles.json")
    plot(rows, out / "kv_ratio_quality.png")
    partial.unlink()
    print(table(rows))
    return 0


def merge_peers(out: Path, peers: Path) -> int:
    result = json.loads((out / "kv.json").read_text())
    added = json.loads(peers.read_text())["rows"]
    families = {row["family"] for row in added}
    result["rows"] = [row for row in result["rows"] if row["family"] not in families] + added
    result.setdefault("peers", {})[peers.name] = sorted(families)
    (out / "kv.json").write_text(json.dumps(result, indent=2))
    plot(result["rows"], out / "kv_ratio_quality.png")
    print(table(result["rows"]))
    return 0


def write_library(result: dict, path: Path) -> None:
    """Every measured method with a pipeline and speeds as a profile library (kv/profiles.py).

    The controller then chooses among the methods measured here, on this machine; the
    offline search (benchmarks/search) writes a Pareto-filtered library of the same format.
    """
    import re

    from tensorwire.kv.profiles import ModelShape, Profile, ProfileLibrary

    profiles = []
    for row in result["rows"]:
        if "encode_gbps" not in row or row.get("retrieval_drop") is None or row["ratio"] <= 1.05:
            continue  # not measured here, or no smaller than raw: the controller has raw already
        name = re.sub(r"[^a-z0-9.]+", "-", row["name"].lower()).strip("-")
        profiles.append(Profile(name=name, pipeline=row["pipeline"], ratio=row["ratio"], ppl_increase=row["ppl_increase"],
                                retrieval_drop=row["retrieval_drop"], encode_bps=row["encode_gbps"] * 1e9,
                                decode_bps=row["decode_gbps"] * 1e9, threads=1))  # fmt: skip
    # Results written before "shape" was recorded are all SmolLM2-135M's (the only model run here).
    shape = result["settings"].get("shape") or {"n_layers": 30, "kv_heads": 3, "head_dim": 64}
    model = ModelShape(result["settings"]["model"], shape["n_layers"], shape["kv_heads"], shape["head_dim"], "BF16")
    machine = result["machine"] | {"source": "benchmarks/kv/run.py", "settings": result["settings"]}
    ProfileLibrary(model, tuple(profiles), machine).save(path)


def table(rows: list[dict]) -> str:
    lines = [
        "| method | ratio | ppl increase | retrieval (base) | key / value rel. error | encode GB/s | decode GB/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["family"] != "peer", r["ratio"])):
        ret = "-" if r.get("retrieval") is None else f"{r['retrieval']:.0f}% ({r['retrieval_base']:.0f}%)"
        enc = "-" if "encode_gbps" not in r else f"{r['encode_gbps']:.2f}"
        dec = "-" if "decode_gbps" not in r else f"{r['decode_gbps']:.2f}"
        err = "-" if r.get("key_error") is None else f"{r['key_error']:.4f} / {r['value_error']:.4f}"  # kvpress: not known
        lines.append(
            f"| {r['name']} | {r['ratio']:.2f} | {100 * r['ppl_increase']:+.2f}% | {ret} | "
            f"{err} | {enc} | {dec} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
