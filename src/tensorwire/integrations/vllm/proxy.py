"""The front end of a vLLM prefill/decode pair: one OpenAI-compatible endpoint for both.

A completion (or chat completion) goes to the prefill instance first, with ``max_tokens=1``
and no streaming: it computes the prompt's KV, its tensorwire connector keeps it in the
outbox and answers with ``kv_transfer_params.tensorwire_transfer`` (where and what to
pull). The request then goes to the decode instance with those params; its connector
pulls the KV over tensorwire's transport (the profile chosen per transfer by the prefill
instance's controller) and vLLM generates from it. The decode instance's answer, streamed
or not, is the client's. A client's own ``kv_transfer_params.tensorwire`` (quality budget,
``compression``) reaches the prefill instance.

If the prefill instance fails, the request goes to the decode instance alone (it computes
the prompt itself); if the transfer fails, the decode instance's connector reports it and
vLLM recomputes the prompt there.
"""


import asyncio
import contextlib
import json
import logging
from typing import Any

from ...errors import require

__all__ = ["create_proxy"]

log = logging.getLogger("tensorwire.vllm.proxy")


def create_proxy(prefill_url: str, decode_url: str, *, timeout_s: float = 600.0, restart_wait_s: float = 120.0):
    """A FastAPI app in front of a prefill instance and a decode instance (their base URLs).

    A decode instance that cannot be reached or answers 5xx before its first byte (it is
    restarting) is waited for, up to ``restart_wait_s`` for its ``/health``, and asked once
    more; its connector then finds the transfer gone and vLLM recomputes the prompt. A
    stream cut after its first byte is not resent (the client has tokens already).
    """
    fastapi = require("fastapi")
    httpx = require("httpx")
    responses = require("fastapi.responses")
    client = httpx.AsyncClient(timeout=timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    app = fastapi.FastAPI(title="tensorwire vLLM prefill/decode proxy", lifespan=lifespan)
    app.state.transfers = []  # kv_transfer_params of the latest requests (bounded), for tests and benchmarks
    app.state.retries = 0  # requests asked again of a restarted decode instance

    async def prefill(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        first = {**body, "max_tokens": 1, "stream": False}
        first.pop("stream_options", None)
        if "max_completion_tokens" in first:
            first["max_completion_tokens"] = 1
        try:
            reply = await client.post(prefill_url + path, json=first)
            reply.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("the prefill instance failed (%s); the decode instance computes the prompt", exc)
            return None
        return reply.json().get("kv_transfer_params")

    async def healthy(deadline: float) -> None:
        while asyncio.get_running_loop().time() < deadline:
            try:
                if (await client.get(decode_url + "/health", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)

    async def decode(path: str, body: dict[str, Any]):
        """The decode instance's response (streamed when the body asks), asked again once after a restart."""
        for attempt in (1, 2):
            try:
                upstream = await client.send(client.build_request("POST", decode_url + path, json=body),
                                             stream=bool(body.get("stream")))  # fmt: skip
                if upstream.status_code < 500 or attempt == 2:
                    return upstream
                await upstream.aclose()
                log.warning("the decode instance answered %d; waiting for it and asking again", upstream.status_code)
            except httpx.TransportError as exc:
                if attempt == 2:
                    raise
                log.warning("the decode instance is unreachable (%s); waiting for it and asking again", exc)
            app.state.retries += 1
            await healthy(asyncio.get_running_loop().time() + restart_wait_s)

    async def relay(path: str, request: Any):
        body = await request.json()
        params = await prefill(path, body)
        if params:
            body["kv_transfer_params"] = params
            app.state.transfers = [*app.state.transfers[-99:], params]
        try:
            upstream = await decode(path, body)
        except httpx.TransportError as exc:
            return responses.JSONResponse({"error": {"message": f"the decode instance is unreachable: {exc}",
                                                     "type": "server_error", "param": None, "code": "decode_unavailable"}},
                                          status_code=503)  # fmt: skip
        if not body.get("stream"):
            return responses.Response(upstream.content, status_code=upstream.status_code, media_type="application/json")

        async def chunks():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return responses.StreamingResponse(chunks(), status_code=upstream.status_code, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await relay("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await relay("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models():
        reply = await client.get(decode_url + "/v1/models")
        return responses.Response(reply.content, status_code=reply.status_code, media_type="application/json")

    @app.get("/health")
    async def health():
        states = {}
        for name, url in (("prefill", prefill_url), ("decode", decode_url)):
            try:
                states[name] = (await client.get(url + "/health")).status_code == 200
            except httpx.HTTPError:
                states[name] = False
        return responses.Response(json.dumps(states), status_code=200 if all(states.values()) else 503,
                                  media_type="application/json")  # fmt: skip

    return app
