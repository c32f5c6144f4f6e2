"""Seconds per Evaluator.evaluate on the library's settings (context 2048, 4 windows, 10 needles in the prompt).

Run it with two checkouts to compare builds on the same machine, one after the other:

    PYTHONPATH=/path/to/older/src .venv/bin/python benchmarks/kv/evaluator_speed.py old.json
    .venv/bin/python benchmarks/kv/evaluator_speed.py new.json

Each pipeline is evaluated twice after the baselines are prefilled (one torch thread); the
quality numbers are printed too, so that a faster evaluator can be seen to measure the same.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

TEXT = Path(os.environ.get("TENSORWIRE_TEXT", Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-raw-test.txt"))
PIPELINES = {
    "kivi4+ans": [{"id": "kivi", "k_bits": 4, "v_bits": 4, "group_size": 64, "residual": 32}, {"id": "ans"}],
    "kivi6/4 raw": [{"id": "kivi", "k_bits": 6, "v_bits": 4, "residual": 32}],
    "kivi2": [{"id": "kivi", "k_bits": 2, "v_bits": 2}],
    "snapkv0.3+kivi4": [{"id": "snapkv", "keep_fraction": 0.3}, {"id": "kivi", "k_bits": 4, "v_bits": 4}],
}


def main(out: str) -> int:
    import torch

    import tensorwire
    from tensorwire.kv.pipeline import Pipeline
    from tensorwire.kv.quality import EvalSettings, Evaluator
    from tensorwire.models import load_smollm2

    torch.set_num_threads(1)
    model, tokenizer = load_smollm2()
    evaluator = Evaluator(model, tokenizer, EvalSettings(str(TEXT), windows=4, needles=10, question="in_prompt"))
    evaluator.windows()
    evaluator.needles()
    rows = {"tensorwire": tensorwire.__file__}
    for name, stages in PIPELINES.items():
        pipeline = Pipeline.from_config({"stages": stages})
        seconds = []
        for _ in range(2):
            began = time.perf_counter()
            result = evaluator.evaluate(pipeline)
            seconds.append(time.perf_counter() - began)
        rows[name] = {"seconds": seconds, "ratio": result.ratio, "ppl_increase": result.ppl_increase,
                      "retrieval": result.retrieval}  # fmt: skip
        print(name, rows[name], flush=True)
    Path(out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "evaluator_speed.json"))
