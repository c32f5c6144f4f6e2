"""The HTTP layer (tensorwire.serve.http.app) with the official openai client against a
uvicorn server, over a fake backend: shapes, streaming, errors, metrics, health."""

from __future__ import annotations

import json
import logging
import math
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tensorwire.serve.http import BackgroundServer, ServerDefaults, create_app

from .conftest import MODEL, REPLY, FakeBackend, make_client

pytestmark = pytest.mark.timeout(120)


def good_completion(client, **kwargs):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, **kwargs)
    assert out.choices[0].text == REPLY[:5]
    return out


# -- completions and chat ----------------------------------------------------------------------------
def test_completion_shape_usage_decision_and_header(client, fake_server):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hello there", max_tokens=12)
    out = raw.parse()
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert isinstance(out.created, int) and abs(out.created - time.time()) < 60
    assert out.choices[0].text == REPLY[:12] and out.choices[0].finish_reason == "length" and out.choices[0].index == 0
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 12, 23)
    tw = out.model_extra["tensorwire"]
    decision = tw["decision"]
    assert decision["choice"] == tw["profile"] and tw["reason"] == decision["reason"] and tw["reason"]
    assert decision["candidates"] and decision["policy"] == "controller"
    assert tw["kv_bytes_raw"] > 0 and 0 < tw["kv_bytes_sent"] <= tw["kv_bytes_raw"]
    assert tw["ttft_s"] > 0 and tw["jct_s"] >= tw["ttft_s"] and tw["tpot_s"] >= 0
    assert tw["timings"]["prefill_s"] == 0.001 and tw["timings"]["decode_s"] == 0.01
    assert tw["request"] == {"compression": "auto", "slo_ms": None, "max_ppl_increase": None, "max_retrieval_drop": None,
                             "workload": "default", "pool_fetch": "auto", "pool_store": "auto"}  # fmt: skip  (infinite: null)
    assert raw.headers["x-tensorwire-profile"] == tw["profile"]
    assert raw.headers["x-tensorwire-reason"] == tw["reason_class"]
    assert raw.headers["x-request-id"] == out.id


def test_chat_completion(client, fake_backend):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], max_tokens=9)
    out = raw.parse()
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    message = out.choices[0].message
    assert message.role == "assistant" and message.content == REPLY[:9]
    prompt = "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"  # the tokenizer's chat template was applied
    assert fake_backend.requests[-1].prompt_token_ids == tuple(map(ord, prompt))
    assert out.usage.prompt_tokens == len(prompt)
    assert out.model_extra["tensorwire"]["decision"]["choice"] == raw.headers["x-tensorwire-profile"]


def test_chat_text_parts_developer_role_and_max_completion_tokens(client, fake_backend):
    out = client.chat.completions.create(
        model=MODEL, max_completion_tokens=4,
        messages=[{"role": "developer", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                     {"type": "text", "text": "b"}]}])  # fmt: skip
    assert out.choices[0].message.content == REPLY[:4]
    assert fake_backend.requests[-1].prompt_token_ids == tuple(map(ord, "<|system|>x\n<|user|>ab\n<|assistant|>"))


def test_prompt_as_token_ids(client, fake_backend):
    out = client.completions.create(model=MODEL, prompt=[72, 105], max_tokens=3)
    assert out.choices[0].text == REPLY[:3] and out.usage.prompt_tokens == 2
    assert fake_backend.requests[-1].prompt_token_ids == (72, 105)
    client.completions.create(model=MODEL, prompt=["Hi"], max_tokens=1)
    assert fake_backend.requests[-1].prompt_token_ids == (72, 105)


def test_default_max_tokens_and_sampling_fields_reach_the_backend(client, fake_backend):
    out = client.completions.create(model=MODEL, prompt="x")
    assert out.usage.completion_tokens == 16  # OpenAI's default for completions
    client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0.5, top_p=0.9, seed=7)
    sampling = fake_backend.requests[-1].sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed) == (2, 0.5, 0.9, 7)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 400}])
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == 512  # capped by the context


def test_tensorwire_options_reach_the_backend_and_are_echoed(client, fake_backend):
    name = fake_backend.profiles[0]
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, extra_body={"tensorwire": {
        "slo_ms": 20, "max_ppl_increase": 0.02, "max_retrieval_drop": 1.5, "compression": name, "workload": "rag",
        "pool_fetch": "never", "pool_store": "raw"}})  # fmt: skip
    kv = fake_backend.requests[-1].kv
    assert (kv.compression, kv.slo_s, kv.max_ppl_increase, kv.max_retrieval_drop, kv.workload) == (name, 0.02, 0.02, 1.5, "rag")
    assert (kv.pool_fetch, kv.pool_store) == ("never", "raw")
    assert out.model_extra["tensorwire"]["request"] == {"compression": name, "slo_ms": 20.0, "max_ppl_increase": 0.02,
                                                        "max_retrieval_drop": 1.5, "workload": "rag",
                                                        "pool_fetch": "never", "pool_store": "raw"}  # fmt: skip


