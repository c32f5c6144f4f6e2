"""Codec kernels alone: chunk streams encoded and decoded in place, 1 and 2 threads, interleaved.

This is the path `load_file` and the container take (decode into the destination tensor's
memory, parse + kernel, no allocation), as opposed to `run.py`, which times the public frame
API including its output allocation. Real weights: all-MiniLM-L6-v2 cast to each dtype, cut
into 4 MiB chunks as the container does.

    .venv/bin/python benchmarks/weights/kernels.py [--repeats 15] [--json results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from tensorwire.codec import chunks, cpu
from tensorwire.codec.frame import DEFAULT_CHUNK_BYTES, values_per_chunk
from tensorwire.codec.planes import LAYOUTS
from tensorwire.models import minilm_folder

HERE = Path(__file__).parent
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def weights(dtype: str) -> np.ndarray:
    tensors = load_file(minilm_folder() / "model.safetensors").values()
    carrier = {2: torch.int16, 4: torch.int32}[torch.empty(0, dtype=TORCH[dtype]).element_size()]
    flat = [t.to(TORCH[dtype]).contiguous().view(carrier).numpy().ravel() for t in tensors if t.is_floating_point()]
    return np.concatenate(flat).view(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--levels", nargs="+", default=["fast", "max"])
    parser.add_argument("--dtypes", nargs="+", default=["BF16"])
    parser.add_argument("--json", default=str(HERE / "results" / "kernels.json"))
    args = parser.parse_args()
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "load_start": os.getloadavg()[0]}, "repeats": args.repeats, "runs": []}  # fmt: skip
    print(f"{'dtype':6} {'level':5} {'ratio':>7} {'enc 1t':>8} {'enc 2t':>8} {'dec 1t':>8} {'dec 2t':>8} {'dec 2t/1t':>9}   GB/s, best of {args.repeats} (median)")
    for dtype in args.dtypes:
        data = weights(dtype)
        step = values_per_chunk(LAYOUTS[dtype].bits // 8, DEFAULT_CHUNK_BYTES) * (LAYOUTS[dtype].bits // 8)
        pieces = [data[i : i + step] for i in range(0, data.size, step)]
        out = np.empty_like(data)
        for level in args.levels:
            streams = [chunks.encode_chunk(p, dtype, level) for p in pieces]  # warm-up (compiles)
            times = {("enc", t): [] for t in (1, 2)} | {("dec", t): [] for t in (1, 2)}
            for _ in range(args.repeats):
                for threads in (1, 2):  # interleaved
                    cpu.set_threads(threads)
                    start = time.perf_counter()
                    streams = [chunks.encode_chunk(p, dtype, level) for p in pieces]
                    times["enc", threads].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    at = 0
                    for p, s in zip(pieces, streams):
                        chunks.decode_chunk(s, dtype, p.size * 8 // LAYOUTS[dtype].bits, out[at : at + p.size])
                        at += p.size
                    times["dec", threads].append(time.perf_counter() - start)
            if out.tobytes() != data.tobytes():
                raise SystemExit(f"{dtype} {level}: round trip is not bit-exact")
            ratio = data.size / sum(s.size for s in streams)
            best = {k: data.size / min(v) / 1e9 for k, v in times.items()}
            med = {k: data.size / float(np.median(v)) / 1e9 for k, v in times.items()}
            print(f"{dtype:6} {level:5} {ratio:7.4f} " + " ".join(f"{best[k]:4.2f}({med[k]:4.2f})" for k in
                  [("enc", 1), ("enc", 2), ("dec", 1), ("dec", 2)]) + f" {best['dec', 2] / best['dec', 1]:9.2f}")  # fmt: skip
            results["runs"].append({"dtype": dtype, "level": level, "bytes": int(data.size), "ratio": ratio,
                                    "seconds": {f"{op}_{t}t": v for (op, t), v in times.items()}})  # fmt: skip
    results["machine"]["load_end"] = os.getloadavg()[0]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
