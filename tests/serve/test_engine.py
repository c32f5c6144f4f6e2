"""The worker's model side on the real SmolLM2: split prefill + generation = plain generation."""

from __future__ import annotations

import pytest

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
