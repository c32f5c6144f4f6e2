"""Incremental detokenization and stop strings (tensorwire.serve.http.text)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tensorwire.serve.http.text import TextAssembler

from .conftest import CharTokenizer


class ByteTokenizer:
    """One token per UTF-8 byte: a character may be split over tokens (decodes to U+FFFD)."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages):  # pragma: no cover - not used here
        raise NotImplementedError


def run(asm: TextAssembler, ids, step: int = 1) -> str:
    out = []
    for i in range(0, len(ids), step):
        out.append(asm.feed(ids[i : i + step]))
        if asm.stopped:
            break
    else:
        out.append(asm.flush())
    return "".join(out)


def reference(text: str, stops) -> str:
    """Generation stops at the first character that completes a stop string (as servers do:
    a longer stop string that would have started earlier never completes); the text ends
    where that stop string starts."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if s and text[:end].endswith(s)]
        if starts:
            return text[: min(starts)]
    return text


TEXT = st.text(alphabet="ab cé🎉", max_size=40)
STOPS = st.lists(st.text(alphabet="ab cé🎉", min_size=1, max_size=4), max_size=4)


@given(TEXT, STOPS, st.integers(1, 5))
def test_deltas_add_up_to_the_text_cut_at_the_first_stop(text, stops, step):
    for tokenizer in (CharTokenizer(), ByteTokenizer()):
        asm = TextAssembler(tokenizer, stops)
        out = run(asm, tokenizer.encode(text), step)
        assert out == asm.output and text.startswith(out)
        assert not any(s in out for s in stops)  # no stop string is ever sent, not even in part of a chunk
        assert asm.stopped == any(s in text for s in stops)
        if asm.stopped:
            assert any(text.startswith(s, len(out)) for s in stops)  # cut where a stop string starts
        else:
            assert out == text
        if step == 1:  # token by token: exactly where a server stops
            assert out == reference(text, stops)


def test_split_characters_are_held_back_until_complete():
    asm = TextAssembler(ByteTokenizer())
    ids = list("é🎉".encode())
    assert asm.feed(ids[:1]) == ""
    assert asm.feed(ids[1:2]) == "é"
    assert [asm.feed([i]) for i in ids[2:]] == ["", "", "", "🎉"]
    assert asm.flush() == ""


def test_a_stop_split_over_tokens_is_never_partly_sent():
    asm = TextAssembler(CharTokenizer(), ["STOP"])
    sent = [asm.feed([ord(c)]) for c in "abSTO"]
    assert "".join(sent) == "ab" and not asm.stopped
    assert asm.feed([ord("P")]) == "" and asm.stopped and asm.output == "ab"
    assert asm.feed([ord("x")]) == "" and asm.flush() == ""


def test_held_back_text_comes_out_at_the_end():
    asm = TextAssembler(CharTokenizer(), ["xyz"])
    assert "".join(asm.feed([ord(c)]) for c in "abxy") == "ab"
    assert asm.flush() == "xy" and asm.output == "abxy" and asm.n_tokens == 4


def test_real_tokenizer_spacing_is_kept(smollm2):
    from tensorwire.serve.http.backend import HFTokenizer

    tokenizer = HFTokenizer(smollm2[1])
    text = "Hello, world! Ça va? 🎉 The stone bridge has   three arches."
    ids = tokenizer.encode(text)
    assert run(TextAssembler(tokenizer), ids) == tokenizer.decode(ids)
    assert run(TextAssembler(tokenizer, ["bridge"]), ids) == tokenizer.decode(ids).split("bridge")[0]
