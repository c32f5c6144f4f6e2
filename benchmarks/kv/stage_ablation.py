"""Ablation of the KVQuant-style stages on SmolLM2-135M: does each one buy ratio at <= 1 % perplexity?

The stages measured here are the ones the strongest low-bit KV methods add on top of KIVI's
per-channel keys / per-token values (KVQuant, Hooper et al. 2024, arXiv:2401.18079):

* ``prerope``: keys quantized per channel *before* RoPE (RoPE undone with the model's own
  rotary frequencies at each token's position, redone after dequantization);
* ``outliers``: dense-and-sparse: in every quantization group the fraction ``f`` of values
  farthest from the group's median is kept in bf16 (value + index) and the group's range is
  fitted to the rest;
* ``lloyd``: a non-uniform codebook: Lloyd-Max levels fitted per layer (keys and values apart)
  to the group-normalised values ``(x - mean) / max|x - mean|``, instead of uniform levels.

They are applied here as a numerical simulation in float64 numpy (quantize, dequantize, put
the result back into the cache), not as pipeline stages: the question is whether they would
earn a place in the strategy space, which takes the model's perplexity, not a format. The
bits per value count everything a payload would carry: codes at their width, two float16
parameters per group, the bf16 residual tokens, 32 bits per outlier (bf16 value + 16-bit
index) and nothing for the codebooks (8 or 16 float16 levels per layer).

Every row uses groups of 128 tokens (keys) / one group per token (values, head_dim 64) and
32 residual tokens: the setting of the library's best KIVI point (KIVI-4 g128).

    .venv/bin/python benchmarks/kv/stage_ablation.py --windows 12 --out benchmarks/kv/results/stage_ablation.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

TEXT = Path(os.environ.get("TENSORWIRE_TEXT", Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-raw-test.txt"))
GROUP, RESIDUAL = 128, 32

ROWS = {
    "uniform 4/4": dict(k_bits=4, v_bits=4),
    "uniform 3/3": dict(k_bits=3, v_bits=3),
    "3/3 + prerope": dict(k_bits=3, v_bits=3, prerope=True),
    "3/3 + outliers 1%": dict(k_bits=3, v_bits=3, outliers=0.01),
    "3/3 + lloyd": dict(k_bits=3, v_bits=3, lloyd=True),
    "3/3 + lloyd + outliers 1%": dict(k_bits=3, v_bits=3, lloyd=True, outliers=0.01),
    "3/3 + prerope + lloyd + outliers 1%": dict(k_bits=3, v_bits=3, prerope=True, lloyd=True, outliers=0.01),
    "4/3 + lloyd + outliers 1%": dict(k_bits=4, v_bits=3, lloyd=True, outliers=0.01),
}


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, sign: float) -> np.ndarray:
    """Llama's rotate-half RoPE at ``positions`` (``sign=-1`` undoes it)."""
    angle = positions[..., None].astype(np.float64) * inv_freq
    cos, sin = np.cos(angle), sign * np.sin(angle)
    cos, sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def lloyd_levels(z: np.ndarray, bits: int, iterations: int = 20) -> np.ndarray:
    levels = np.quantile(z, (np.arange(2**bits) + 0.5) / 2**bits)
    for _ in range(iterations):
        index = np.searchsorted((levels[1:] + levels[:-1]) / 2, z)
        sums = np.bincount(index, weights=z, minlength=levels.size)
        counts = np.bincount(index, minlength=levels.size)
        levels = np.where(counts > 0, sums / np.maximum(counts, 1), levels)
    return levels