def test_the_api_key_names_the_tenant_never_itself(client, fake_server, fake_backend):
    from tensorwire.serve.auth import tenant_tag

    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)  # the client sends "Bearer test-key"
    assert fake_backend.requests[-1].tenant == tenant_tag("test-key") != "test-key"
    assert tenant_tag("other-key") != tenant_tag("test-key")
    httpx.post(fake_server.url + "/v1/completions", json=completion(), timeout=10)  # no Authorization header
    assert fake_backend.requests[-1].tenant == "anonymous"


def test_server_defaults_apply():
    backend = FakeBackend()
    defaults = ServerDefaults(completion_max_tokens=3, slo_ms=50, max_ppl_increase=0.01, compression="raw", temperature=0.0)
    with BackgroundServer(create_app(backend, model_name=MODEL, max_context=64, defaults=defaults)) as server:
        out = make_client(server.url).completions.create(model=MODEL, prompt="Hi")
    assert out.usage.completion_tokens == 3
    request = backend.requests[-1]
    assert (request.kv.compression, request.kv.slo_s, request.kv.max_ppl_increase) == ("raw", 0.05, 0.01)
    assert request.kv.max_retrieval_drop == math.inf and request.sampling.temperature == 0.0
    with pytest.raises(ValueError, match="slo_ms"):
        ServerDefaults(slo_ms=-1)
    with pytest.raises(ValueError, match="max_context"):
        create_app(backend, model_name=MODEL, max_context=0)


def test_stop_strings(client):
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=40, stop=["fox", "zzz"])
    assert out.choices[0].text == "The quick brown " and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len("The quick brown fox")
    streamed = client.completions.create(model=MODEL, prompt="x", max_tokens=40, stop="brown f", stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "The quick "
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=40, stop="absent").choices[0].text == REPLY[:40]


def test_eos_ends_with_stop(client):
    out = client.completions.create(model=MODEL, prompt="[eos]", max_tokens=40)
    assert out.choices[0].text == REPLY[:5] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 6  # the EOS token counts, its text is empty


# -- streaming --------------------------------------------------------------------------------------------
def test_completion_stream_assembles_to_the_unstreamed_text(client):
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=30, temperature=0)
    with client.completions.with_streaming_response.create(model=MODEL, prompt="Hello", max_tokens=30, temperature=0,
                                                           stream=True) as response:  # fmt: skip
        profile = response.headers["x-tensorwire-profile"]
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(response.parse())
    text = "".join(c.choices[0].text for c in chunks)
    assert text == whole.choices[0].text and len(chunks) >= 30
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    tw = last.model_extra["tensorwire"]
    assert tw["profile"] == profile and tw["decision"]["reason"] and tw["ttft_s"] > 0
    assert all("tensorwire" not in (c.model_extra or {}) for c in chunks[:-1])


def test_chat_stream_with_usage(client):
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 20
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage_chunk.model_extra["tensorwire"]["decision"]["choice"]


