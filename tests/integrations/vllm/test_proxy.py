"""The prefill/decode proxy's own logic, with two small HTTP servers standing in for vLLM.

(The proxy in front of real vLLM servers is tested in test_deploy.py, in the vLLM
environment.) The stand-ins record what they were asked; the decode one can refuse its
first request, as a restarting server does.
"""

from __future__ import annotations

import json

import pytest

fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tensorwire.integrations.vllm.proxy import create_proxy  # noqa: E402
from tensorwire.serve.http.server import BackgroundServer  # noqa: E402

TRANSFER = {"tensorwire_transfer": {"host": "127.0.0.1", "port": 7100, "id": "cmpl-1", "tokens": 512}}


def stand_in(name: str, seen: list, fail_first: int = 0):
    app = fastapi.FastAPI()
    state = {"failures": fail_first}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        body = await request.json()
        seen.append(body)
        if state["failures"]:
            state["failures"] -= 1
            return fastapi.responses.JSONResponse({"error": "restarting"}, status_code=503)
        if body.get("stream"):
            async def events():
                for word in ("a", "b"):
                    yield f"data: {json.dumps({'choices': [{'text': word}]})}\n\n"
                yield "data: [DONE]\n\n"

            return fastapi.responses.StreamingResponse(events(), media_type="text/event-stream")
        reply = {"choices": [{"text": f"from {name}"}]}
        if name == "prefill":
            reply["kv_transfer_params"] = TRANSFER
        return reply

    @app.get("/health")
    async def health():
        return {}

    return app


def run(fail_first: int = 0, body: dict | None = None):
    prefill_seen, decode_seen = [], []
    with BackgroundServer(stand_in("prefill", prefill_seen)) as prefill, \
            BackgroundServer(stand_in("decode", decode_seen, fail_first)) as decode:  # fmt: skip
        proxy_app = create_proxy(prefill.url, decode.url, restart_wait_s=5)
        with BackgroundServer(proxy_app) as proxy:
            reply = httpx.post(proxy.url + "/v1/completions", timeout=30,
                               json=body or {"model": "m", "prompt": "x", "max_tokens": 16})  # fmt: skip
    return reply, prefill_seen, decode_seen, proxy_app


def test_the_prefill_instance_computes_one_token_and_the_decode_instance_gets_its_transfer():
    reply, prefill_seen, decode_seen, app = run()
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "from decode"
    assert prefill_seen[0]["max_tokens"] == 1 and prefill_seen[0]["stream"] is False
    assert decode_seen[0]["max_tokens"] == 16 and decode_seen[0]["kv_transfer_params"] == TRANSFER
    assert app.state.transfers == [TRANSFER]


def test_a_restarting_decode_instance_is_waited_for_and_asked_again():
    reply, _, decode_seen, app = run(fail_first=1)
    assert reply.status_code == 200 and len(decode_seen) == 2 and app.state.retries == 1


def test_a_streamed_answer_is_relayed_as_it_comes():
    reply, prefill_seen, _, _ = run(body={"model": "m", "prompt": "x", "max_tokens": 4, "stream": True,
                                          "stream_options": {"include_usage": True}})  # fmt: skip
    assert reply.status_code == 200 and reply.text.count("data: ") == 3 and reply.text.endswith("data: [DONE]\n\n")
    assert "stream_options" not in prefill_seen[0]


def test_a_decode_instance_that_stays_down_is_a_503_in_openai_shape():
    with BackgroundServer(stand_in("prefill", [])) as prefill:
        app = create_proxy(prefill.url, "http://127.0.0.1:9", restart_wait_s=1)
        with BackgroundServer(app) as proxy:
            reply = httpx.post(proxy.url + "/v1/completions", json={"model": "m", "prompt": "x"}, timeout=30)
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "decode_unavailable"
