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
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))  # run from a checkout without installing

from tensorwire.benchmarking import weights  # noqa: E402
from tensorwire.models import smollm2_folder  # noqa: E402

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="safetensors files (default: the real MiniLM weights)")
    p.add_argument("--smollm2", action="store_true", help="benchmark SmolLM2-135M cast to BF16 instead (exports it once)")
    p.add_argument("--dtypes", nargs="+", default=None, help="default BF16 F16 F32 (BF16 with --smollm2)")
    p.add_argument("--via", default="F32", help="cast the weights to this dtype first (BF16: F32/F16 rows of an upcast checkpoint)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--codecs", nargs="+", default=None, help=f"subset of {[*weights.CODECS, *weights.BOUNDS]}")
    p.add_argument("--json", type=Path, default=None, help="default results/latest.json (results/smollm2.json)")
    p.add_argument("--png", type=Path, default=None, help="default results/latest.png (results/smollm2.png)")
    args = p.parse_args(argv)

    stem = "smollm2" if args.smollm2 else "latest"
    paths = [str(smollm2_folder() / "model.safetensors")] if args.smollm2 else (args.files or [str(weights.default_weights_path())])
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
        via=args.via,
        progress=lambda message: print(f"[{time.time() - start:6.0f}s] {message}", file=sys.stderr, flush=True),
    )
    print(weights.format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
