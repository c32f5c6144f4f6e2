"""NVIDIA kvpress presses as a peer in the KV benchmark, scored by tensorwire's own evaluator.

kvpress 0.5.5 pins ``transformers<5.3``, so this script runs in its own venv
(``benchmarks/kv/setup_kvpress.sh`` creates ``.venv-kvpress``) and writes rows that
``benchmarks/kv/run.py --peers`` merges into the main table:

    .venv-kvpress/bin/python benchmarks/kv/kvpress_peer.py \\
        --text ../shared/data/wikitext-2-raw-test.txt --out benchmarks/kv/results/kvpress.json

Same model (SmolLM2-135M-Instruct via ``tensorwire.models.load_smollm2``), same
:class:`~tensorwire.kv.quality.EvalSettings`, hence the same perplexity windows and
needle cases as ``run.py`` (token selection is deterministic). For each press the prefix is
prefilled inside ``with press(model):`` -- kvpress evicts during that forward pass, in its
own code -- and everything after it (the scored continuation, the question and the greedy
answer) runs with the press removed, from the original sequence's RoPE positions: the
pressed cache is shorter than the prefix, so its ``seq_len`` is set to the prefix length
(kept keys already carry their RoPE rotation, so their own positions are not needed).

The uncompressed baseline is measured in the same run, by the same evaluator without a press.
Ratio is bf16 bytes of the full cache over bf16 bytes of what the press kept.
Needle answers are generated with ``--answer-tokens`` (8) new tokens, for the baseline
and every press alike: SmolLM2 spells a number digit by digit (" 77965" is 6 tokens), so the
4 tokens ``Evaluator._answer`` allowed when this was written can never hold the answer.
Reconstruction error is not measured (kvpress keeps exact float32 entries and does not
report which positions it kept), so ``key_error``/``value_error`` are ``null``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
FAMILY = "peer (kvpress 0.5.5)"
COMPRESSION_RATIO = 0.5


def presses(compression_ratio: float) -> dict:
    """The kvpress presses compared, by row name (kvpress defaults for everything else)."""
    from kvpress import KnormPress, SnapKVPress, StreamingLLMPress

    return {
        f"kvpress SnapKV {compression_ratio:g}": SnapKVPress(compression_ratio=compression_ratio),
        f"kvpress Knorm {compression_ratio:g}": KnormPress(compression_ratio=compression_ratio),
        f"kvpress StreamingLLM {compression_ratio:g}": StreamingLLMPress(compression_ratio=compression_ratio),
    }


def evaluator_classes(answer_tokens: int):
    """``(BaselineEvaluator, PressedEvaluator)``: Evaluators answering with ``answer_tokens`` tokens.

    Built lazily (imports torch and transformers). ``PressedEvaluator`` prefills under a
    kvpress press.
    """
    import torch
    import transformers

    from tensorwire.kv import hf
    from tensorwire.kv.quality import Evaluator
    from tensorwire.kv.stage import KVCacheData

    class BaselineEvaluator(Evaluator):
        """The stock evaluator, with room for the whole numeric answer."""

        def _answer(self, data: KVCacheData, case) -> bool:
            # Same rule as Evaluator._answer (greedy, first run of digits must equal the
            # number), only with enough new tokens for a digit-by-digit 5-digit number.
            new = hf.generate(self.model, hf.data_to_cache(data), case.question, max_new_tokens=answer_tokens)
            digits = re.match(r"\d+", self.tokenizer.decode(new).strip())
            # Each case is answered once, right after its prefill, and never re-evaluated here:
            # drop its cache so that memory holds one case, not 50 (94 MB each at 2048 tokens).
            case.cache = None
            return digits is not None and digits.group(0) == case.answer

    class PressedEvaluator(BaselineEvaluator):
        """Prefill under ``press``; the cached windows and cases then hold the pressed results.

        ``Evaluator.windows()`` scores each continuation right after ``_prefill`` and
        ``needles()`` answers each case right after it: with ``_prefill`` pressed, the
        "base" NLL and "base" correctness of this evaluator are the press's measurements.
        """

        def __init__(self, model, tokenizer, settings, press):
            super().__init__(model, tokenizer, settings)
            self.press = press
            self.kept: list[int] = []  # tokens kept per prefill (layer 0; every layer keeps the same count)

        def _prefill(self, ids) -> KVCacheData:
            input_ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)).reshape(1, -1)
            cache = transformers.DynamicCache()
            # The press's forward hooks exist only inside this block: the continuation and the
            # answer generation that follow run on the unmodified model.
            with torch.inference_mode(), self.press(self.model):
                self.model(input_ids=input_ids, use_cache=True, **{hf.cache_keyword(self.model): cache})
            data = hf.cache_to_data(cache)
            kept = {layer.keys.shape[2] for layer in data.layers}
            if len(kept) != 1:
                raise RuntimeError(f"layers kept different token counts {sorted(kept)}; this script expects one count")
            self.kept.append(kept.pop())
            # cache_to_data took the kept length as seq_len; the next token's position is the
            # prefix length. Positions of the kept tokens are unknown (kvpress does not return
            # them) and unused by hf.forward, so the placeholder 0..kept-1 stays.
            return KVCacheData(data.layers, seq_len=int(input_ids.shape[1]), dtype=data.dtype)

    return BaselineEvaluator, PressedEvaluator


def measure(evaluator) -> dict:
    """Perplexity and retrieval of ``evaluator``'s own prefills (windows' and cases' "base")."""
    began = time.perf_counter()
    windows = evaluator.windows()
    cases = evaluator.needles()
    nll = np.concatenate([w.base_nll for w in windows])
    return {
        "ppl": math.exp(float(np.mean(nll))),
        "retrieval": 100.0 * sum(c.base_correct for c in cases) / len(cases) if cases else None,
        "windows": len(windows),
        "needles": len(cases),
        "seconds": time.perf_counter() - began,
    }


