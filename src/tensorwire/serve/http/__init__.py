"""The OpenAI-compatible HTTP front end of tensorwire serving.

>>> from tensorwire.serve.http import LocalBackend, create_app, BackgroundServer   # doctest: +SKIP
>>> backend = LocalBackend.smollm2()                                                # doctest: +SKIP
>>> app = create_app(backend, model_name="SmolLM2-135M-Instruct", max_context=8192)  # doctest: +SKIP
>>> with BackgroundServer(app) as server:                                           # doctest: +SKIP
...     openai.OpenAI(base_url=server.url + "/v1", api_key="-").completions.create(...)

Modules: ``backend`` (the :class:`Backend` interface the workers implement, its request
and event types; no optional dependency), ``schemas`` (request bodies, checks, server
defaults), ``text`` (incremental detokenization, stop strings), ``metrics`` (Prometheus),
``app`` (:func:`create_app`), ``local`` (:class:`LocalBackend`, in-process SmolLM2),
``server`` (uvicorn in the foreground or on a thread). ``python -m tensorwire.serve.http``
serves SmolLM2 locally.

The interface types are imported eagerly; the app, the local backend and the server are
imported on first use (they need FastAPI, uvicorn and prometheus_client: the ``serve``
extra; the local backend needs torch and transformers).
"""

from __future__ import annotations

import importlib
from typing import Any

from .backend import (
    AUTO,
    RAW,
    Backend,
    BackendHealth,
    Finished,
    GenerationEvent,
    GenerationRequest,
    HFTokenizer,
    KVOptions,
    Prefilled,
    SamplingParams,
    Tokenizer,
    Tokens,
)

__all__ = [
    "AUTO",
    "RAW",
    "Backend",
    "BackendHealth",
    "BackgroundServer",
    "Finished",
    "GenerationEvent",
    "GenerationRequest",
    "HFTokenizer",
    "KVOptions",
    "LocalBackend",
    "Prefilled",
    "SamplingParams",
    "ServerDefaults",
    "Tokenizer",
    "Tokens",
    "create_app",
    "serve",
]

_LAZY = {
    "create_app": "app",
    "ServerDefaults": "schemas",
    "LocalBackend": "local",
    "BackgroundServer": "server",
    "serve": "server",
}
_NEEDS = ("fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ...errors import require

    for dependency in _NEEDS:
        require(dependency)  # MissingDependency naming the extra, before any ImportError
    return getattr(importlib.import_module(f".{module}", __name__), name)
