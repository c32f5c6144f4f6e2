"""The OpenAI request bodies the front end accepts, their checks, and the server's defaults.

Bodies are parsed with pydantic in strict mode (``"5"`` is not an integer, ``true`` is not
a number, NaN and infinities are refused); unknown top-level fields are ignored, as
OpenAI-compatible servers do, but the ``"tensorwire"`` extension object is closed (a
misspelt option is an error, not a silent default). Fields that OpenAI defines but this
server cannot honour are refused when set to anything but their neutral value (``n > 1``,
``logprobs``, ``echo``, penalties, tools, ...), never silently ignored.

Every check raises :class:`~tensorwire.errors.InvalidRequest` (or a subclass) with OpenAI's
``param`` and ``code``; the app turns it into ``{"error": {...}}`` with the right status.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from .backend import AUTO, RAW, KVOptions, SamplingParams, Tokenizer

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "ServerDefaults",
    "TensorwireOptions",
    "chat_prompt",
    "completion_prompt",
    "kv_options",
    "parse_body",
    "sampling_params",
]

MAX_STOP = 4  # OpenAI's limit on stop strings
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ServerDefaults:
    """What a request gets for a field it leaves out.

    ``completion_max_tokens`` (OpenAI: 16) and ``chat_max_tokens`` are capped by what the
    context leaves after the prompt. ``slo_ms`` None: no SLO; quality budgets None: no
    limit. ``compression``: ``"auto"``, ``"raw"`` or a profile name.
    """

    completion_max_tokens: int = 16
    chat_max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    compression: str = AUTO
    slo_ms: float | None = None
    max_ppl_increase: float | None = None
    max_retrieval_drop: float | None = None
    workload: str = "default"

    def __post_init__(self) -> None:
        for name in ("completion_max_tokens", "chat_max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerDefaults.{name} is {value!r}; expected an integer >= 1")
        _check_range(self.temperature, "temperature", 0.0, 2.0)
        _check_range(self.top_p, "top_p", 0.0, 1.0)
        for name, high in (("slo_ms", math.inf), ("max_ppl_increase", math.inf), ("max_retrieval_drop", 100.0)):
            if getattr(self, name) is not None:
                _check_range(getattr(self, name), name, 0.0, high, low_open=name == "slo_ms")


def _check_range(value: Any, name: str, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"ServerDefaults.{name} is {value!r}; expected a finite number in {'(' if low_open else '['}{low}, {high}]")


# -- bodies ------------------------------------------------------------------------------------------
_STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class TensorwireOptions(BaseModel):
    """The ``"tensorwire"`` extension object (the official client sends it with ``extra_body``)."""

    model_config = ConfigDict(extra="forbid", **_STRICT)

    slo_ms: float | None = Field(None, gt=0, description="latency objective for moving the KV cache, ms")
    max_ppl_increase: float | None = Field(None, ge=0, description="relative perplexity increase allowed (0.01 = +1 %)")
    max_retrieval_drop: float | None = Field(None, ge=0, le=100, description="retrieval accuracy points that may be lost")
    compression: str | None = Field(None, description='"auto", "raw" or a profile name')
    workload: str | None = Field(None, min_length=1, max_length=64, description="the controller's workload class")
    pool_fetch: Literal["auto", "always", "never"] | None = Field(
        None, description='KV pool: "auto" (fetch what beats prefilling), "always" or "never" read the pool')
    pool_store: str | None = Field(None, description='KV pool: "auto", "raw", a profile name or "none"')


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    tensorwire: TensorwireOptions | None = None


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: Any = None  # str, [str], [int] or [[int]]: checked by completion_prompt
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: Any = None  # checked by chat_prompt
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def _param(loc: tuple[Any, ...]) -> str | None:
    # Union members appear in the location as their type names ("str", "list[int]"): drop them.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")))]
    return ".".join(parts) or None


def parse_body(raw: bytes, model_class: type[BaseModel]) -> Any:
    """Parse and type-check a JSON body; raises :class:`InvalidRequest` in OpenAI's terms."""
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return model_class.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            why = first.get("ctx", {}).get("error", "")
            raise InvalidRequest(f"We could not parse the JSON body of your request ({why}); send a JSON object",
                                 code="invalid_json") from None  # fmt: skip
        if first["type"] == "model_type" and not first["loc"]:
            raise InvalidRequest("the request body must be a JSON object", code="invalid_json") from None
        param = _param(first["loc"])
        if first["type"] == "missing":
            raise InvalidRequest(f"you must provide '{param}'", param=param, code="missing_required_parameter") from None
        if first["type"] == "extra_forbidden":
            raise InvalidRequest(f"unknown field '{param}'", param=param, code="unknown_parameter") from None
        value = first.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 80 else type(value).__name__
        raise InvalidRequest(f"invalid value for '{param}': {first['msg']} (got {shown})", param=param,
                             code="invalid_value") from None  # fmt: skip


