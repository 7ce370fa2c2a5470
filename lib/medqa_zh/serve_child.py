"""What runs inside a CPU server's own process (``serve.start`` starts it with
``python -c "import medqa_zh.serve_child as s; s.main(args)"``, or ``s.llamacpp_main`` for a GGUF): an
OpenAI-compatible server for one model under its served name, answering as vLLM answers where vLLM has an answer.

The transformers backend (:func:`main`) is this module's own small server, on public, documented APIs only:
``from_pretrained``, ``apply_chat_template``, ``generate`` (with ``stop_strings``, a streamer and a stopping
criterion that cancels a request whose client left), ``TextIteratorStreamer``, FastAPI and pydantic. The llamacpp
backend (:func:`llamacpp_main`) is llama-cpp-python's server with the same checks put in front of it. Every chat
request goes through them:

1. **The body is read** (:func:`_read_body`): JSON nested deeper than 64 levels, an integer of more than 20 digits,
   NaN or Infinity, or a string with a lone surrogate is a 400 naming its field, before anything else reads it.
   **It is validated** against one request model written from the OpenAI API reference
   (:class:`ChatCompletionRequest`: required fields, types, roles, content as a string or text parts,
   ranges: ``seed`` an int64, ``logit_bias`` token ids of the served model with biases in [-100, 100],
   ``stream_options`` only with ``stream``). Anything wrong is a 400 in the OpenAI error shape with the field in
   ``param`` (``messages[0].role``); a field the API does not have is refused the same way.
2. **Fields the backend would ignore** although they change the reply are refused (400):
   :func:`unsupported`. Another model name is a 404.
3. **The context is enforced**: the prompt is tokenized once, with the model's chat template; prompt tokens +
   ``max_tokens`` above the context (``serve.max_model_len``, else the model's own) is a 400 naming both
   numbers, before anything is generated. ``max_completion_tokens`` wins over ``max_tokens`` (as vLLM and OpenAI);
   a missing one is the room left (as vLLM).
4. **A bounded queue** (:class:`Gate`, transformers backend): the model generates one request at a time; at most
   ``max_queue`` more wait. Beyond that a request gets a 429 with ``Retry-After``; one that waits longer than
   ``request_timeout`` gets a 503; one whose client hung up while waiting is dropped. A request keeps its slot
   until the worker thread has let go of it, even when its client left earlier (its generation is told to stop).
5. **Streams** stop before a ``stop`` string, as a plain reply does, end with ``data: [DONE]``, and report
   an error after the first byte as an error event; a client that hangs up stops its generation.

Besides (:class:`_Front`): an API-key check on every path but ``/health``, every path but the few offered a 404,
every error (an unexpected one too: 500, logged with its traceback) in the OpenAI shape with the client's keep-alive
connection kept; and ``temperature`` below 1e-5 greedy and above it sampling, whatever the model's generation
config says.

Nothing here runs in the notebook's process: ``serve`` holds the parent's side (start, check, stop).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

API_KEY_ENV = "MEDQA_SERVE_API_KEY"  # the key reaches the child this way, so it does not show in `ps`
OPEN_PATHS = ("/health",)  # answered without the key, as vLLM does
# the paths a server answers (both backends; the API's and FastAPI's own docs): any other is a 404, whatever the
# backend has (llama-cpp-python's raw completions, embeddings, tokenizer, ...)
CHAT = "/v1/chat/completions"
OFFERED = ("/health", "/v1/models", CHAT, "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 429: "RateLimitError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}
log = logging.getLogger("medqa_zh.serve_child")


class ApiError(Exception):
    """A request answered with an error in the OpenAI shape."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def openai_error(status: int, message: str, param: str | None = None) -> dict:
    """An error body in the OpenAI API's shape (as vLLM sends it), which OpenAI clients read."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": param, "code": status}}


# --------------------------------------------------------------------------- the request, as the OpenAI API defines it


class _Strict(BaseModel):
    # strict: no "5" for 5, no 1 for true; extra: a field the API does not have is an error, as OpenAI's own API says
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]  # this server's models read text only
    text: str


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``'s body (OpenAI API reference, Create chat completion), with the two
    extensions vLLM has too: ``chat_template_kwargs`` and a ``model`` that may be left out."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # int64, as vLLM (torch.manual_seed takes no more)
    n: int | None = Field(None, ge=1, le=128)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    chat_template_kwargs: dict | None = None


GREEDY_BELOW = 1e-5  # a temperature below this is greedy decoding, as vLLM's _SAMPLING_EPS
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}  # how pydantic names a union's branches


def param_of(loc: tuple) -> str | None:
    """A pydantic error location as the OpenAI API names a field: ``messages[0].content`` (a union's branch, which
    pydantic names by its type, ``str`` or ``ChatCompletionRequestUserMessage``, left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TYPE_TAGS and "[" not in part and part.isidentifier() and not part[0].isupper():
            out += ("." if out else "") + part
    return out or None


def _invalid(error: ValidationError) -> ApiError:
    """One 400 for a body that does not validate: the deepest field pydantic complains about (for a union, the
    branch that matched best), with every message about that field."""
    rank = {"literal_error": 0, "missing": 2, "extra_forbidden": 3}  # at the same depth: a wrong value first
    errors = [(param_of(e["loc"]), e) for e in error.errors()]
    depth = lambda p: (p or "").count(".") + (p or "").count("[")  # noqa: E731
    param, first = min(errors, key=lambda pe: (-depth(pe[0]), rank.get(pe[1]["type"], 1)))
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {param!r}: the OpenAI chat completions API has no such field", param)
    if first["type"] == "literal_error" and param.endswith(".type") and ".content[" in param:
        return ApiError(400, f"{param}: this server's model reads text only (content parts of type 'text')", param)
    messages = list(dict.fromkeys(e["msg"] for p, e in errors if p == param and e["type"] != "extra_forbidden"))
    return ApiError(400, f"{param or 'body'}: {'; '.join(messages)}", param)


def unsupported(request: ChatCompletionRequest, backend: str = "transformers") -> list[str]:
    """The fields this backend would ignore (or get wrong) although they change the reply.

    Both: ``n`` > 1, ``logprobs``/``top_logprobs`` (neither server keeps the logits), a ``tool_choice`` other than
    auto. ``transformers``: ``presence_penalty`` and ``frequency_penalty`` ≠ 0 (``generate`` has only a
    multiplicative repetition penalty, another thing), a ``response_format`` other than text, and ``tools`` (the
    server parses no tool calls out of a reply; vLLM too needs a tool parser for them). ``llamacpp``
    (llama-cpp-python's server): ``chat_template_kwargs`` (it has none; ``stream_options`` it lacks too, and
    :class:`_CheckedChat` answers it)."""
    checks = {"n": lambda v: v != 1, "logprobs": bool, "top_logprobs": bool, "tool_choice": lambda v: v != "auto"}
    if backend == "transformers":
        checks |= {"presence_penalty": lambda v: v != 0, "frequency_penalty": lambda v: v != 0,
                   "response_format": lambda v: v.type != "text", "tools": bool}
    else:
        checks |= {"chat_template_kwargs": bool}
    return [key for key, bad in checks.items() if getattr(request, key) is not None and bad(getattr(request, key))]


def check_request(body, name: str, vocab: int, backend: str = "transformers") -> dict:
    """The body of a chat request, validated (:class:`ChatCompletionRequest`, :func:`unsupported`, the served
    ``name``, ``logit_bias`` keys among the served model's ``vocab`` token ids, ``stream_options`` only with
    ``stream``), as the ``backend`` takes it: unset fields left out, ``max_completion_tokens`` as ``max_tokens``
    (the newer name first, where both are given: vLLM's ``max_completion_tokens or max_tokens``); for
    ``transformers``, ``stop`` a list of non-empty strings (or absent), and the fields that change nothing there
    (checked above) left out. Raises :class:`ApiError`: everything is refused before anything is generated."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise _invalid(e) from None
    if request.model not in (None, name):
        raise ApiError(404, f"The model `{request.model}` does not exist; this server serves `{name}`.", "model")
    for i, m in enumerate(request.messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"messages[{i}].content is required (a string or a list of text parts)",
                           f"messages[{i}].content")
        if m.role == "tool" and not m.tool_call_id:
            raise ApiError(400, f"messages[{i}]: a tool message needs tool_call_id", f"messages[{i}].tool_call_id")
    for token, bias in (request.logit_bias or {}).items():
        if not (token.isascii() and token.isdigit() and len(token) <= MAX_DIGITS and int(token) < vocab):
            raise ApiError(400, f"logit_bias: {_short(token)!r} is not a token id of this model: the keys are token ids, "
                                f"0 to {vocab - 1}", "logit_bias")
        if not -100 <= bias <= 100:
            raise ApiError(400, f"logit_bias: the bias of token {token} is {bias:g}; a bias lies in [-100, 100]",
                           "logit_bias")
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.", "stream_options")  # vLLM's words
    ignored = unsupported(request, backend)
    if ignored:
        raise ApiError(400, f"not supported by this server ({backend} backend): {', '.join(ignored)}; leave "
                            f"{'it' if len(ignored) == 1 else 'them'} out, or serve with vLLM on a GPU", ignored[0])
    out = {k: v for k, v in body.items() if v is not None}
    if request.temperature is not None and request.temperature < GREEDY_BELOW:
        out["temperature"] = 0.0  # as vLLM: greedy (dividing the logits by 1e-300 gives inf, and sampling fails)
    tokens = out.pop("max_completion_tokens", None)
    if tokens is not None:
        out["max_tokens"] = tokens  # the newer name wins (vLLM: max_completion_tokens or max_tokens): checked and generated
    if backend == "llamacpp":
        return out
    # one list of non-empty strings; none at all (lm-evaluation-harness sends []) means no stop string
    stops = [s for s in ([request.stop] if isinstance(request.stop, str) else request.stop or []) if s]
    out.pop("stop", None)
    if stops:
        out["stop"] = stops
    for key in ("n", "user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice", "logprobs",
                "top_logprobs", "response_format", "presence_penalty", "frequency_penalty"):
        out.pop(key, None)  # checked above: none of them changes this reply
    return out


def context_check(body: dict, prompt_tokens: int, limit: int | None, default_new_tokens: int | None = None) -> dict:
    """``body`` with ``max_tokens`` set when it is missing: the room the context leaves (as vLLM), at most the
    model's own ``default_new_tokens`` where its generation config sets one. A 400 naming both numbers when the
    prompt and the completion do not fit in ``limit`` tokens (``None``: unknown, nothing to check)."""
    asked = body.get("max_tokens")
    if limit is None:
        if asked is None and default_new_tokens is None:
            raise ApiError(400, "max_tokens is required: this model's context length is unknown", "max_tokens")
        return {**body, "max_tokens": asked or default_new_tokens}
    if asked is None:
        room = limit - prompt_tokens
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your messages "
                                f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
                           "messages")
        return {**body, "max_tokens": min(default_new_tokens or room, room)}
    if prompt_tokens + asked > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the "
                            "completion). Please reduce the length of the messages or completion.",
                       "messages" if prompt_tokens >= limit else "max_tokens")
    return body


# --------------------------------------------------------------------------- the queue


class Gate:
    """Who may generate now: ``slots`` requests at once, at most ``max_queue`` more waiting (``None``: no
    limit) for at most ``timeout`` seconds each."""

    def __init__(self, slots: int, max_queue: int | None, timeout: float | None):
        self.slots, self.max_queue, self.timeout = slots, max_queue, timeout
        self._free = asyncio.Semaphore(slots)
        self.waiting = 0
        self._seconds = 1.0  # a running mean of how long a request holds a slot: Retry-After's estimate

    def retry_after(self) -> int:
        return max(1, math.ceil(self._seconds * (self.waiting + 1) / self.slots))

    async def enter(self, disconnected) -> float:
        """Wait for a slot; returns the time it was taken. ``disconnected``: an async callable, true once the
        client hung up (checked while waiting)."""
        if self.max_queue is not None and self.waiting >= self.max_queue and self._free.locked():
            raise ApiError(429, f"{self.waiting} requests are already waiting for the model (serve.max_queue = "
                                f"{self.max_queue}); retry after {self.retry_after()} s",
                           headers={"Retry-After": str(self.retry_after())})
        self.waiting += 1
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        # one acquire, kept while its client is checked on: it keeps its place in the semaphore's line (first come,
        # first served); cancelling and acquiring again each second would send it to the back every time
        acquire = asyncio.ensure_future(self._free.acquire())
        try:
            while True:
                done, _ = await asyncio.wait({acquire}, timeout=1.0)
                if done:
                    return time.monotonic()
                if await disconnected():
                    raise ConnectionAbortedError("the client hung up while waiting")
                if deadline is not None and time.monotonic() > deadline:
                    raise ApiError(503, f"the request waited {self.timeout:.0f} s for the model "
                                        f"(serve.request_timeout) behind {self.waiting - 1} others; retry later",
                                   headers={"Retry-After": str(self.retry_after())})
        except BaseException:
            if acquire.done() and not acquire.cancelled():
                self._free.release()  # the slot came as this request gave up: pass it on
            else:
                acquire.cancel()
            raise
        finally:
            self.waiting -= 1

    def leave(self, since: float) -> None:
        self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - since)
        self._free.release()


# --------------------------------------------------------------------------- streams


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first of the ``stops`` (which OpenAI's API leaves out), and whether one was found."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


class StopCutter:
    """Streamed text with the stop strings left out: text that could be the start of a stop string is held
    back until the next piece shows whether it is one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """What may be sent now, and whether a stop string ended the reply."""
        text = self.held + text
        cut, found = cut_at_stop(text, self.stops)
        if found:
            self.held = ""
            return cut, True
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def _event(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# --------------------------------------------------------------------------- what every backend's app gets


class _Front:
    """ASGI middleware, the outermost: the key on every path but ``/health`` (when one is set), every path not in
    :data:`OFFERED` answered 404 (an allow-list: a backend's other routes, llama-cpp-python's raw completions among
    them, are never reached), and an exception of the app answered here. starlette's own answer to an exception (an
    ``exception_handler(Exception)``) sends the 500 and raises again, and uvicorn then closes the keep-alive
    connection, so the client's next request on it fails; here the 500 is sent in the OpenAI shape, the traceback
    logged, and the connection stays usable. An error after a stream began ends it with an error event and
    ``data: [DONE]``. A plain ASGI middleware, not starlette's ``BaseHTTPMiddleware``: behind that one a handler's
    ``Request.is_disconnected`` never sees its client leave, so a plain reply would generate to the end for nobody."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        path = scope["path"]
        given = dict(scope["headers"]).get(b"authorization", b"")  # ASGI header names are lower case
        refused = None
        if self.key and path not in OPEN_PATHS and not secrets.compare_digest(given, f"Bearer {self.key}".encode()):
            refused = (401, "missing or wrong API key")
        elif path not in OFFERED:
            refused = (404, f"{path} is not offered by this server: use {CHAT} (and /v1/models)")
        if refused:
            return await JSONResponse(openai_error(*refused), status_code=refused[0])(scope, receive, send)
        state = {"start": None, "ended": False}

        async def sending(message):
            if message["type"] == "http.response.start":
                state["start"] = message
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:  # noqa: BLE001 - answered in the OpenAI shape and logged with its traceback
            log.error("unexpected error on %s", path, exc_info=exc)
            message = f"the server failed on this request ({type(exc).__name__}); its log has the traceback"
            if state["start"] is None:
                return await JSONResponse(openai_error(500, message), status_code=500)(scope, receive, send)
            if state["ended"]:
                return None  # the reply was whole before the failure: nothing to add
            if b"text/event-stream" not in dict(state["start"]["headers"]).get(b"content-type", b""):
                raise  # a plain reply cut short: only closing the connection says so
            tail = (_event(openai_error(500, message)) + "data: [DONE]\n\n").encode()
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        return None


def _guarded(app, key: str | None):
    """The app with every path but ``/health`` behind the key (when one is set), every path not offered answered 404,
    and every error in the OpenAI API's shape (an unexpected one too: 500, logged), the connection kept
    (:class:`_Front`)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error_response(status, message, param=None, headers=None):
        return JSONResponse(openai_error(status, message, param), status_code=status, headers=headers)

    app.add_middleware(_Front, key=key)  # added last, so it runs first

    @app.exception_handler(HTTPException)
    async def as_openai_error(request, exc):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc):
        return error_response(400, f"the request body is not a JSON object: {exc.errors()[0]['msg']}")

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    return app


MAX_DEPTH = 64  # JSON nesting a request may have (a chat request needs 6; a tool's parameter schema a few more)
MAX_DIGITS = 20  # digits an integer in a request may have (an int64 has 19 and a sign): no int() of 5,000 digits


class _Refused(str):
    """A literal that ``json.loads`` hands over as it is, refused by :func:`_read_body` with its field's name."""

    reason = ""


class _LongInteger(_Refused):
    reason = f"an integer of more than {MAX_DIGITS} digits"


class _Constant(_Refused):
    reason = "NaN or Infinity, which JSON does not have"


def _integer(text: str):
    return _LongInteger(text) if len(text.lstrip("-")) > MAX_DIGITS else int(text)


def _read_body(raw: bytes):
    """The request body as JSON, refused (400) where it is not valid JSON, is nested deeper than :data:`MAX_DEPTH`,
    holds an integer of more than :data:`MAX_DIGITS` digits, NaN or Infinity, or a string no UTF-8 can carry (a lone
    surrogate, ``"\\ud800"``): each named by its field, before anything reads it."""
    try:
        body = json.loads(raw, parse_int=_integer, parse_constant=_Constant)
    except RecursionError:
        raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    stack = [(body, (), 1)]  # without recursion: the depth is what is checked
    while stack:
        value, loc, depth = stack.pop()
        param = param_of(loc)
        if isinstance(value, _Refused):
            raise ApiError(400, f"{param or 'body'}: {value.reason} ({_short(value)})", param)
        if isinstance(value, str):
            _utf8(value, param)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_DEPTH:
            raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels (at {param})", param)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _utf8(key, param)
            stack.append((item, (*loc, key), depth + 1))
    return body


def _short(text: str, most: int = 24) -> str:
    """``text`` as an error message quotes it: its first ``most`` characters."""
    return text if len(text) <= most else text[:most] + "..."


def _utf8(text: str, param: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param or 'body'}: a string with a lone surrogate ({text[e.start:e.end]!a}), which no "
                            "UTF-8 text can hold", param) from None