def machine() -> dict:
    versions = {name: importlib.metadata.version(name) for name in
                ("kvpress", "torch", "transformers", "numpy", "tensorwire")}  # fmt: skip
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "torch_threads": __import__("torch").get_num_threads(),
        "versions": versions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="UTF-8 text (WikiText-2 raw test)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--needles", type=int, default=50)
    parser.add_argument("--compression-ratio", type=float, default=COMPRESSION_RATIO,
                        help="kvpress compression_ratio: fraction of the prefix's KV pairs evicted")  # fmt: skip
    parser.add_argument("--answer-tokens", type=int, default=8,
                        help="new tokens generated for a needle answer (a 5-digit number is 6 SmolLM2 tokens)")  # fmt: skip
    parser.add_argument("--out", default=str(HERE / "results" / "kvpress.json"))
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    from tensorwire.kv.quality import EvalSettings
    from tensorwire.models import load_smollm2

    baseline_evaluator, pressed_evaluator = evaluator_classes(args.answer_tokens)
    model, tokenizer = load_smollm2()
    settings = EvalSettings(args.text, args.context, args.continuation, args.windows, args.needles)
    config = vars(settings) | {"model": "SmolLM2-135M-Instruct", "compression_ratio": args.compression_ratio,
                               "answer_tokens": args.answer_tokens}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Each evaluator takes tens of minutes on a busy 2-core machine: progress is saved after
    # each one and a rerun with the same settings resumes from it.
    checkpoint = out.with_suffix(out.suffix + ".tmp")
    done = json.loads(checkpoint.read_text()) if checkpoint.exists() else {}
    if done.get("settings") != config:
        done = {"settings": config, "rows": []}
    elif done.get("baseline"):
        print(f"resuming from {checkpoint}: baseline and {len(done['rows'])} presses done", file=sys.stderr)

    def save() -> None:
        checkpoint.write_text(json.dumps(done, indent=2, allow_nan=False))

    if not done.get("baseline"):
        base_ev = baseline_evaluator(model, tokenizer, settings)
        done["baseline"] = measure(base_ev) | {"text": base_ev.text_id}
        del base_ev
        save()
    base = done["baseline"]
    text_id = base["text"]
    print(f"baseline: ppl {base['ppl']:.4f} retrieval {base['retrieval']} ({base['seconds']:.0f} s)", file=sys.stderr)

    rows = done["rows"]
    for name, press in presses(args.compression_ratio).items():
        if any(row["name"] == name for row in rows):
            continue
        ev = pressed_evaluator(model, tokenizer, settings, press)
        got = measure(ev)
        kept = float(np.mean(ev.kept))
        # Every window and case has `context` tokens; full and kept caches have the same
        # dtype, layers, heads and head_dim, so the bf16 byte ratio is a token ratio.
        ratio = args.context / kept
        row = {
            "name": name,
            "family": FAMILY,
            "ratio": ratio,
            "ppl_base": base["ppl"],
            "ppl": got["ppl"],
            "ppl_increase": got["ppl"] / base["ppl"] - 1.0,
            "retrieval_base": base["retrieval"],
            "retrieval": got["retrieval"],
            "retrieval_drop": None if got["retrieval"] is None else base["retrieval"] - got["retrieval"],
            "key_error": None,  # not measured: kvpress keeps exact entries and does not say which
            "value_error": None,
            "windows": got["windows"],
            "needles": got["needles"],
            "seconds": got["seconds"],
            "pipeline": {"kvpress": type(press).__name__, **vars(press)},
            "extra": {"kept_tokens_mean": kept, "kept_tokens_min": int(min(ev.kept)), "kept_tokens_max": int(max(ev.kept)),
                      "context": args.context, "continuation": args.continuation, "text": text_id},
        }  # fmt: skip
        del ev
        rows.append(row)
        save()
        print(f"  {name}: ratio {ratio:.2f} ppl {got['ppl']:.4f} ({row['ppl_increase'] * 100:+.2f}%) "
              f"retrieval {got['retrieval']} ({got['seconds']:.0f} s)", file=sys.stderr)  # fmt: skip

    result = {
        "machine": machine(),
        "settings": config,
        "data": {"text": args.text, "text_sha256_16": text_id},
        "baseline": base,
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2, allow_nan=False))
    checkpoint.unlink()
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| method | ratio | ppl (base) | ppl increase | retrieval (base) |", "|---|---|---|---|---|"]
    for r in rows:
        ret = "-" if r["retrieval"] is None else f"{r['retrieval']:.0f}% ({r['retrieval_base']:.0f}%)"
        lines.append(f"| {r['name']} | {r['ratio']:.2f} | {r['ppl']:.3f} ({r['ppl_base']:.3f}) | "
                     f"{100 * r['ppl_increase']:+.2f}% | {ret} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