# -- checks shared by both endpoints ------------------------------------------------------------------
def check_model(body: _Common, model_name: str) -> None:
    if body.model != model_name:
        raise ModelNotFound(f"The model `{body.model}` does not exist; this server serves `{model_name}`")


def _unsupported(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"'{param}' is not supported by this server: {why}", param=param, code="unsupported_parameter")


def check_unsupported(body: _Common) -> None:
    """Refuse OpenAI fields set to something this server cannot honour."""
    if body.n is not None and body.n != 1:
        raise _unsupported("n", f"only n=1 is served (got {body.n}); send {body.n} requests instead")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise _unsupported(name, "only 0 is served")
    if body.logit_bias:
        raise _unsupported("logit_bias", "leave it out or send {}")
    if isinstance(body, CompletionRequest):
        if body.logprobs is not None:
            raise _unsupported("logprobs", "log probabilities are not returned")
        if body.echo:
            raise _unsupported("echo", "the prompt is not echoed")
        if body.best_of not in (None, 1):
            raise _unsupported("best_of", "only best_of=1 is served")
        if body.suffix:
            raise _unsupported("suffix", "insertion is not served")
    if isinstance(body, ChatRequest):
        if body.logprobs or body.top_logprobs:
            raise _unsupported("logprobs", "log probabilities are not returned")
        for name in ("tools", "functions"):
            if getattr(body, name):
                raise _unsupported(name, "tool calls are not served")
        if body.tool_choice not in (None, "none"):
            raise _unsupported("tool_choice", "tool calls are not served")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise _unsupported("response_format", "only text responses are served")


def stop_strings(body: _Common) -> tuple[str, ...]:
    if body.stop is None:
        return ()
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if len(stops) > MAX_STOP:
        raise InvalidRequest(f"'stop' holds {len(stops)} strings; at most {MAX_STOP} are allowed", param="stop",
                             code="invalid_value")  # fmt: skip
    if any(s == "" for s in stops):
        raise InvalidRequest("'stop' strings must not be empty", param="stop", code="invalid_value")
    return tuple(stops)


def _check_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"'{param}' holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})", param=param,
                             code="invalid_value")  # fmt: skip