# --------------------------------------------------------------------------- the transformers server (serve.backend transformers)

# apply_chat_template's own parameters, and the variables it gives every template itself (with the tokenizer's special
# tokens): a request's chat_template_kwargs are the template's other variables, never these
TEMPLATE_PARAMETERS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                       "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                       "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "messages"}


def text_message(message: dict) -> dict:
    """``message`` with its content as one string: text parts joined by newlines, as vLLM joins them."""
    if not isinstance(message.get("content"), list):
        return message
    return {**message, "content": "\n".join(part["text"] for part in message["content"])}


def template_message(message: dict) -> dict:
    """A validated request message as chat templates read it: text parts joined by newlines (as vLLM joins
    them), a tool call's JSON arguments as a dict."""
    out = {k: v for k, v in text_message(message).items() if v is not None and k != "tool_calls"}
    if message.get("tool_calls"):
        calls = []
        for call in message["tool_calls"]:
            try:
                arguments = json.loads(call["function"]["arguments"])
            except json.JSONDecodeError:
                arguments = call["function"]["arguments"]
            calls.append({"id": call["id"], "type": "function",
                          "function": {"name": call["function"]["name"], "arguments": arguments}})
        out["tool_calls"] = calls
    return out


class Engine:
    """One model on transformers' public API: its chat template (:meth:`prompt`), its context (``limit``), and
    generation (:meth:`start`) on one worker thread, so requests generate one at a time, in the order the
    :class:`Gate` lets them in."""

    def __init__(self, model, tokenizer, max_model_len: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.model, self.tokenizer = model, tokenizer
        self.limit = max_model_len or getattr(model.config, "max_position_embeddings", None)
        self.vocab = model.get_output_embeddings().weight.shape[0]  # the token ids it scores: logit_bias's keys
        self.default_new_tokens = model.generation_config.max_new_tokens  # None: the room left, as vLLM
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.created = int(time.time())

    @classmethod
    def load(cls, model_dir: str, dtype: str = "auto", device: str = "cpu", max_model_len: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
        return cls(model.to(device).eval(), tokenizer, max_model_len)

    def prompt(self, body: dict) -> list[int]:
        """The token ids the model reads for the request: its messages through the model's chat template, with
        the assistant's turn opened. Tokenized once: the context check and generation both use these."""
        from jinja2 import TemplateError

        variables = body.get("chat_template_kwargs") or {}
        reserved = sorted((TEMPLATE_PARAMETERS | set(self.tokenizer.special_tokens_map)) & set(variables))
        if reserved:
            raise ApiError(400, f"chat_template_kwargs: {', '.join(reserved)} is set by the server, not by a request",
                           "chat_template_kwargs")
        try:
            ids = self.tokenizer.apply_chat_template([template_message(m) for m in body["messages"]],
                                                     add_generation_prompt=True, tokenize=True, return_dict=True,
                                                     **variables)["input_ids"]
        except TemplateError as e:  # what the request put in the template, not a server fault
            raise ApiError(400, f"the model's chat template cannot render this request: {e}", "messages") from None
        return list(ids)

    def generation_config(self, body: dict):
        """The model's own generation config, changed by what the request sets: ``temperature`` 0 is greedy and
        above 0 samples, whatever the config says (an unset temperature leaves the model's choice, as vLLM does),
        ``top_p``, ``stop`` (as ``stop_strings``), ``logit_bias`` (as a bias on single tokens)."""
        import copy

        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = body["max_tokens"]
        temperature = body.get("temperature")
        if temperature is not None:
            config.do_sample = temperature > 0  # check_request made one below GREEDY_BELOW 0
            if temperature > 0:
                config.temperature = temperature
        if body.get("top_p") is not None:
            config.top_p = body["top_p"]
        if not config.do_sample:  # greedy: sampling settings mean nothing (and transformers would warn about them)
            config.temperature = config.top_p = config.top_k = None
        config.stop_strings = body.get("stop") or None
        if body.get("logit_bias"):
            config.sequence_bias = {(int(token),): float(bias) for token, bias in body["logit_bias"].items()}
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
                next(iter(sorted(self.eos)), None)
        return config

    def start(self, ids: list[int], body: dict) -> Generation:
        """Start generating the reply to ``body`` (checked, with ``max_tokens`` set) on the worker thread."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) \
            if body.get("stream") else None
        run = Generation(self, ids, body, streamer)
        run.job = self.worker.submit(self._generate, run, self.generation_config(body))
        run.done = asyncio.wrap_future(run.job)
        return run

    def _generate(self, run: Generation, config) -> list[int]:
        import torch
        from transformers import StoppingCriteriaList

        try:
            with torch.inference_mode():
                if run.body.get("seed") is not None:
                    torch.manual_seed(run.body["seed"])
                ids = torch.tensor([run.ids], device=self.model.device)
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                          streamer=run.streamer, stopping_criteria=StoppingCriteriaList([_gone(run)]),
                                          tokenizer=self.tokenizer if config.stop_strings else None)
            return out[0, len(run.ids):].tolist()
        except BaseException:
            if run.streamer is not None:
                run.streamer.end()  # the reader is not left waiting for text that will not come
            raise

    def text(self, new_ids: list[int]) -> str:
        return self.tokenizer.decode(new_ids, skip_special_tokens=True)

    def finish_reason(self, new_ids: list[int], max_tokens: int, stopped: bool) -> str:
        """``stop`` for a stop string or an end-of-sequence token, ``length`` for a reply cut at ``max_tokens``."""
        if stopped or (new_ids and new_ids[-1] in self.eos):
            return "stop"
        return "length" if len(new_ids) >= max_tokens else "stop"


def _gone(run: Generation):
    """A stopping criterion that ends the generation once ``run`` is cancelled (its client left)."""
    import torch
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), run.cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

    return Cancelled()


class Generation:
    """One request's generation: ``done`` (an asyncio future of the new token ids), its text as it comes
    (:meth:`pieces`, when streamed), and :meth:`cancel`. ``job`` is the worker's own future: done only once the
    worker thread has let go of the request (finished, failed, or cancelled before it began); an awaiter of
    ``done`` that is cancelled (its client left) cancels ``done`` at once, while the worker may still run."""

    def __init__(self, engine: Engine, ids: list[int], body: dict, streamer=None):
        import threading

        self.engine, self.ids, self.body, self.streamer = engine, ids, body, streamer
        self.cancelled = threading.Event()
        self.job = None  # a concurrent.futures.Future
        self.done: asyncio.Future | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    async def pieces(self):
        loop = asyncio.get_running_loop()
        while True:
            piece = await loop.run_in_executor(None, next, self.streamer, None)
            if piece is None:
                return
            if piece:
                yield piece


def completion(name: str, text: str, finish: str, prompt: int, completion_tokens: int) -> dict:
    """A chat completion in the OpenAI API's shape."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                      "total_tokens": prompt + completion_tokens}}


async def reply(engine: Engine, run: Generation, name: str, disconnected) -> dict:
    """The whole reply, once generated; a client that hangs up meanwhile cancels the generation."""
    try:
        while not run.done.done():
            await asyncio.wait({run.done}, timeout=1.0)
            if not run.done.done() and await disconnected():
                run.cancel()
    except asyncio.CancelledError:
        run.cancel()  # the handler itself was cancelled: nobody will read the reply
        raise
    new_ids = run.done.result()
    text, found = cut_at_stop(engine.text(new_ids), run.body.get("stop") or [])
    finish = engine.finish_reason(new_ids, run.body["max_tokens"], found)
    return completion(name, text, finish, len(run.ids), len(new_ids))


async def stream(engine: Engine, run: Generation, name: str):
    """The reply as server-sent events, as vLLM sends them: a first chunk with the role, the text as it comes
    (stop strings left out: text that could start one is held back), a last chunk with the finish reason, usage
    when ``stream_options.include_usage`` asks for it, then ``data: [DONE]``. An error after the first byte is
    an error event. Leaving early (a stop string, a client that hangs up) cancels the generation."""
    stops = run.body.get("stop") or []
    cutter = StopCutter(stops) if stops else None
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": name}
    chunk = lambda delta, finish=None: {**head, "choices": [  # noqa: E731
        {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    found = False
    try:
        yield _event(chunk({"role": "assistant", "content": ""}))
        async for piece in run.pieces():
            text, found = cutter.feed(piece) if cutter else (piece, False)
            if text:
                yield _event(chunk({"content": text}))
            if found:
                run.cancel()
                break
        if cutter and not found and cutter.held:
            yield _event(chunk({"content": cutter.flush()}))
        try:
            new_ids = await run.done
        except Exception as e:  # noqa: BLE001 - sent to the client as an error event, and logged
            log.exception("the generation failed after the stream started")
            yield _event(openai_error(500, f"the generation failed: {e}"))
            yield "data: [DONE]\n\n"
            return
        yield _event(chunk({}, engine.finish_reason(new_ids, run.body["max_tokens"], found)))
        if (run.body.get("stream_options") or {}).get("include_usage"):
            n = len(new_ids)
            yield _event({**head, "choices": [], "usage": {"prompt_tokens": len(run.ids), "completion_tokens": n,
                                                           "total_tokens": len(run.ids) + n}})
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()  # a client that hung up (or a stop string) ends the generation; after the end, nothing


def app_for(engine: Engine, name: str, key: str | None, settings: dict):
    """The transformers backend's app: ``/health``, ``/v1/models`` and ``/v1/chat/completions`` for ``engine``'s
    model under ``name``, each chat request checked (:func:`check_request`, :func:`context_check`) and queued
    (:class:`Gate`: one generates, ``serve.max_queue`` wait, each at most ``serve.request_timeout`` s)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title=f"medqa-zh server: {name}")
    gate = app.state.gate = Gate(1, settings["max_queue"], settings["request_timeout"])

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": engine.created,
                                            "owned_by": "medqa-zh", "max_model_len": engine.limit}]}

    async def chat(request: Request):
        body = check_request(_read_body(await request.body()), name, engine.vocab)
        ids = engine.prompt(body)
        body = context_check(body, len(ids), engine.limit, engine.default_new_tokens)
        try:
            since = await gate.enter(request.is_disconnected)
        except ConnectionAbortedError:
            return JSONResponse(openai_error(400, "the client hung up"), status_code=400)
        try:
            run = engine.start(ids, body)
        except BaseException:
            gate.leave(since)
            raise

        loop = asyncio.get_running_loop()

        def release(job) -> None:  # on the worker thread, once it has let go of this request, however it ended
            try:  # not when `done` is cancelled: the worker may still run
                loop.call_soon_threadsafe(gate.leave, since)
            except RuntimeError:  # the request's loop has closed: nothing runs on it, so the slot is given back here
                gate.leave(since)
            if not job.cancelled() and job.exception() is not None:
                log.error("a generation failed", exc_info=job.exception())

        run.job.add_done_callback(release)
        run.done.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: logged above
        if body.get("stream"):
            return StreamingResponse(stream(engine, run, name), media_type="text/event-stream")
        return JSONResponse(await reply(engine, run, name, request.is_disconnected))

    chat.__annotations__["request"] = Request  # the class, not the name: this module's future annotations are strings
    app.add_api_route(CHAT, chat, methods=["POST"])
    return _guarded(app, key)


def main(args_json: str) -> None:
    """Runs in the child: the transformers backend's server for one model under its served name (the model
    loaded before the server answers ``/health``)."""
    args = json.loads(args_json)
    key = os.environ.pop(API_KEY_ENV, None)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.info("loading %s (%s, %s)", args["model"], args["dtype"], args["device"])
    engine = Engine.load(args["model"], args["dtype"], args["device"], args["max_model_len"])
    app = app_for(engine, args["served_name"], key, args)
    uvicorn.run(app, host=args["host"], port=args["port"], log_level="info")


# --------------------------------------------------------------------------- the llama.cpp server (serve.backend llamacpp)


def cores() -> int:
    """The CPU cores this process may use (its affinity: what a container or ``taskset`` allows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def llama_model_params(extra_buffers: bool):
    """While the block runs, llama-cpp-python loads models with llama.cpp's ``use_extra_bufts = extra_buffers``
    (which its ``Llama`` constructor does not take): the repacked CPU weights (AMX, ...), which crash in the first
    batched product of a quantized model on CPUs with AMX (llama.cpp issue #20824; llama.cpp's ``--no-repack``)."""
    from llama_cpp import llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_buffers
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def llama_prompt_tokens(llm, messages: list[dict], add_generation_prompt: bool = True, tools=None) -> list[int]:
    """The token ids llama-cpp-python's server feeds the model for ``messages``: the GGUF's embedded chat
    template (``tokenizer.chat_template``) rendered by its ``Jinja2ChatFormatter``, tokenized by the GGUF's
    tokenizer with special tokens parsed, after a BOS token only where the GGUF's tokenizer adds one. ``llm``: a
    ``llama_cpp.Llama`` (``vocab_only=True`` is enough). A template the request breaks is a 400."""
    from jinja2 import TemplateError
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF has no tokenizer.chat_template: export it from a folder whose tokenizer has one")
    text = lambda token: llm.detokenize([token], special=True).decode("utf-8", "replace") if token != -1 else ""  # noqa: E731
    formatter = Jinja2ChatFormatter(template=template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()),
                                    add_generation_prompt=add_generation_prompt)
    try:
        prompt = formatter(messages=messages, tools=tools).prompt
    except TemplateError as e:
        raise ApiError(400, f"the model's chat template cannot render this request: {e}", "messages") from None
    bos = llm.tokenize(b"", add_bos=True, special=True)  # [BOS] where the tokenizer adds one, else []
    return bos + llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)


class _CheckedChat:
    """ASGI middleware: the body of every ``POST /v1/chat/completions`` is read, checked (:func:`check_request`,
    llama.cpp's list of fields it would ignore, :func:`context_check` on the prompt's tokens, counted with
    ``vocab``, a vocabulary-only ``Llama`` of the same GGUF) and handed on as llama-cpp-python takes it: text parts
    joined into one string (:func:`text_message`; its own request model takes strings only), ``stream_options``
    answered here (:class:`_StreamUsage`); a bad one is answered here, in the OpenAI shape."""

    def __init__(self, app, name: str, vocab, n_ctx: int):
        self.app, self.name, self.vocab, self.n_ctx = app, name, vocab, n_ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CHAT or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        raw, more = b"", True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            body = check_request(_read_body(raw), self.name, self.vocab.n_vocab(), backend="llamacpp")
            body["messages"] = [llama_message(m) for m in body["messages"]]
            prompt = llama_prompt_tokens(self.vocab, body["messages"], tools=body.get("tools"))
            body = context_check(body, len(prompt), self.n_ctx)  # llama-cpp-python itself would shorten max_tokens
            usage = (body.pop("stream_options", None) or {}).get("include_usage")
            body = llama_request(body)
        except ApiError as e:
            from starlette.responses import JSONResponse

            return await JSONResponse(openai_error(e.status, e.message, e.param), status_code=e.status)(scope, receive, send)
        if usage:
            send = _StreamUsage(send, self.vocab, len(prompt), body["max_tokens"])
        data = json.dumps(body).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(data)).encode())]}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # after the body: the client's disconnect
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}

        return await self.app(scope, replay, send)


