"""The evaluator on the real model with a short context (the full runs are benchmarks)."""

from __future__ import annotations

import json

import pytest

from tensorwire.cli import main
from tensorwire.kv import Pipeline
from tensorwire.kv.presets import resolve
from tensorwire.kv.quality import EvalSettings, EvaluationError, Evaluator


@pytest.fixture(scope="module")
def evaluator(smollm2, sample_text):
    model, tokenizer = smollm2
    return Evaluator(model, tokenizer, EvalSettings(str(sample_text), context=128, continuation=16, windows=2, needles=3))


def test_lossless_pipeline_changes_nothing(evaluator):
    r = evaluator.evaluate(Pipeline.from_config(resolve("lossless")))
    # Exact on purpose: the lossless pipeline returns the cache bit for bit and both scores come
    # from the same _continuation_nll on it (same shapes, same process), so no rounding differs.
    assert r.ppl == r.ppl_base and r.ppl_increase == 0.0
    assert r.retrieval == r.retrieval_base and r.retrieval_drop == 0.0
    assert r.retrieval_base > 0  # the uncompressed model finds planted facts in a short context
    assert r.key_error == 0.0 and r.value_error == 0.0
    assert 0.5 < r.ratio < 1.0  # the float32 cache, losslessly coded, against bf16 bytes
    assert r.encode_bps > 0 and r.decode_bps > 0 and r.windows == 2 and r.needles == 3


def test_quantized_pipeline_trades_quality_for_ratio(evaluator):
    two_bit = evaluator.evaluate(Pipeline.from_config({"stages": [{"id": "kivi", "k_bits": 2, "v_bits": 2, "group_size": 32, "residual": 32}]}))
    eight_bit = evaluator.evaluate(Pipeline.from_config({"stages": [{"id": "kivi", "k_bits": 8, "v_bits": 8, "group_size": 32, "residual": 32}]}))
    assert two_bit.ratio > eight_bit.ratio > 1.2
    assert two_bit.key_error > eight_bit.key_error > 0
    assert abs(eight_bit.ppl_increase) < abs(two_bit.ppl_increase) + 1e-9


def test_cheap_pass_uses_fewer_windows_and_cases(evaluator):
    r = evaluator.evaluate(Pipeline.from_config(resolve("bf16")), windows=1, needles=0, speed=False)
    assert r.windows == 1 and r.needles == 0 and r.retrieval is None and r.encode_bps is None


def test_codec_speed_times_without_the_model(evaluator):
    from tensorwire.codec.cpu import get_threads

    threads = get_threads()
    encode_bps, decode_bps = evaluator.codec_speed(Pipeline.from_config(resolve("kivi-4")), windows=1)
    assert encode_bps > 1e6 and decode_bps > 1e6  # bytes/s: a 128-token cache takes well under a second
    assert get_threads() == threads  # timed on one core, then the kernels get their threads back


@pytest.mark.parametrize("stages", [[{"id": "kivi", "k_bits": 2, "v_bits": 2, "group_size": 32, "residual": 0}],
                                    [{"id": "kivi", "k_bits": 3, "v_bits": 2, "group_size": 32, "residual": 0}],
                                    [{"id": "streaming_llm", "keep_fraction": 0.3}]], ids=["kivi-2", "kivi-3/2", "streaming"])
def test_needle_answers_are_the_token_by_token_greedy_answers(smollm2, sample_text, stages):
    """The one-pass answer check (teacher-forced on the uncompressed answer, then token by
    token from the first departure) decides exactly as plain greedy generation does."""
    from tensorwire.kv import hf
    from tensorwire.kv.quality import ANSWER_TOKENS

    model, tokenizer = smollm2
    evaluator = Evaluator(model, tokenizer, EvalSettings(str(sample_text), context=128, continuation=16, windows=1,
                                                         needles=6, seed=3))  # fmt: skip
    pipeline = Pipeline.from_config({"stages": stages})
    for case in evaluator.needles():
        decoded = Pipeline.decode_data(pipeline.encode(case.cache))
        greedy = hf.generate(model, hf.data_to_cache(decoded), case.question, max_new_tokens=ANSWER_TOKENS)
        assert evaluator._answer(decoded, case) == evaluator._is_answer(greedy, case)


def test_bad_settings(smollm2, tmp_path, sample_text):
    model, tokenizer = smollm2
    with pytest.raises(EvaluationError, match="does not exist"):
        Evaluator(model, tokenizer, EvalSettings(str(tmp_path / "missing.txt")))
    with pytest.raises(EvaluationError, match="tokens"):
        Evaluator(model, tokenizer, EvalSettings(str(sample_text), context=4096))
    with pytest.raises(EvaluationError):
        EvalSettings(str(sample_text), windows=0)
    with pytest.raises(EvaluationError, match="question"):
        EvalSettings(str(sample_text), question="before")


def test_question_in_prompt_is_compressed_with_the_context(smollm2, sample_text):
    model, tokenizer = smollm2
    settings = EvalSettings(str(sample_text), context=128, continuation=16, windows=1, needles=3, question="in_prompt")
    ev = Evaluator(model, tokenizer, settings)
    after = Evaluator(model, tokenizer, EvalSettings(str(sample_text), context=128, continuation=16, windows=1, needles=3))
    for inside, outside in zip(ev.needles(), after.needles()):
        assert inside.cache.seq_len == outside.cache.seq_len == 128  # the cache holds L tokens either way
        assert len(inside.question) == 1 and len(outside.question) > 1  # only the last question token is fed at decode
        assert inside.answer == outside.answer
    r = ev.evaluate(Pipeline.from_config(resolve("lossless")), speed=False)
    assert r.retrieval == r.retrieval_base > 0


def test_cli_kv_eval_writes_json(tmp_path, sample_text, smollm2):
    out = tmp_path / "eval.json"
    code = main(["kv", "eval", "--pipeline", "bf16", "--pipeline", '{"stages": [{"id": "zstd"}]}', "--text", str(sample_text),
                 "--context", "64", "--continuation", "8", "--windows", "1", "--needles", "1", "--json", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert [r["name"] for r in results][0] == "bf16" and len(results) == 2
    assert results[1]["ppl_increase"] == 0.0  # zstd on the float32 cache is lossless
