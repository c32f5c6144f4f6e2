"""tensorwire's vLLM connector, measured with vLLM's own serving benchmark (vllm.benchmarks.serve).

    .venv-vllm/bin/python benchmarks/vllm/run.py --text ../shared/data/wikitext-2-raw-test.txt --quick
    .venv-vllm/bin/python benchmarks/vllm/run.py --text ../shared/data/wikitext-2-raw-test.txt

Deployments (real vLLM OpenAI servers on this machine, started by
``tensorwire.integrations.vllm.deploy.Deployment``), the same requests for each:

* ``single``: one vLLM instance, prefill and decode together (no KV moves);
* ``vllm-example-pd``: vLLM's own uncompressed PD path, its ExampleConnector (the KV goes
  through safetensors files in a shared folder, not a network link: unshaped);
* ``tensorwire-pd @ R``: a prefill and a decode instance with tensorwire's connector, the
  link a token bucket at R Gbit/s (``--gbps``), per request ``raw`` (bf16), ``lossless``,
  one static profile, and ``auto`` (the controller's choice).

Datasets: ``text`` (prompts cut from ``--text``, 1-2k tokens) and vLLM's ``random``.
Requests run one at a time (``--max-concurrency 1``: two instances share two cores).
Reported per run: TTFT, TPOT and end-to-end latency (mean, p50, p99), output throughput,
and for tensorwire the bytes its transfers sent and the profiles chosen (from the prefill
instance's log). Writes results/<name>.json, .txt and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))  # run from a checkout without installing

from tensorwire.integrations.vllm.deploy import Deployment  # noqa: E402
from tensorwire.models import smollm2_folder  # noqa: E402
from tensorwire.sysinfo import machine_info  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
STATIC = "kivi:k_bits=6,v_bits=4,group_size=64,residual=32/raw/zstd"


def text_prompts(path: Path, n: int, lengths: tuple[int, int], out: Path, seed: int) -> Path:
    """``n`` prompts cut from the text (``lengths`` in tokens), each ending in a question, as vLLM's custom jsonl."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_folder())
    ids = tok(path.read_text()).input_ids
    rng = np.random.default_rng(seed)
    with out.open("w") as f:
        for size in rng.integers(lengths[0], lengths[1] + 1, n):
            start = int(rng.integers(0, len(ids) - size))
            prompt = tok.decode(ids[start:start + size]) + "\n\nQuestion: what is this text about?\nAnswer:"
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return out


def serve_bench(url: str, dataset: dict[str, Any], extra_body: dict[str, Any] | None, num: int, outdir: Path,
                label: str) -> dict[str, Any]:  # fmt: skip
    """vLLM's serving benchmark against ``url``; its result dict."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    argv = ["--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", MODEL,
            "--tokenizer", str(smollm2_folder()), "--num-prompts", str(num), "--max-concurrency", "1",
            "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99", "--seed", "0",
            "--temperature", "0", "--save-result", "--result-dir", str(outdir), "--result-filename", f"{label}.json",
            "--label", label, "--disable-tqdm"]  # fmt: skip
    if dataset["name"] == "text":
        argv += ["--dataset-name", "custom", "--dataset-path", str(dataset["path"]), "--custom-output-len",
                 str(dataset["output"]), "--skip-chat-template"]  # fmt: skip
    else:
        argv += ["--dataset-name", "random", "--random-input-len", str(dataset["input"]), "--random-output-len",
                 str(dataset["output"])]  # fmt: skip
    if extra_body:
        argv += ["--extra-body", json.dumps(extra_body)]
    return main(parser.parse_args(argv))


def transfers(log: Path, since: int) -> tuple[list[dict[str, Any]], int]:
    """tensorwire's transfer records in the prefill instance's log after line ``since``."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    found = []
    for line in lines[since:]:
        at = line.find("tensorwire.vllm: transfer ")
        if at >= 0:
            found.append(json.loads(line[at + len("tensorwire.vllm: transfer "):]))
    return found, len(lines)