def llama_message(message: dict) -> dict:
    """A validated request message as llama-cpp-python's request model takes it: text parts joined
    (:func:`text_message`), and no field set to null (its typed messages refuse ``"tool_calls": null``)."""
    return {k: v for k, v in text_message(message).items() if v is not None}


def llama_request(body: dict) -> dict:
    """``body`` (checked) as llama-cpp-python's server takes it: only the fields its request model has (the others,
    ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``, change no reply), validated against that model
    here. Its server answers a body its model refuses with a 500 (its route's error handler catches FastAPI's
    validation error); here such a body is a 400 naming the field (a ``tools`` entry that is not a function, a
    ``response_format`` llama.cpp does not have, ...)."""
    from llama_cpp.server.types import CreateChatCompletionRequest

    out = {k: v for k, v in body.items() if k in CreateChatCompletionRequest.model_fields}
    try:
        CreateChatCompletionRequest.model_validate(out)
    except ValidationError as e:
        error = _invalid(e)
        raise ApiError(400, f"{error.message} (as llama-cpp-python's server reads the request)", error.param) from None
    return out


class _StreamUsage:
    """The ASGI ``send`` of a llama.cpp stream that asked for ``stream_options.include_usage``: the chunks pass as
    they come, and before ``data: [DONE]`` comes a last chunk with no choices and the usage, as vLLM and OpenAI send
    it. llama-cpp-python's stream carries no token count, so the completion's tokens are ``max_tokens`` for a reply
    cut at the limit (``finish_reason: length``) and otherwise its text as the GGUF's tokenizer splits it: the tokens
    generated, wherever the model wrote its text as the tokenizer would split it (greedy decoding of a trained model
    does)."""

    def __init__(self, send, vocab, prompt_tokens: int, max_tokens: int):
        self.send, self.vocab, self.prompt, self.max_tokens = send, vocab, prompt_tokens, max_tokens
        self.pending, self.text, self.head, self.finish = b"", "", None, None

    async def __call__(self, message):
        if message["type"] != "http.response.body":
            return await self.send(message)
        self.pending += message.get("body", b"")
        *events, self.pending = self.pending.replace(b"\r\n", b"\n").split(b"\n\n")
        out = b""
        for event in events:
            data = event.removeprefix(b"data: ").strip()
            if data == b"[DONE]":
                out += _event(self.usage()).encode()
            elif event.startswith(b"data: "):
                self.read(json.loads(data))
            out += event + b"\n\n"
        more = message.get("more_body", False)
        if not more:
            out, self.pending = out + self.pending, b""
        return await self.send({**message, "body": out, "more_body": more})

    def read(self, chunk: dict) -> None:
        for choice in chunk.get("choices") or []:
            self.text += (choice.get("delta") or {}).get("content") or ""
            self.finish = choice.get("finish_reason") or self.finish
        if self.head is None and "id" in chunk:
            self.head = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}

    def usage(self) -> dict:
        if self.finish == "length":
            n = self.max_tokens
        else:
            n = len(self.vocab.tokenize(self.text.encode("utf-8"), add_bos=False, special=False)) if self.text else 0
        return {**(self.head or {"object": "chat.completion.chunk"}), "choices": [],
                "usage": {"prompt_tokens": self.prompt, "completion_tokens": n, "total_tokens": self.prompt + n}}