def test_raw_sse_framing(fake_server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", fake_server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    payloads = [json.loads(e[6:]) for e in events[:-2]]
    assert "".join(p["choices"][0]["text"] for p in payloads) == REPLY[:3]


# -- other routes --------------------------------------------------------------------------------------------
def test_models(client, fake_server, fake_backend):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "tensorwire"
    assert models.data[0].model_extra["max_context"] == 512
    assert sorted(models.data[0].model_extra["profiles"]) == sorted(fake_backend.profiles)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_health_and_ready(fake_server, fake_backend):
    r = httpx.get(fake_server.url + "/health", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["ready"] is True and body["model"] == MODEL
    assert body["workers"]["prefill-0"] == {"up": True}
    assert httpx.get(fake_server.url + "/ready", timeout=10).status_code == 200
    fake_backend.up = False
    try:
        r = httpx.get(fake_server.url + "/health", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "degraded" and r.json()["detail"] == "prefill-0 is down"
        assert httpx.get(fake_server.url + "/ready", timeout=10).status_code == 503
    finally:
        fake_backend.up = True


def test_failing_health_check_is_not_ready():
    backend = FakeBackend()

    async def broken():
        raise ConnectionError("workers unreachable")

    backend.health = broken
    with BackgroundServer(create_app(backend, model_name=MODEL, max_context=64)) as server:
        body = httpx.get(server.url + "/health", timeout=10).json()
        assert body["ready"] is False and "workers unreachable" in body["detail"]
        assert httpx.get(server.url + "/ready", timeout=10).status_code == 503


def test_unknown_route_and_method_use_the_error_shape(fake_server):
    r = httpx.get(fake_server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(fake_server.url + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# -- bad requests ----------------------------------------------------------------------------------------------
def completion(**fields):
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields}


def chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


C, CH = "/v1/completions", "/v1/chat/completions"
BAD = [
    # (id, path, body (bytes: sent as is), status, param, code)
    ("malformed-json", C, b'{"model": "SmolLM2-135M-Instruct", "prompt": ', 400, None, "invalid_json"),
    ("not-an-object", C, b"[1, 2]", 400, None, "invalid_json"),
    ("empty-body", C, b"", 400, None, "invalid_json"),
    ("missing-model", C, {"prompt": "Hi"}, 400, "model", "missing_required_parameter"),
    ("missing-prompt", C, {"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    ("missing-messages", CH, {"model": MODEL}, 400, "messages", "missing_required_parameter"),
    ("empty-messages", CH, chat(messages=[]), 400, "messages", "invalid_value"),
    ("bad-role", CH, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role", "invalid_value"),
    ("no-content", CH, chat(messages=[{"role": "user"}]), 400, "messages.0.content", "missing_required_parameter"),
    ("image-part", CH, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
     "messages.0.content", "unsupported_parameter"),
    ("unknown-model", C, completion(model="gpt-4"), 404, "model", "model_not_found"),
    ("unknown-model-chat", CH, chat(model="gpt-4"), 404, "model", "model_not_found"),
    ("prompt-too-long", C, completion(prompt="x" * 600), 400, "prompt", "context_length_exceeded"),
    ("chat-too-long", CH, chat(messages=[{"role": "user", "content": "x" * 600}]), 400, "messages", "context_length_exceeded"),
    ("prompt-plus-max-tokens", C, completion(prompt="x" * 500, max_tokens=20), 400, "max_tokens", "context_length_exceeded"),
    ("huge-max-tokens", C, completion(max_tokens=10**12), 400, "max_tokens", "context_length_exceeded"),
    ("zero-max-tokens", C, completion(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("negative-max-tokens", C, completion(max_tokens=-3), 400, "max_tokens", "invalid_value"),
    ("negative-max-completion-tokens", CH, chat(max_tokens=None, max_completion_tokens=-1), 400, "max_completion_tokens",
     "invalid_value"),
    ("string-max-tokens", C, completion(max_tokens="5"), 400, "max_tokens", "invalid_value"),
    ("float-max-tokens", C, completion(max_tokens=5.5), 400, "max_tokens", "invalid_value"),
    ("temperature-high", C, completion(temperature=2.5), 400, "temperature", "invalid_value"),
    ("temperature-negative", CH, chat(temperature=-0.1), 400, "temperature", "invalid_value"),
    ("temperature-nan", C, b'{"model": "SmolLM2-135M-Instruct", "prompt": "x", "temperature": NaN}', 400, "temperature",
     "invalid_value"),
    ("top-p-high", C, completion(top_p=1.5), 400, "top_p", "invalid_value"),
    ("top-p-negative", CH, chat(top_p=-1), 400, "top_p", "invalid_value"),
    ("n-2", C, completion(n=2), 400, "n", "unsupported_parameter"),
    ("n-3-chat", CH, chat(n=3), 400, "n", "unsupported_parameter"),
    ("logprobs", C, completion(logprobs=2), 400, "logprobs", "unsupported_parameter"),
    ("tools", CH, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", "unsupported_parameter"),
    ("batch-prompt", C, completion(prompt=["a", "b"]), 400, "prompt", "unsupported_parameter"),
    ("bad-prompt-type", C, completion(prompt=3), 400, "prompt", "invalid_type"),
    ("empty-prompt", C, completion(prompt=""), 400, "prompt", "invalid_value"),
    ("token-out-of-vocab", C, completion(prompt=[-1]), 400, "prompt", "invalid_value"),
    ("too-many-stops", C, completion(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    ("empty-stop", C, completion(stop=[""]), 400, "stop", "invalid_value"),
    ("stream-not-bool", C, completion(stream="yes"), 400, "stream", "invalid_value"),
    ("negative-slo", C, completion(tensorwire={"slo_ms": -5}), 400, "tensorwire.slo_ms", "invalid_value"),
    ("zero-slo", C, completion(tensorwire={"slo_ms": 0}), 400, "tensorwire.slo_ms", "invalid_value"),
    ("nan-slo", C, b'{"model": "SmolLM2-135M-Instruct", "prompt": "x", "tensorwire": {"slo_ms": NaN}}', 400,
     "tensorwire.slo_ms", "invalid_value"),
    ("infinite-budget", C, b'{"model": "SmolLM2-135M-Instruct", "prompt": "x", "tensorwire": {"max_ppl_increase": Infinity}}',
     400, "tensorwire.max_ppl_increase", "invalid_value"),
    ("negative-ppl", CH, chat(tensorwire={"max_ppl_increase": -0.1}), 400, "tensorwire.max_ppl_increase", "invalid_value"),
    ("retrieval-over-100", C, completion(tensorwire={"max_retrieval_drop": 101}), 400, "tensorwire.max_retrieval_drop",
     "invalid_value"),
    ("unknown-profile", C, completion(tensorwire={"compression": "zip-it"}), 400, "tensorwire.compression", "unknown_profile"),
    ("unknown-pool-store", C, completion(tensorwire={"pool_store": "zip-it"}), 400, "tensorwire.pool_store", "unknown_profile"),
    ("bad-pool-fetch", C, completion(tensorwire={"pool_fetch": "sometimes"}), 400, "tensorwire.pool_fetch", "invalid_value"),
    ("unknown-tensorwire-field", C, completion(tensorwire={"slo": 5}), 400, "tensorwire.slo", "unknown_parameter"),
    ("tensorwire-not-object", C, completion(tensorwire=5), 400, "tensorwire", "invalid_value"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_request_then_a_good_one(case, fake_server, client):
    _, path, body, status, param, code = case
    if isinstance(body, bytes):
        r = httpx.post(fake_server.url + path, content=body, headers={"content-type": "application/json"}, timeout=10)
    else:
        r = httpx.post(fake_server.url + path, json=body, timeout=10)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code), error
    good_completion(client)


def test_bad_requests_raise_the_openai_client_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x")
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", n=2)
    assert "n=1" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", extra_body={"tensorwire": {"compression": "nope"}})
    assert info.value.body["param"] == "tensorwire.compression"
    good_completion(client)


# -- backend failures -------------------------------------------------------------------------------------------
def test_backend_exception_is_a_500_and_the_server_survives(client, fake_server, caplog):
    caplog.set_level(logging.ERROR, logger="tensorwire.serve.http")
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            result = client.completions.create(model=MODEL, prompt="[boom]", max_tokens=3, stream=stream)
            list(result) if stream else None
        assert info.value.status_code == 500
        assert info.value.body["type"] == "server_error" and "exploded" in info.value.body["message"]
    logged = [r for r in caplog.records if r.name == "tensorwire.serve.http" and r.exc_info]
    assert len(logged) == 2 and "exploded before prefill" in str(logged[0].exc_info[1])
    good_completion(client)


def test_tokenizer_exception_is_a_500(client):
    for call in (lambda: client.completions.create(model=MODEL, prompt="[tokenizer-boom]"),
                 lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "[tokenizer-boom]"}])):  # fmt: skip
        with pytest.raises(openai.InternalServerError) as info:
            call()
        assert info.value.body["code"] == "backend_error" and "tokenizer" in info.value.message
    good_completion(client)


def test_backend_unavailable_is_a_503(client):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=MODEL, prompt="[unavailable]", max_tokens=3)
    assert info.value.status_code == 503 and info.value.body["code"] == "backend_unavailable"
    good_completion(client)


def test_backend_exception_mid_stream_is_an_error_event(client, fake_server):
    stream = client.completions.create(model=MODEL, prompt="[boom-mid]", max_tokens=10, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="exploded mid-stream"):
        for chunk in stream:
            received.append(chunk.choices[0].text)
    assert "".join(received) == REPLY[:3]
    body = {"model": MODEL, "prompt": "[boom-mid]", "max_tokens": 10, "stream": True}
    raw = httpx.post(fake_server.url + "/v1/completions", json=body, timeout=10).text
    events = [e for e in raw.split("\n\n") if e]
    assert json.loads(events[-2][6:])["error"]["type"] == "server_error" and events[-1] == "data: [DONE]"
    good_completion(client)


# -- concurrency ----------------------------------------------------------------------------------------------------
def test_concurrent_requests_and_disconnects_close_the_backend(fake_server, fake_backend, client):
    results: dict[int, str] = {}

    def one(i: int) -> None:
        out = make_client(fake_server.url).completions.create(model=MODEL, prompt=f"[slow] {i}", max_tokens=10)
        results[i] = out.choices[0].text

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: REPLY[:10] for i in range(6)}
    assert time.perf_counter() - start < 6 * 10 * 0.02  # they ran concurrently, not one after another

    closed = fake_backend.closed
    with httpx.stream("POST", fake_server.url + "/v1/completions", timeout=10,
                      json={"model": MODEL, "prompt": "[slow]", "max_tokens": 400, "stream": True}) as response:  # fmt: skip
        next(response.iter_lines())  # read a little, then hang up (dropping the iterator closes the stream)
    deadline = time.monotonic() + 10
    while fake_backend.closed == closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake_backend.closed == closed + 1 and fake_backend.opened == fake_backend.closed
    while "tensorwire_http_requests_in_flight 0.0" not in httpx.get(fake_server.url + "/metrics", timeout=10).text:
        assert time.monotonic() < deadline, "the disconnected stream is still counted in flight"
        time.sleep(0.02)
    good_completion(client)


def test_too_many_in_flight_is_a_429():
    backend = FakeBackend()
    with BackgroundServer(create_app(backend, model_name=MODEL, max_context=512, max_in_flight=1)) as server:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=10,
                          json={"model": MODEL, "prompt": "[slow]", "max_tokens": 50, "stream": True}) as response:  # fmt: skip
            lines = response.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            r = httpx.post(server.url + "/v1/completions", json=completion(), timeout=10)
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = httpx.post(server.url + "/v1/completions", json=completion(), timeout=10)
            if r.status_code == 200:
                break
            time.sleep(0.05)
        assert r.status_code == 200


def test_a_body_over_the_limit_is_a_413_whether_declared_or_streamed():
    with BackgroundServer(create_app(FakeBackend(), model_name=MODEL, max_context=512, max_body_bytes=1000)) as server:
        big = json.dumps(completion(prompt="x" * 2000)).encode()
        declared = httpx.post(server.url + "/v1/completions", content=big, timeout=10)
        streamed = httpx.post(server.url + "/v1/completions", content=iter([big[:600], big[600:]]), timeout=10)  # chunked
        for r in (declared, streamed):
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "request_too_large" and "1000" in r.json()["error"]["message"]
        assert httpx.post(server.url + "/v1/completions", json=completion(), timeout=10).status_code == 200


# -- metrics ------------------------------------------------------------------------------------------------------------
def test_metrics_parse_and_count():
    backend = FakeBackend()
    with BackgroundServer(create_app(backend, model_name=MODEL, max_context=512)) as server:
        client = make_client(server.url)
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True))
        httpx.post(server.url + "/v1/completions", json=completion(model="nope"), timeout=10)
        httpx.post(server.url + "/v1/completions", json=completion(max_tokens=0), timeout=10)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model=MODEL, prompt="[boom]", max_tokens=3)
        r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("tensorwire_http_requests_total", endpoint="/v1/completions", status="200") == 1
    assert value("tensorwire_http_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert value("tensorwire_http_requests_total", endpoint="/v1/completions", status="404") == 1
    assert value("tensorwire_http_requests_total", endpoint="/v1/completions", status="400") == 1
    assert value("tensorwire_http_requests_total", endpoint="/v1/completions", status="500") == 1
    assert value("tensorwire_backend_errors_total", endpoint="/v1/completions") == 1
    assert value("tensorwire_http_requests_in_flight") == 0
    assert value("tensorwire_generated_tokens_total") == 7
    assert value("tensorwire_prompt_tokens_total") == 5 + len("<|user|>x\n<|assistant|>")
    for name in ("tensorwire_ttft_seconds", "tensorwire_jct_seconds", "tensorwire_tpot_seconds"):
        assert families[name].type == "histogram" and value(f"{name}_count") == 2
    raw, sent = value("tensorwire_kv_bytes_raw_total"), value("tensorwire_kv_bytes_sent_total")
    assert raw > 0 and 0 < sent <= raw
    decisions = [(dict(k), v) for (n, k), v in samples.items() if n == "tensorwire_decisions_total"]
    assert sum(v for _, v in decisions) == 2 and all(d["reason"] and d["profile"] for d, _ in decisions)
    assert value("tensorwire_fallbacks_total") == 0
