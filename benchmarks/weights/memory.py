"""Peak memory of `tensorwire compress` / `decompress` on a multi-GiB real-weight checkpoint.

Builds a .safetensors checkpoint of the requested size from the real all-MiniLM-L6-v2
tensors (cast to bf16) repeated under distinct names, written streaming so the builder
never holds it whole. Then runs `tensorwire compress` and `tensorwire decompress` in
child processes, each reporting its own peak RSS (VmHWM) when it exits. Target: peak RSS
<= 3 x largest tensor + 256 MiB, whatever the checkpoint size.

    .venv/bin/python benchmarks/weights/memory.py --gib 4 [--workdir /tmp/twz-mem]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tensorwire.models import minilm_folder
from tensorwire.integrations.verify import sha256_file

HERE = Path(__file__).parent


def build_checkpoint(path: Path, target_bytes: int) -> tuple[int, int]:
    """Write a bf16 safetensors file of about ``target_bytes``; return (bytes, largest tensor)."""
    real = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(minilm_folder() / "model.safetensors").items() if v.is_floating_point()}
    per_copy = sum(t.numel() * 2 for t in real.values())
    copies = max(1, target_bytes // per_copy)
    header, at = {"__metadata__": {"format": "pt", "built_by": "benchmarks/weights/memory.py"}}, 0
    for c in range(copies):
        for name, t in real.items():
            header[f"copy{c}.{name}"] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [at, at + t.numel() * 2]}
            at += t.numel() * 2
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(copies):
            for t in real.values():
                f.write(t.view(torch.int16).numpy().tobytes())
    return path.stat().st_size, max(t.numel() * 2 for t in real.values())


# The child reports its own VmHWM at exit: getrusage/wait4 would also count the pages of this
# (large) parent that the child held between fork and exec.
PEAK_REPORTER = """
import atexit, runpy, sys
peak_path = sys.argv.pop(1)
def report():
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    with open(peak_path, "w") as out:
        out.write(str(peak * 1024))
atexit.register(report)
runpy.run_module("tensorwire.cli", run_name="__main__")
"""


def run_cli(args: list[str], peak_file: Path) -> tuple[float, int]:
    """Run ``tensorwire ARGS`` in a child; return (seconds, the child's peak RSS in bytes)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", PEAK_REPORTER, str(peak_file), *args], check=True)
    return time.perf_counter() - start, int(peak_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0, help="checkpoint size in GiB (default 4)")
    parser.add_argument("--workdir", default="/tmp/tensorwire-memory")
    parser.add_argument("--json", default=str(HERE / "results" / "memory.json"))
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, twz, back = work / "big.safetensors", work / "big.twz", work / "big.restored.safetensors"
    size, largest = build_checkpoint(src, int(args.gib * (1 << 30)))
    cli = [sys.executable, "-m", "tensorwire.cli"]
    peak = work / "peak.txt"
    # Warm the numba cache on a small real file so that compile memory is not measured.
    shutil.copy(minilm_folder() / "model.safetensors", work / "warm.safetensors")
    subprocess.run(cli + ["compress", str(work / "warm.safetensors"), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(cli + ["decompress", str(work / "warm.twz"), str(work / "warm2.safetensors"), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    c_s, c_rss = run_cli(["compress", str(src), str(twz), "--quiet"], peak)
    d_s, d_rss = run_cli(["decompress", str(twz), str(back), "--quiet"], peak)
    identical = sha256_file(src) == sha256_file(back)
    bound = 3 * largest + (256 << 20)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "checkpoint_bytes": size, "largest_tensor_bytes": largest, "bound_bytes": bound,
        "compress": {"seconds": c_s, "peak_rss_bytes": c_rss, "GBps": size / c_s / 1e9},
        "decompress": {"seconds": d_s, "peak_rss_bytes": d_rss, "GBps": size / d_s / 1e9},
        "compressed_bytes": twz.stat().st_size, "ratio": size / twz.stat().st_size, "byte_identical": identical,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    mib = 1 << 20
    print(f"checkpoint {size / (1 << 30):.2f} GiB (largest tensor {largest / mib:.1f} MiB), ratio {result['ratio']:.4f}, "
          f"byte-identical round trip: {identical}")  # fmt: skip
    for op in ("compress", "decompress"):
        r = result[op]
        ok = "meets" if r["peak_rss_bytes"] <= bound else "MISSES"
        print(f"{op:>10}: peak RSS {r['peak_rss_bytes'] / mib:7.1f} MiB ({ok} the bound {bound / mib:.1f} MiB), "
              f"{r['seconds']:.1f} s, {r['GBps']:.2f} GB/s including disk I/O")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