def completion_prompt(body: CompletionRequest, tokenizer: Tokenizer) -> list[int]:
    """The prompt's token ids: a string, a list of token ids, or either wrapped in a list of one."""
    prompt = body.prompt
    if prompt is None:
        raise InvalidRequest("you must provide 'prompt'", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise _unsupported("prompt", f"a batch of {len(prompt)} prompts; send one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        _check_ids(ids, tokenizer.vocab_size, "prompt")
    else:
        raise InvalidRequest("'prompt' must be a string or a list of token ids", param="prompt", code="invalid_type")
    if not ids:
        raise InvalidRequest("'prompt' is empty (no tokens)", param="prompt", code="invalid_value")
    return ids


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _unsupported(f"messages.{index}.content", "only text parts ({\"type\": \"text\", \"text\": ...}) are served")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(f"'messages.{index}.content' must be a string or a list of text parts", param=f"messages.{index}.content",
                         code="invalid_type")  # fmt: skip


def chat_prompt(body: ChatRequest, tokenizer: Tokenizer) -> list[int]:
    """The chat's token ids after the tokenizer's chat template (generation prompt included)."""
    messages = body.messages
    if messages is None:
        raise InvalidRequest("you must provide 'messages'", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list of {role, content} objects", param="messages",
                             code="invalid_value")  # fmt: skip
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequest(f"'messages.{i}' must be an object with 'role' and 'content'", param=f"messages.{i}",
                                 code="invalid_type")  # fmt: skip
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"'messages.{i}.role' is {role!r}; expected one of {', '.join(ROLES)}", param=f"messages.{i}.role",
                                 code="invalid_value")  # fmt: skip
        if "content" not in m:
            raise InvalidRequest(f"you must provide 'messages.{i}.content'", param=f"messages.{i}.content",
                                 code="missing_required_parameter")  # fmt: skip
        chat.append({"role": "system" if role == "developer" else role, "content": _message_text(m["content"], i)})
    ids = tokenizer.apply_chat_template(chat)
    if not ids:
        raise InvalidRequest("'messages' gives an empty prompt", param="messages", code="invalid_value")
    return ids


def max_tokens(body: _Common, prompt_tokens: int, max_context: int, default: int) -> int:
    """The number of tokens to generate, checked against the context."""
    asked, param = body.max_tokens, "max_tokens"
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        if asked is not None and asked != body.max_completion_tokens:
            raise InvalidRequest(f"'max_tokens' ({asked}) and 'max_completion_tokens' ({body.max_completion_tokens}) differ; "
                                 "send one", param="max_completion_tokens", code="invalid_value")  # fmt: skip
        asked, param = body.max_completion_tokens, "max_completion_tokens"
    if prompt_tokens >= max_context:
        raise ContextLengthExceeded(f"This model's maximum context length is {max_context} tokens. However, your prompt is "
                                    f"{prompt_tokens} tokens, which leaves no room for a completion. Shorten the prompt.",
                                    param="messages" if isinstance(body, ChatRequest) else "prompt")  # fmt: skip
    if asked is None:
        return min(default, max_context - prompt_tokens)
    if asked < 1:
        raise InvalidRequest(f"'{param}' is {asked}; expected an integer >= 1", param=param, code="invalid_value")
    if prompt_tokens + asked > max_context:
        raise ContextLengthExceeded(f"This model's maximum context length is {max_context} tokens. However, you requested "
                                    f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} in the completion). "
                                    f"Reduce the prompt or '{param}'.", param=param)  # fmt: skip
    return asked


def sampling_params(body: _Common, prompt_tokens: int, max_context: int, defaults: ServerDefaults) -> SamplingParams:
    default = defaults.chat_max_tokens if isinstance(body, ChatRequest) else defaults.completion_max_tokens
    return SamplingParams(
        max_tokens=max_tokens(body, prompt_tokens, max_context, default),
        temperature=float(defaults.temperature if body.temperature is None else body.temperature),
        top_p=float(defaults.top_p if body.top_p is None else body.top_p),
        seed=body.seed,
    )


def kv_options(options: TensorwireOptions | None, defaults: ServerDefaults, profiles: Collection[str]) -> KVOptions:
    """The request's KV options over the server's defaults; the profile name is checked."""
    o = options or TensorwireOptions()
    compression = o.compression if o.compression is not None else defaults.compression
    if compression not in (AUTO, RAW) and compression not in profiles:
        known = ", ".join(sorted(profiles)) or "none: this backend has no profile library"
        raise InvalidRequest(f"'tensorwire.compression' is {compression!r}; expected \"auto\", \"raw\" or a profile name "
                             f"({known})", param="tensorwire.compression", code="unknown_profile")  # fmt: skip

    if o.pool_store is not None and o.pool_store not in (AUTO, RAW, "none") and o.pool_store not in profiles:
        raise InvalidRequest(f"'tensorwire.pool_store' is {o.pool_store!r}; expected \"auto\", \"raw\", \"none\" or a "
                             "profile name", param="tensorwire.pool_store", code="unknown_profile")  # fmt: skip

    def pick(value: float | None, default: float | None) -> float:
        chosen = value if value is not None else default
        return math.inf if chosen is None else float(chosen)

    slo_ms = pick(o.slo_ms, defaults.slo_ms)
    return KVOptions(
        compression=compression,
        slo_s=slo_ms / 1e3,
        max_ppl_increase=pick(o.max_ppl_increase, defaults.max_ppl_increase),
        max_retrieval_drop=pick(o.max_retrieval_drop, defaults.max_retrieval_drop),
        workload=o.workload or defaults.workload,
        pool_fetch=o.pool_fetch or "auto",
        pool_store=o.pool_store or AUTO,
    )


def include_usage(body: _Common) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


Endpoint = Literal["completions", "chat"]