def llamacpp_main(args_json: str) -> None:
    """Runs in the child: llama-cpp-python's OpenAI-compatible server for one GGUF under its served name, with
    the same mending as the transformers child: the key on every path but ``/health`` (which answers once the
    model is loaded), OpenAI-shaped errors, the request checked against :class:`ChatCompletionRequest` and the
    fields it would ignore refused, the context enforced as vLLM enforces it (llama-cpp-python alone would shorten
    ``max_tokens`` silently); the endpoints this project does not use answered 404. Requests are answered
    one at a time, in order (llama-cpp-python's lock); none interrupts another."""
    args = json.loads(args_json)
    key = os.environ.pop(API_KEY_ENV, None)
    import uvicorn
    from llama_cpp import Llama
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    threads = args["threads"] or cores()
    model = ModelSettings(model=args["model"], model_alias=args["served_name"], n_ctx=args["n_ctx"], n_gpu_layers=0,
                          logits_all=False, verbose=False, n_threads=threads, n_threads_batch=threads)
    server = ServerSettings(host=args["host"], port=args["port"], interrupt_requests=False)
    with llama_model_params(args["extra_buffers"]):
        app = create_app(server_settings=server, model_settings=[model])  # loads the model
    vocab = Llama(model_path=args["model"], vocab_only=True, verbose=False)  # the prompt's tokens, for the checks
    app.add_middleware(_CheckedChat, name=args["served_name"], vocab=vocab, n_ctx=args["n_ctx"])
    app = _guarded(app, key)  # its key check is added last, so it runs first

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    uvicorn.run(app, host=args["host"], port=args["port"], log_level="info")
