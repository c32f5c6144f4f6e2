"""The OpenAI-compatible HTTP front end: :func:`create_app`.

Routes
------
``POST /v1/completions``, ``POST /v1/chat/completions``
    OpenAI's request and response shapes; ``"stream": true`` answers with server-sent
    events (``data: {chunk}\\n\\n`` ..., ``data: [DONE]\\n\\n``). The body may carry a
    ``"tensorwire"`` object (``slo_ms``, ``max_ppl_increase``, ``max_retrieval_drop``,
    ``compression``: ``"auto"`` | ``"raw"`` | a profile name, ``workload``) over the
    server's :class:`~tensorwire.serve.http.schemas.ServerDefaults`. Every response says
    what happened to the request's KV cache: the header ``x-tensorwire-profile`` (the
    profile, ``raw``, or ``none`` when the cache did not move), ``x-tensorwire-reason``
    (the decision's reason class, see :func:`~tensorwire.serve.http.metrics.reason_class`),
    and a ``"tensorwire"`` object in the response body (streamed: in the last chunk
    before ``[DONE]``) with the decision (``Decision.to_dict()``, its reason), the KV bytes
    raw and sent, TTFT, JCT, TPOT and the backend's timings.
``GET /v1/models``, ``GET /v1/models/{id}``
    The one model served.
``GET /health``
    Liveness (always 200 while the process answers) with the backend's readiness and its
    workers; ``GET /ready`` is the same body with 503 when the backend is not ready.
``GET /metrics``
    Prometheus text (:mod:`tensorwire.serve.http.metrics`).

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad request (malformed JSON, missing or mistyped field, out-of-range value, unknown
profile, prompt or ``max_tokens`` beyond the context), 404 for an unknown model or route,
413 for a body over ``max_body_bytes`` (refused before it is read in full), 429 when
``max_in_flight`` requests are already being served, 500 when the backend raised
(logged with its traceback; the server goes on serving), 503 when it raised
:class:`~tensorwire.errors.BackendUnavailable`. A failure after a stream has started is an
SSE event ``data: {"error": {...}}`` followed by ``data: [DONE]``.

Concurrency
-----------
Everything here runs on the event loop and never blocks it: tokenization and chat
templates run in Starlette's thread pool, generation is the backend's async iterator. Up
to ``max_in_flight`` generation requests are admitted at once (more get a 429 at once
rather than waiting); admitted requests all run concurrently as far as the front end is
concerned, and whatever queueing happens is the backend's (the in-process backend runs
one model step at a time, requests interleaving step by step). A streamed response's
headers are sent once the backend's first event has arrived (the profile header needs
the decision), so a failure during prefill is still a proper 500.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...errors import BackendError, InvalidRequest, RequestTooLarge, TooManyRequests
from ..auth import tenant_tag
from ..protocol import json_safe
from .backend import Backend, BackendHealth, Finished, GenerationRequest, Prefilled, Tokens
from .metrics import CONTENT_TYPE_LATEST, Metrics, reason_class
from .schemas import (
    ChatRequest,
    CompletionRequest,
    ServerDefaults,
    chat_prompt,
    check_model,
    check_unsupported,
    completion_prompt,
    include_usage,
    kv_options,
    parse_body,
    sampling_params,
    stop_strings,
)
from .text import TextAssembler

__all__ = ["create_app"]

log = logging.getLogger("tensorwire.serve.http")

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
_ENDPOINTS = (COMPLETIONS, CHAT, "/v1/models", "/health", "/ready", "/metrics")
HEALTH_TIMEOUT_S = 5.0


# -- JSON and errors ------------------------------------------------------------------------------
def _dumps(obj: Any) -> str:
    return json.dumps(json_safe(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_dumps(obj), status_code=status, headers=headers, media_type="application/json")


def _error(status: int, message: str, error_type: str, param: str | None = None, code: str | None = None) -> Response:
    return _json({"error": {"message": message, "type": error_type, "param": param, "code": code}}, status)


def _error_body(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, InvalidRequest):
        return {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}
    if isinstance(exc, BackendError):
        code = "backend_unavailable" if exc.status == 503 else "backend_error"
        return {"message": str(exc) or type(exc).__name__, "type": "server_error", "param": None, "code": code}
    return {"message": f"the backend failed: {type(exc).__name__}: {exc}", "type": "server_error", "param": None,
            "code": "backend_error"}  # fmt: skip


def _error_response(exc: BaseException) -> Response:
    status = exc.status if isinstance(exc, (InvalidRequest, BackendError)) else 500
    return _json({"error": _error_body(exc)}, status)


def _header(value: str | None) -> str:
    return (value or "none").encode("ascii", "replace").decode("ascii")


# -- accounting -------------------------------------------------------------------------------------
@dataclass
class _State:
    in_flight: int = 0


class _Accounting:
    """Pure ASGI middleware: counts every answered request by endpoint and status, and the
    generation requests in flight (for the whole stream, disconnects included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, state: _State):
        self.app, self.metrics, self.state = app, metrics, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = next((e for e in _ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        generation = endpoint in (COMPLETIONS, CHAT)
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if generation:
            self.state.in_flight += 1
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            if generation:
                self.state.in_flight -= 1
                self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()


class _EventStream(StreamingResponse):
    """A StreamingResponse that closes its generators however the response ends (finished,
    client gone, cancelled), so the backend's iterator is always closed."""

    def __init__(self, content: AsyncIterator[str], closers: list[Callable[[], Any]], **kwargs: Any):
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self._closers = closers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                for close in self._closers:
                    try:
                        await close()
                    except Exception:  # closing must not mask the response's outcome
                        log.exception("closing a stream failed")


def _sse(obj: Any) -> str:
    return f"data: {_dumps(obj)}\n\n"


# -- one request --------------------------------------------------------------------------------------
@dataclass
class _Run:
    """One generation request's state, filled in as the backend's events arrive."""

    request: GenerationRequest
    endpoint: str
    received: float
    assembler: TextAssembler
    created: int = field(default_factory=lambda: int(time.time()))
    prefilled: Prefilled | None = None
    finish_reason: str | None = None
    finish_timings: dict[str, float] = field(default_factory=dict)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def completion_tokens(self) -> int:
        return self.assembler.n_tokens

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}  # fmt: skip

    def latencies(self) -> tuple[float | None, float, float | None]:
        """(TTFT, JCT, TPOT) in seconds; JCT runs to now."""
        now = time.perf_counter()
        ttft = None if self.first_token_at is None else self.first_token_at - self.received
        n = self.completion_tokens
        tpot = None
        if n > 1 and self.first_token_at is not None and self.last_token_at is not None:
            tpot = (self.last_token_at - self.first_token_at) / (n - 1)
        return ttft, now - self.received, tpot

    def tensorwire(self) -> dict[str, Any]:
        """The ``"tensorwire"`` object of the response."""
        p = self.prefilled or Prefilled()
        decision = dict(p.decision) if p.decision is not None else None
        ttft, jct, tpot = self.latencies()
        kv = self.request.kv
        return {
            "profile": p.profile,
            "reason": decision.get("reason") if decision else None,
            "reason_class": reason_class(decision),
            "decision": decision,
            "kv_bytes_raw": p.kv_bytes_raw,
            "kv_bytes_sent": p.kv_bytes_sent,
            "compression_ratio": p.kv_bytes_raw / p.kv_bytes_sent if p.kv_bytes_sent else None,
            "ttft_s": ttft,
            "jct_s": jct,
            "tpot_s": tpot,
            "timings": {**dict(p.timings), **self.finish_timings},
            "pool": dict(p.pool) if p.pool is not None else None,
            "request": {
                "compression": kv.compression,
                "slo_ms": kv.slo_s * 1e3,
                "max_ppl_increase": kv.max_ppl_increase,
                "max_retrieval_drop": kv.max_retrieval_drop,
                "workload": kv.workload,
                "pool_fetch": kv.pool_fetch,
                "pool_store": kv.pool_store,
            },
        }

    def headers(self) -> dict[str, str]:
        p = self.prefilled
        return {
            "x-request-id": self.request.request_id,
            "x-tensorwire-profile": _header(p.profile if p else None),
            "x-tensorwire-reason": reason_class(p.decision if p else None),
        }


async def _pieces(backend: Backend, run: _Run) -> AsyncIterator[str]:
    """Drive the backend for one request: yields one text delta (maybe "") per event
    handled, then what the assembler held back. Fills ``run`` on the way; closes the
    backend's iterator however it ends."""
    events = backend.generate(run.request)
    limit = run.request.sampling.max_tokens
    asm = run.assembler
    try:
        async for event in events:
            if isinstance(event, Tokens):
                ids = tuple(event.token_ids)[: max(0, limit - asm.n_tokens)]
                if not ids:
                    continue
                now = time.perf_counter()
                if run.first_token_at is None:
                    run.first_token_at = now
                run.last_token_at = now
                yield asm.feed(ids)
                if asm.stopped:
                    run.finish_reason = "stop"
                    return
                # At the limit, read on for the backend's Finished (its reason and timings);
                # tokens past the limit are dropped.
            elif isinstance(event, Prefilled):
                if run.prefilled is None:
                    run.prefilled = event
                yield ""
            elif isinstance(event, Finished):
                run.finish_reason = event.finish_reason
                run.finish_timings = dict(event.timings)
                break
            else:
                raise BackendError(f"the backend sent {type(event).__name__}; expected Prefilled, Tokens or Finished")
        if run.finish_reason is None:
            log.warning("%s: the backend ended without a Finished event", run.request.request_id)
            run.finish_reason = "length" if asm.n_tokens >= limit else "stop"
        yield asm.flush()
    finally:
        with anyio.CancelScope(shield=True):
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()


# -- the app --------------------------------------------------------------------------------------------
MAX_BODY_BYTES = 4 << 20  # a full 8k-token context as text or token ids is well under 100 KB


def _bearer(request: Request) -> str | None:
    """The API key of ``Authorization: Bearer KEY`` (the OpenAI clients send it), or None."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read until ``limit`` bytes at most (a hostile Content-Length or a chunked
    body that never ends is refused without buffering it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"the request body is {int(declared)} bytes; this server reads at most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestTooLarge(f"the request body is over {limit} bytes, the most this server reads")
    return bytes(body)


def create_app(
    backend: Backend,
    *,
    model_name: str,
    max_context: int,
    defaults: ServerDefaults | None = None,
    max_in_flight: int = 64,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The OpenAI-compatible app over ``backend`` (see the module docstring).

    Parameters
    ----------
    backend : Backend
        The serving system (:class:`~tensorwire.serve.http.backend.Backend`).
    model_name : str
        The model id clients must name (``"SmolLM2-135M-Instruct"``); any other is a 404.
    max_context : int
        Prompt plus completion tokens allowed per request.
    defaults : ServerDefaults, optional
        What requests get for fields they leave out.
    max_in_flight : int
        Generation requests served at once; more are answered 429 at once.
    max_body_bytes : int
        The largest request body read; a larger one is answered 413 before it is parsed.
    """
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 2:
        raise ValueError(f"max_context is {max_context!r}; expected an integer >= 2")
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight is {max_in_flight!r}; expected an integer >= 1")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes is {max_body_bytes!r}; expected an integer >= 1")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name is {model_name!r}; expected a non-empty string")
    defaults = defaults or ServerDefaults()
    metrics = Metrics()
    state = _State()
    started = int(time.time())

    app = FastAPI(title="tensorwire", description="OpenAI-compatible front end of tensorwire serving",
                  docs_url=None, redoc_url=None)  # fmt: skip
    app.state.backend = backend
    app.state.metrics = metrics
    app.state.defaults = defaults
    app.add_middleware(_Accounting, metrics=metrics, state=state)

    # -- errors ---------------------------------------------------------------------------------------
    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest) -> Response:
        return _error_response(exc)

    @app.exception_handler(BackendError)
    async def _backend_error(request: Request, exc: BackendError) -> Response:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(exc.status_code, message, "invalid_request_error", code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return _error(400, f"invalid request: {exc.errors()}", "invalid_request_error", code="invalid_value")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:  # pragma: no cover - a bug of ours
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error")

    # -- generation -----------------------------------------------------------------------------------
    async def prepare(request: Request, endpoint: str) -> tuple[Any, _Run]:
        received = time.perf_counter()
        raw = await _read_body(request, max_body_bytes)
        if endpoint == CHAT:
            body: Any = parse_body(raw, ChatRequest)
        else:
            body = parse_body(raw, CompletionRequest)
        check_model(body, model_name)
        check_unsupported(body)
        if state.in_flight > max_in_flight:
            raise TooManyRequests(f"{max_in_flight} requests are being served already; retry later")
        stops = stop_strings(body)
        tokenizer = backend.tokenizer
        try:
            ids = await run_in_threadpool(chat_prompt if endpoint == CHAT else completion_prompt, body, tokenizer)
        except InvalidRequest:
            raise
        except Exception as exc:  # the tokenizer is the backend's: its failure is a 500, logged
            metrics.backend_errors.labels(endpoint=endpoint).inc()
            log.error("the tokenizer failed on a %s request", endpoint, exc_info=exc)
            raise BackendError(f"the tokenizer failed: {type(exc).__name__}: {exc}") from exc
        sampling = sampling_params(body, len(ids), max_context, defaults)
        kv = kv_options(body.tensorwire, defaults, backend.profiles)
        prefix = "chatcmpl" if endpoint == CHAT else "cmpl"
        greq = GenerationRequest(f"{prefix}-{uuid.uuid4().hex}", tuple(ids), sampling, kv,
                                 tenant=tenant_tag(_bearer(request)))  # fmt: skip
        return body, _Run(greq, endpoint, received, TextAssembler(tokenizer, stops))

    def record(run: _Run) -> None:
        ttft, jct, tpot = run.latencies()
        if ttft is not None:
            metrics.ttft.observe(ttft)
        metrics.jct.observe(jct)
        if tpot is not None:
            metrics.tpot.observe(tpot)
        metrics.prompt_tokens.inc(run.prompt_tokens)
        metrics.generated_tokens.inc(run.completion_tokens)
        p = run.prefilled
        if p is not None:
            metrics.kv(p.profile, p.decision, p.kv_bytes_raw, p.kv_bytes_sent)
            if p.pool is not None:
                metrics.pool(p.pool, run.prompt_tokens)

    def failed(run: _Run, exc: BaseException) -> None:
        metrics.backend_errors.labels(endpoint=run.endpoint).inc()
        if isinstance(exc, InvalidRequest):
            log.warning("%s: the backend refused the request: %s", run.request.request_id, exc)
        elif isinstance(exc, BackendError) and exc.status == 503:
            log.warning("%s: backend unavailable: %s", run.request.request_id, exc)
        else:
            log.error("%s: the backend failed", run.request.request_id, exc_info=exc)

    def choice_complete(run: _Run, text: str) -> dict[str, Any]:
        if run.endpoint == CHAT:
            return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None, "finish_reason": run.finish_reason}  # fmt: skip
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": run.finish_reason}

    def chunk(run: _Run, delta: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if run.endpoint == CHAT:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            if role:
                d = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": run.request.request_id, "object": obj, "created": run.created, "model": model_name, "choices": [choice]}

    async def complete(run: _Run) -> Response:
        pieces = _pieces(backend, run)
        try:
            text = "".join([piece async for piece in pieces])
        except Exception as exc:  # noqa: BLE001 - any backend failure is the client's 500, never a crash
            failed(run, exc)
            return _error_response(exc)
        finally:
            await pieces.aclose()
        record(run)
        obj = "chat.completion" if run.endpoint == CHAT else "text_completion"
        body = {"id": run.request.request_id, "object": obj, "created": run.created, "model": model_name,
                "choices": [choice_complete(run, text)], "usage": run.usage(), "tensorwire": run.tensorwire()}  # fmt: skip
        return _json(body, headers=run.headers())

    async def stream(run: _Run, usage: bool) -> Response:
        pieces = _pieces(backend, run)
        try:
            first = await pieces.__anext__()  # the first event: the decision is known, the headers can go
        except Exception as exc:  # noqa: BLE001
            await pieces.aclose()
            failed(run, exc)
            return _error_response(exc)

        async def events() -> AsyncIterator[str]:
            if run.endpoint == CHAT:
                yield _sse(chunk(run, None, role=True))
            if first:
                yield _sse(chunk(run, first))
            try:
                async for piece in pieces:
                    if piece:
                        yield _sse(chunk(run, piece))
            except Exception as exc:  # noqa: BLE001 - mid-stream: an error event, then the end
                failed(run, exc)
                yield _sse({"error": _error_body(exc)})
                yield "data: [DONE]\n\n"
                return
            record(run)
            last = chunk(run, "" if run.endpoint != CHAT else None, finish=run.finish_reason)
            if usage:
                yield _sse(last)
                last = {"id": run.request.request_id, "object": last["object"], "created": run.created,
                        "model": model_name, "choices": [], "usage": run.usage()}  # fmt: skip
            last["tensorwire"] = run.tensorwire()
            yield _sse(last)
            yield "data: [DONE]\n\n"

        body = events()
        headers = {**run.headers(), "cache-control": "no-cache", "x-accel-buffering": "no"}
        return _EventStream(body, [body.aclose, pieces.aclose], headers=headers)

    async def serve(request: Request, endpoint: str) -> Response:
        body, run = await prepare(request, endpoint)
        if body.stream:
            return await stream(run, include_usage(body))
        return await complete(run)

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await serve(request, COMPLETIONS)

    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await serve(request, CHAT)

    # -- the rest --------------------------------------------------------------------------------------
    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "tensorwire",
                "max_context": max_context, "profiles": sorted(backend.profiles)}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != model_name:
            return _error(404, f"The model `{model_id}` does not exist; this server serves `{model_name}`",
                          "invalid_request_error", param="model", code="model_not_found")  # fmt: skip
        return _json(model_card())

    async def backend_health() -> BackendHealth:
        try:
            with anyio.fail_after(HEALTH_TIMEOUT_S):
                health = await backend.health()
            if not isinstance(health, BackendHealth):
                raise TypeError(f"health() returned a {type(health).__name__}, not a BackendHealth")
            return health
        except Exception as exc:  # noqa: BLE001 - a failing health check is "not ready", not a 500
            log.warning("backend health check failed: %s: %s", type(exc).__name__, exc)
            return BackendHealth(ready=False, detail=f"health check failed: {type(exc).__name__}: {exc}")

    def health_body(health: BackendHealth) -> dict[str, Any]:
        return {"status": "ok" if health.ready else "degraded", "ready": health.ready, "model": model_name,
                "workers": {k: dict(v) for k, v in health.workers.items()}, "detail": health.detail,
                "in_flight": state.in_flight}  # fmt: skip

    @app.get("/health")
    async def health() -> Response:
        return _json(health_body(await backend_health()))

    @app.get("/ready")
    async def ready() -> Response:
        h = await backend_health()
        return _json(health_body(h), status=200 if h.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