def quantize_groups(x: np.ndarray, bits: int, lloyd: bool, outliers: float) -> np.ndarray:
    """Quantize-dequantize groups along the last axis."""
    mask = None
    if outliers > 0:
        median = np.median(x, -1, keepdims=True)
        deviation = np.abs(x - median)
        threshold = np.quantile(deviation, 1 - outliers, axis=-1, keepdims=True)
        mask = deviation > threshold
        dense = np.clip(x, median - threshold, median + threshold)
    else:
        dense = x
    if lloyd:
        mean = dense.mean(-1, keepdims=True)
        amp = np.abs(dense - mean).max(-1, keepdims=True) + 1e-12
        z = (dense - mean) / amp
        levels = lloyd_levels(z.ravel()[::7], bits)
        out = mean + levels[np.searchsorted((levels[1:] + levels[:-1]) / 2, z)] * amp
    else:
        lo, hi = dense.min(-1, keepdims=True), dense.max(-1, keepdims=True)
        step = np.maximum((hi - lo) / (2**bits - 1), 1e-12)
        out = lo + np.round((dense - lo) / step) * step
    return out if mask is None else np.where(mask, x, out)


def simulate_layer(keys, values, positions, inv_freq, row) -> tuple[np.ndarray, np.ndarray, float]:
    """Quantized-dequantized float32 keys and values of one layer, and bits per value."""
    b, h, t, d = keys.shape
    tv = max(t - RESIDUAL, 0)
    tk = (tv // GROUP) * GROUP
    out_k, out_v = keys.astype(np.float64), values.astype(np.float64)
    k = out_k[:, :, :tk]
    if row.get("prerope"):
        k = rope(k, positions[:, :, :tk], inv_freq, -1.0)
    # keys per channel: put each group's 128 tokens on the last axis
    groups = k.reshape(b, h, tk // GROUP, GROUP, d).swapaxes(3, 4)
    k = quantize_groups(groups, row["k_bits"], row.get("lloyd", False), row.get("outliers", 0.0)).swapaxes(3, 4).reshape(b, h, tk, d)
    if row.get("prerope"):
        k = rope(k, positions[:, :, :tk], inv_freq, 1.0)
    out_k[:, :, :tk] = k
    out_v[:, :, :tv] = quantize_groups(out_v[:, :, :tv], row["v_bits"], row.get("lloyd", False), row.get("outliers", 0.0))
    f = row.get("outliers", 0.0)
    bits = (
        tk * d * (row["k_bits"] + 32 * f) + (tk // GROUP) * d * 32 + (t - tk) * d * 16
        + tv * d * (row["v_bits"] + 32 * f) + tv * 32 + (t - tv) * d * 16
    )  # fmt: skip
    return out_k.astype(np.float32), out_v.astype(np.float32), bits / (2 * t * d)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--text", default=str(TEXT))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "stage_ablation.json"))
    args = parser.parse_args()

    import torch

    from tensorwire.kv.quality import EvalSettings, Evaluator
    from tensorwire.kv.stage import KVCacheData, KVLayer
    from tensorwire.models import load_smollm2
    from tensorwire.sysinfo import machine_info

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, tokenizer = load_smollm2()
    config = model.config
    theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    evaluator = Evaluator(model, tokenizer, EvalSettings(args.text, windows=args.windows, needles=0))
    windows = evaluator.windows()
    base = math.exp(float(np.mean(np.concatenate([w.base_nll for w in windows]))))
    rows = []
    for name, row in ROWS.items():
        began = time.perf_counter()
        nll, bits = [], []
        for w in windows:
            layers = []
            for layer in w.cache.layers:
                k, v, b = simulate_layer(layer.keys, layer.values, layer.positions, inv_freq, row)
                layers.append(KVLayer(k, v, layer.positions))
                bits.append(b)
            nll.append(evaluator._continuation_nll(KVCacheData(layers, w.cache.seq_len, w.cache.dtype), w.continuation))
        ppl = math.exp(float(np.mean(np.concatenate(nll))))
        result = {"name": name, **row, "bits_per_value": float(np.mean(bits)), "ratio": 16 / float(np.mean(bits)),
                  "ppl": ppl, "ppl_base": base, "ppl_increase": ppl / base - 1}  # fmt: skip
        rows.append(result)
        print(f"{name:40s} {result['ratio']:5.2f}x  ppl {100 * result['ppl_increase']:+6.2f}%  ({time.perf_counter() - began:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": machine_info(), "windows": args.windows, "context": 2048, "group": GROUP, "residual": RESIDUAL, "rows": rows,
    }, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
