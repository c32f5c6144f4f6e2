"""The worker's model side on the real SmolLM2: split prefill + generation = plain generation."""

from __future__ import annotations

import numpy as np
import pytest

from tensorwire.data import SAMPLE_TEXT
from tensorwire.errors import EvaluationError
from tensorwire.kv import Pipeline
from tensorwire.serve.engine import Engine, SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(smollm2) -> Engine:
    return Engine(*smollm2)


def test_split_generation_equals_transformers_greedy(engine):
    torch = pytest.importorskip("torch")
    ids = engine.tokenizer(PROMPT).input_ids
    ours = list(engine.generate(engine.prefill(ids), ids[-1], SamplingParams(max_tokens=8, temperature=0)))
    with torch.inference_mode():
        theirs = engine.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs[: len(ours)] and len(ours) >= 1
    assert "Paris" in engine.tokenizer.decode(ours)


def test_a_lossless_payload_continues_identically(engine):
    ids = engine.tokenizer(PROMPT + " a city of").input_ids
    data = engine.prefill(ids, observe_window=8)
    received = Pipeline.decode_data(Pipeline().encode(data), expect=engine.expect)
    sampling = SamplingParams(max_tokens=6, temperature=0)
    assert list(engine.generate(received, ids[-1], sampling)) == list(engine.generate(data, ids[-1], sampling))


def test_seeded_sampling_repeats_and_stops_at_stop_tokens(engine):
    ids = engine.tokenizer(PROMPT).input_ids
    data = engine.prefill(ids)
    hot = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    first = list(engine.generate(data, ids[-1], hot))
    assert first == list(engine.generate(data, ids[-1], hot))
    assert len(first) == 10 or first[-1] == engine.eos_token_id
    assert len(first) >= 3, "the seeded sample ended too early to test stop tokens; pick another seed"
    stop = first[2]
    stopped = list(engine.generate(data, ids[-1], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7,
                                                           stop_token_ids=(stop,))))  # fmt: skip
    assert stopped == first[: first.index(stop) + 1]


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"max_tokens": True}, {"temperature": -1.0},
                                 {"temperature": float("nan")}, {"top_p": -0.1}, {"top_p": 1.5}, {"seed": 1.5}])  # fmt: skip
def test_bad_sampling_settings_are_named_errors(bad):
    with pytest.raises(EvaluationError):
        SamplingParams(**{"max_tokens": 4, **bad})


def test_a_one_token_prompt_has_an_empty_cache(engine):
    data = engine.prefill([1])
    assert data.layers == [] and data.seq_len == 0
    assert len(list(engine.generate(data, 1, SamplingParams(max_tokens=3, temperature=0)))) >= 1
    with pytest.raises(EvaluationError, match="at least one token"):
        engine.prefill([])


def test_a_prefix_of_delivered_tokens_is_continued_not_repeated(engine):
    ids = engine.tokenizer(PROMPT).input_ids
    data = engine.prefill(ids)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    whole = list(engine.generate(data, ids[-1], greedy))
    assert list(engine.generate(data, ids[-1], greedy, prefix=whole[:3])) == whole[3:]
    assert list(engine.generate(data, ids[-1], greedy, prefix=whole)) == []


def test_a_tiny_temperature_is_greedy():
    assert SamplingParams(max_tokens=1, temperature=1e-30).greedy
    assert not SamplingParams(max_tokens=1, temperature=0.01).greedy


def test_prefill_after_a_stored_prefix_continues_at_the_right_positions(engine):
    """A pool hit: the first blocks come from storage, only the rest runs; same cache, same answer."""
    from tensorwire.serve.pool.store import block_of, concat

    ids = engine.tokenizer(SAMPLE_TEXT.read_text()).input_ids[:400]
    full = engine.prefill(ids)
    prefix = concat([block_of(full, i, 128) for i in range(2)])
    part = engine.prefill(ids, prefix=prefix)
    assert part.seq_len == full.seq_len == len(ids) - 1
    for got, want in zip(part.layers, full.layers):
        np.testing.assert_array_equal(got.positions, want.positions)
        np.testing.assert_allclose(got.keys, want.keys, atol=1e-4)  # float32 matmuls of another shape may round apart
        np.testing.assert_allclose(got.values, want.values, atol=1e-4)
    sampling = SamplingParams(max_tokens=8, temperature=0)
    assert list(engine.generate(part, ids[-1], sampling)) == list(engine.generate(full, ids[-1], sampling))
    whole = concat([block_of(full, 0, len(ids) - 1)])
    assert engine.prefill(ids, prefix=whole) is whole  # nothing left to run
    with pytest.raises(EvaluationError, match="longer than"):
        engine.prefill(ids[:100], prefix=prefix)


def test_a_compressed_model_folder_serves_the_same_tokens(smollm2, tmp_path):
    """Engine.load on a .twz folder (decoded while read) and on the safetensors folder it came from."""
    torch = pytest.importorskip("torch")
    from tensorwire.integrations.safetensors import compress_folder

    model, tokenizer = smollm2
    raw = tmp_path / "raw"
    # bf16, what serving usually ships; the session's fp32 model itself stays untouched
    model.save_pretrained(raw, state_dict={k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    tokenizer.save_pretrained(raw)
    compress_folder(raw, tmp_path / "twz", level="fast")
    assert not list((tmp_path / "twz").glob("*.safetensors"))
    ids = tokenizer(PROMPT).input_ids
    greedy = SamplingParams(max_tokens=6, temperature=0)
    answers = []
    for folder in (raw, tmp_path / "twz"):
        engine = Engine.load(folder)
        assert next(engine.model.parameters()).dtype == torch.float32
        answers.append(list(engine.generate(engine.prefill(ids), ids[-1], greedy)))
    assert answers[0] == answers[1] and len(answers[0]) >= 1