def summary(result: dict[str, Any], moved: list[dict[str, Any]] | None) -> dict[str, Any]:
    out = {k: result.get(k) for k in ("completed", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                                     "p99_tpot_ms", "mean_e2el_ms", "p99_e2el_ms", "output_throughput", "duration")}  # fmt: skip
    if moved is not None:
        out["kv_bytes_raw"] = sum(t["kv_bytes_raw"] for t in moved)
        out["kv_bytes_sent"] = sum(t["kv_bytes_sent"] for t in moved)
        out["profiles"] = sorted({t["profile"] for t in moved})
        out["transfers"] = len(moved)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", type=Path, help="corpus for the text dataset (required unless --from-json)")
    p.add_argument("--quick", action="store_true", help="4 requests per run, the text dataset only, 0.1 and 10 Gbit/s")
    p.add_argument("--gbps", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--name")
    p.add_argument("--from-json", type=Path)
    args = p.parse_args(argv)
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        return report(result, args.from_json.with_suffix(""))
    if args.text is None:
        p.error("--text is required")
    name = args.name or ("vllm-quick" if args.quick else "vllm")
    gbps = [0.1, 10.0] if args.quick and args.gbps == [0.1, 1.0, 10.0] else args.gbps
    n = 4 if args.quick else args.requests
    raw_dir = out / f"{name}-runs"
    raw_dir.mkdir(exist_ok=True)
    # The prompts hold corpus text: they go to a temporary folder, never into results/.
    scratch = tempfile.TemporaryDirectory(prefix="tensorwire-vllm-bench-")
    datasets = [{"name": "text", "path": text_prompts(args.text, n, (1024, 2048), Path(scratch.name) / "text.jsonl", 0),
                 "output": 32}]  # fmt: skip
    if not args.quick:
        datasets.append({"name": "random", "input": 1536, "output": 32})
    result: dict[str, Any] = {"machine": machine_info(("torch", "transformers", "vllm")),
                              "config": {"gbps": gbps, "requests": n, "datasets": [d["name"] for d in datasets],
                                         "static_profile": STATIC}, "runs": {}}  # fmt: skip
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    def run(deployment: Deployment, label: str, extra: dict[str, Any] | None, tensorwire: bool) -> None:
        for dataset in datasets:
            key = f"{label} | {dataset['name']}"
            prefill_log = deployment.log_dir / "prefill.log"
            _, since = transfers(prefill_log, 0)
            res = serve_bench(deployment.url, dataset, extra, n, raw_dir, key.replace(" | ", "-").replace(" ", "_").replace("@", "at"))
            moved = transfers(prefill_log, since)[0] if tensorwire else None
            result["runs"][key] = summary(res, moved)
            log(f"{key}: TTFT {res.get('mean_ttft_ms', 0):.0f} ms, E2E {res.get('mean_e2el_ms', 0):.0f} ms")
            (out / f"{name}.json").write_text(json.dumps(result, indent=1))

    with Deployment("single") as single:
        run(single, "single", None, False)
    with Deployment("pd", connector="example") as example:
        run(example, "vllm-example-pd", None, False)
    for rate in gbps:
        with Deployment("pd", gbps=rate) as pd:
            for compression in ("raw", "lossless", STATIC, "auto"):
                extra = {"kv_transfer_params": {"tensorwire": {"compression": compression, "max_ppl_increase": 0.01,
                                                               "max_retrieval_drop": 2.0}}}  # fmt: skip
                short = "static" if compression == STATIC else ("controller" if compression == "auto" else compression)
                run(pd, f"tensorwire-pd {short} @ {rate:g}", extra, True)
    return report(result, out / name)


def report(result: dict[str, Any], stem: Path) -> int:
    lines = [f"{'deployment | dataset':<42}{'TTFT':>8}{'p99':>8}{'TPOT':>7}{'E2E':>8}{'p99':>8}{'tok/s':>7}{'KV MB':>7}"
             f"{'ratio':>6}  profiles"]  # fmt: skip
    for key, r in result["runs"].items():
        sent = r.get("kv_bytes_sent")
        ratio = r["kv_bytes_raw"] / sent if sent else None
        lines.append(f"{key[:41]:<42}{r['mean_ttft_ms']:>7.0f}m{r['p99_ttft_ms']:>7.0f}m{r['mean_tpot_ms']:>6.0f}m"
                     f"{r['mean_e2el_ms']:>7.0f}m{r['p99_e2el_ms']:>7.0f}m{r['output_throughput']:>7.1f}"
                     f"{'' if sent is None else f'{sent / 1e6:.1f}':>7}{'' if ratio is None else f'{ratio:.2f}':>6}  "
                     f"{','.join(p[:24] for p in r.get('profiles', []))}")  # fmt: skip
    lines.append("(ms; TTFT/E2E mean and p99, TPOT mean; KV MB: bytes tensorwire's transfers sent; ratio: bf16 bytes / sent)")
    table = "\n".join(lines)
    stem.with_suffix(".txt").write_text(table + "\n")
    plot(result, stem.with_suffix(".png"))
    print(table)
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in result["runs"] if k.endswith("| text")]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ttft = [result["runs"][k]["mean_ttft_ms"] for k in keys]
    ax.barh(range(len(keys)), ttft, color=["tab:gray" if "tensorwire" not in k else "tab:blue" for k in keys])
    ax.set_yticks(range(len(keys)), [k.removesuffix(" | text") for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean TTFT (ms), text dataset, one request at a time")
    ax.set_title("vLLM with tensorwire's KV connector vs one instance and vLLM's own PD connector")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
