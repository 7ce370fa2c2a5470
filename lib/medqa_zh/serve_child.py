"""What runs inside the transformers server's own process (``serve.start`` starts it with
``python -c "import medqa_zh.serve_child as s; s.main(args)"``): ``transformers serve``'s server,
pinned to one model under its served name, with what it does differently from the OpenAI API mended.

Every request to ``/v1/chat/completions`` goes through this module's own endpoint before it reaches
transformers' handler:

1. **The body is validated** against one request model written from the OpenAI API reference
   (:class:`ChatCompletionRequest`: required fields, types, roles, content as a string or text parts,
   ranges). Anything wrong is a 400 in the OpenAI error shape with the field in ``param``
   (``messages[0].role``); a field the API does not have is refused the same way.
2. **Fields this backend would silently ignore** although they change the reply are refused (400):
   :func:`unsupported`. Another model name is a 404.
3. **The context is enforced**: the prompt is tokenized with the model's chat template; prompt tokens +
   ``max_tokens`` above the context (``serve.max_model_len``, else the model's own) is a 400 naming both
   numbers, before anything is generated. A missing ``max_tokens`` is capped to what fits.
4. **A bounded queue** (:class:`Gate`): the model generates one request at a time (with continuous
   batching, up to ``max_queue`` together); at most ``max_queue`` more wait. Beyond that a request gets a
   429 with ``Retry-After``; one that waits longer than ``request_timeout`` gets a 503; one whose client
   hung up while waiting is dropped.
5. **Streams** stop before a ``stop`` string, as a plain reply does, end with ``data: [DONE]``, and report
   an error after the first byte as an error event; a client that hangs up stops its generation.

Besides: an API-key check on every path but ``/health``, transformers serve's model-management endpoints
(``/load_model``, ``/reset``) turned off, the endpoints this server does not offer answered 404, every
error (an unexpected one too: 500, logged with its traceback) in the OpenAI shape, and ``temperature``
above 0 sampling even where the model's generation config says greedy.

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
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

API_KEY_ENV = "MEDQA_SERVE_API_KEY"  # the key reaches the child this way, so it does not show in `ps`
OPEN_PATHS = ("/health",)                 # answered without the key, as vLLM does
REFUSED_PATHS = ("/load_model", "/reset")  # transformers serve's model management: this server serves one model
NOT_OFFERED = ("/v1/completions", "/v1/responses", "/v1/systemone", "/v1/audio/transcriptions")
CHAT = "/v1/chat/completions"
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
    seed: int | None = None
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


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}  # how pydantic names a union's branches


def param_of(loc: tuple) -> str | None:
    """A pydantic error location as the OpenAI API names a field: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _TYPE_TAGS and "[" not in part and part.isidentifier():
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
    """The fields this backend would silently ignore (or get wrong) although they change the reply.

    ``transformers``: ``n`` > 1, ``logprobs``/``top_logprobs``, ``presence_penalty`` ≠ 0, ``frequency_penalty`` ≤ -1
    (it becomes a repetition penalty of 1 + value, which must be positive), a ``response_format`` other than text,
    a ``tool_choice`` other than auto. ``llamacpp`` (llama-cpp-python's server): ``n`` > 1, ``logprobs``/
    ``top_logprobs`` (the server keeps no logits, to save memory), a ``tool_choice`` other than auto,
    ``chat_template_kwargs`` and ``stream_options`` (it has neither)."""
    checks = {"n": lambda v: v != 1, "logprobs": bool, "top_logprobs": bool, "tool_choice": lambda v: v != "auto"}
    if backend == "transformers":
        checks |= {"presence_penalty": lambda v: v != 0, "frequency_penalty": lambda v: v <= -1,
                   "response_format": lambda v: v.type != "text"}
    else:
        checks |= {"chat_template_kwargs": bool, "stream_options": lambda v: True}
    return [key for key, bad in checks.items() if getattr(request, key) is not None and bad(getattr(request, key))]


def check_request(body, name: str, backend: str = "transformers") -> dict:
    """The body of a chat request, validated (:class:`ChatCompletionRequest`, :func:`unsupported`, the served
    ``name``), as the ``backend``'s handler takes it: unset fields left out, ``stop`` a list of non-empty strings
    (or absent); for ``llamacpp``, ``max_completion_tokens`` as ``max_tokens`` (its name there). Raises
    :class:`ApiError`."""
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
        if not token.isdigit() or not -100 <= bias <= 100:
            raise ApiError(400, f"logit_bias: keys are token ids and values lie in [-100, 100], not {token!r}: {bias}",
                           "logit_bias")
    ignored = unsupported(request, backend)
    if ignored:
        raise ApiError(400, f"not supported by this server ({backend} backend): {', '.join(ignored)}; leave "
                            f"{'it' if len(ignored) == 1 else 'them'} out, or serve with vLLM on a GPU", ignored[0])
    out = {k: v for k, v in body.items() if v is not None}
    if backend == "llamacpp":
        tokens = out.pop("max_completion_tokens", None)
        if tokens is not None and "max_tokens" not in out:
            out["max_tokens"] = tokens
        return out
    # one list of non-empty strings; none at all (lm-evaluation-harness sends []) would fail transformers' setup
    stops = [s for s in ([request.stop] if isinstance(request.stop, str) else request.stop or []) if s]
    out.pop("stop", None)
    if stops:
        out["stop"] = stops
    for key in ("n", "stream_options", "user", "metadata", "store", "service_tier", "parallel_tool_calls",
                "tool_choice", "logprobs", "top_logprobs", "response_format", "presence_penalty"):
        out.pop(key, None)  # checked above; transformers' handler would only warn about them
    return out


def context_check(body: dict, prompt_tokens: int, limit: int | None, default_new_tokens: int) -> dict:
    """``body`` with ``max_tokens`` set to what fits when it is missing (the handler's own default, at most
    the room left); a 400 when the prompt and the completion do not fit in ``limit`` tokens."""
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is None:
        return body
    if asked is None:
        room = limit - prompt_tokens
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your messages "
                                f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
                           "messages")
        return {**body, "max_tokens": min(default_new_tokens, room)}
    if prompt_tokens + asked > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the "
                            "completion). Please reduce the length of the messages or completion.",
                       "messages" if prompt_tokens >= limit else
                       "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens")
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


def stream_events(upstream, stops: list[str], release):
    """The handler's SSE stream, mended: stop strings cut out (the reply then ends, its generation stopped),
    ``data: [DONE]`` at the end, an error after the first byte sent as an error event. The upstream is read by a
    task started here, so the slot is given back (``release``) when generation ends even if the client hangs up
    before the first byte; a client that hangs up later cancels the task, which stops the generation."""
    pieces: asyncio.Queue = asyncio.Queue()

    async def pump():
        try:
            async for piece in upstream:
                await pieces.put(piece)
            await pieces.put(None)
        except Exception as e:  # noqa: BLE001 - sent to the client as an error event, and logged
            log.exception("the stream failed after it started")
            await pieces.put(e)
        finally:
            try:
                if hasattr(upstream, "aclose"):
                    await upstream.aclose()  # stops the generation (transformers' streamer.cancel)
            finally:
                release()

    return _events(asyncio.create_task(pump()), pieces, stops)


async def _events(task, pieces: asyncio.Queue, stops: list[str]):
    cutter = StopCutter(stops) if stops else None
    last = None  # the latest chunk, a template for what this wrapper adds
    try:
        while True:
            piece = await pieces.get()
            if piece is None:
                break
            if isinstance(piece, Exception):
                yield _event(openai_error(500, f"the generation failed: {piece}"))
                yield "data: [DONE]\n\n"
                return
            for event in piece.split("\n\n"):
                if not event.strip():
                    continue
                data = event.removeprefix("data: ")
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    yield event + "\n\n"
                    continue
                if "error" in chunk:  # transformers' own error event: {"error": "text"}
                    error = chunk["error"]
                    yield _event(error if isinstance(error, dict) and "error" in error else
                                 openai_error(500, error if isinstance(error, str) else json.dumps(error)))
                    yield "data: [DONE]\n\n"
                    return
                last = chunk
                choice = (chunk.get("choices") or [{}])[0]
                delta = choice.get("delta") or {}
                if cutter is not None and choice.get("finish_reason") and cutter.held:
                    yield _event(_with(chunk, content=cutter.flush(), finish_reason=None, usage=None))
                if cutter is None or delta.get("content") is None:
                    yield _event(chunk)
                    continue
                text, found = cutter.feed(delta["content"])
                if text or not found:
                    yield _event(_with(chunk, content=text))
                if found:
                    yield _event(_with(chunk, content=None, finish_reason="stop"))
                    yield "data: [DONE]\n\n"
                    return
        if cutter is not None and cutter.held and last is not None:
            yield _event(_with(last, content=cutter.flush(), finish_reason=None, usage=None))
        yield "data: [DONE]\n\n"
    finally:
        task.cancel()  # a client that hung up (or a stop string) ends the generation


def _with(chunk: dict, content=..., finish_reason=..., usage=...) -> dict:
    out = json.loads(json.dumps(chunk))
    choice = out["choices"][0]
    if content is not ...:
        choice.setdefault("delta", {})
        if content is None:
            choice["delta"].pop("content", None)
        else:
            choice["delta"]["content"] = content
    if finish_reason is not ...:
        choice["finish_reason"] = finish_reason
    if usage is not ... and usage is None:
        out.pop("usage", None)
    return out


# --------------------------------------------------------------------------- the app


def _name_by_link(model: str, name: str) -> str:
    """transformers serve answers to the name it loaded its model by. To answer to ``name``, load the
    folder through a link called ``name`` in a fresh working folder (only this child process moves there)."""
    if name == model:
        return model
    work = Path(tempfile.mkdtemp(prefix="medqa-serve-name-"))
    link = work / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(model).expanduser().resolve(), target_is_directory=True)
    os.chdir(work)
    return name


def _sampling_fix() -> None:
    """``temperature`` > 0 samples, even where the model's generation config lacks ``do_sample``."""
    from transformers.cli.serving.utils import BaseHandler

    build_config = BaseHandler._build_generation_config

    def build_generation_config(self, body, *args, **kwargs):
        config = build_config(self, body, *args, **kwargs)
        if body.get("temperature") is not None and float(body["temperature"]) > 0:
            config.do_sample = True
        return config

    BaseHandler._build_generation_config = build_generation_config


def _prompt_tokens(handler, body: dict) -> tuple[int, object]:
    """How many tokens the chat template makes of the request's messages (as the handler will render them),
    and the model."""
    _, model, processor = handler._resolve_model(dict(body))
    modality = handler.model_manager.get_model_modality(model, processor=processor)
    messages = handler.get_processor_inputs_from_messages(body["messages"], modality)
    kwargs = {**handler.chat_template_kwargs, **body.get("chat_template_kwargs", {})}
    from jinja2 import TemplateError

    try:
        ids = processor.apply_chat_template(messages, add_generation_prompt=True, tools=body.get("tools"),
                                            tokenize=True, return_dict=True, **kwargs)["input_ids"]
    except TemplateError as e:  # what the request put in the template (a malformed tool, say), not a server fault
        raise ApiError(400, f"the model's chat template cannot render this request: {e}",
                       "tools" if body.get("tools") else "messages") from None
    return len(ids), model


def _guarded(app, key: str | None, chat_handler=None, name: str = "", settings: dict | None = None):
    """The app with every path but ``/health`` behind the key (when one is set), the model-management
    endpoints refused, the endpoints not offered answered 404, the chat endpoint replaced by :func:`chat`'s
    checks around transformers' handler, and every error in the OpenAI API's shape."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def error_response(status, message, param=None, headers=None):
        return JSONResponse(openai_error(status, message, param), status_code=status, headers=headers)

    @app.middleware("http")
    async def check_key(request, call_next):
        path = request.url.path
        given = request.headers.get("authorization", "")
        if key and path not in OPEN_PATHS and not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return error_response(401, "missing or wrong API key")
        if path in REFUSED_PATHS:
            return error_response(403, f"{path} is turned off: this server serves one model")
        if path in NOT_OFFERED:
            return error_response(404, f"{path} is not offered by this server: use {CHAT} (and /v1/models)")
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def as_openai_error(request, exc):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc):
        return error_response(400, f"the request body is not a JSON object: {exc.errors()[0]['msg']}")

    @app.exception_handler(ApiError)
    async def api_error(request, exc):
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return error_response(500, f"the server failed on this request ({type(exc).__name__}); its log has the "
                                   "traceback")

    if chat_handler is None:
        return app
    # one request generates at a time (transformers' inference thread is sequential); continuous batching
    # generates every admitted request together
    slots = (settings["max_queue"] or 2**31) if settings["continuous_batching"] else 1  # 2**31: no limit
    gate = Gate(slots, settings["max_queue"], settings["request_timeout"])

    async def chat(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        body = check_request(body, name)
        prompt, model = _prompt_tokens(chat_handler, body)
        limit = settings["max_model_len"] or getattr(model.config, "max_position_embeddings", None)
        body = context_check(body, prompt, limit, max(model.generation_config.max_new_tokens or 0, 1024))
        try:
            since = await gate.enter(request.is_disconnected)
        except ConnectionAbortedError:
            return JSONResponse(openai_error(400, "the client hung up"), status_code=400)
        try:
            response = await chat_handler.handle_request(body, request.state.request_id)
        except BaseException:
            gate.leave(since)
            raise
        if body.get("stream"):
            response.body_iterator = stream_events(response.body_iterator, body.get("stop") or [],
                                                   lambda: gate.leave(since))
            return response
        gate.leave(since)
        if body.get("stop") and isinstance(response, JSONResponse):
            reply = json.loads(response.body)
            for choice in reply.get("choices", []):
                text, found = cut_at_stop(choice["message"].get("content") or "", body["stop"])
                choice["message"]["content"] = text
                if found:
                    choice["finish_reason"] = "stop"
            response = JSONResponse(reply, status_code=response.status_code)
        return response

    chat.__annotations__["request"] = Request  # the class, not the name: this module's future annotations are strings
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != CHAT]
    app.add_api_route(CHAT, chat, methods=["POST"])
    return app


def main(args_json: str) -> None:
    """Runs in the child: ``transformers serve``'s own server (``transformers.cli.serve.Serve``), pinned
    to one model under its served name, with the key check, the request checks and the fixes above."""
    args = json.loads(args_json)
    key = os.environ.pop(API_KEY_ENV, None)
    from transformers.cli import serve as cli_serve
    from transformers.cli.serving import server as serving

    name = _name_by_link(args["model"], args.get("served_name") or args["model"])
    build = serving.build_server

    def build_server(*a, **kw):
        chat_handler = kw["chat_handler"] if "chat_handler" in kw else a[1]
        return _guarded(build(*a, **kw), key, chat_handler, name, args)

    serving.build_server = build_server
    _sampling_fix()
    cli_serve.Serve(force_model=name, host=args["host"], port=args["port"], device=args["device"],
                    dtype=args["dtype"], continuous_batching=args["continuous_batching"], log_level="info")


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


class _CheckedChat:
    """ASGI middleware: the body of every ``POST /v1/chat/completions`` is read, checked (:func:`check_request`,
    llama.cpp's list of fields it would ignore) and handed on as rewritten; a bad one is answered here, in the
    OpenAI shape."""

    def __init__(self, app, name: str):
        self.app, self.name = app, name

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CHAT or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        raw, more = b"", True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not valid JSON: {e}") from None
            body = check_request(body, self.name, backend="llamacpp")
        except ApiError as e:
            from starlette.responses import JSONResponse

            return await JSONResponse(openai_error(e.status, e.message, e.param), status_code=e.status)(scope, receive, send)
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


def llamacpp_main(args_json: str) -> None:
    """Runs in the child: llama-cpp-python's OpenAI-compatible server for one GGUF under its served name, with
    the same mending as the transformers child: the key on every path but ``/health`` (which answers once the
    model is loaded), OpenAI-shaped errors, the request checked against :class:`ChatCompletionRequest` and the
    fields it would ignore refused; the endpoints this project does not use answered 404. Requests are answered
    one at a time, in order (llama-cpp-python's lock); none interrupts another."""
    args = json.loads(args_json)
    key = os.environ.pop(API_KEY_ENV, None)
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    threads = args["threads"] or cores()
    model = ModelSettings(model=args["model"], model_alias=args["served_name"], n_ctx=args["n_ctx"], n_gpu_layers=0,
                          logits_all=False, verbose=False, n_threads=threads, n_threads_batch=threads)
    server = ServerSettings(host=args["host"], port=args["port"], interrupt_requests=False)
    with llama_model_params(args["extra_buffers"]):
        app = create_app(server_settings=server, model_settings=[model])  # loads the model
    app.add_middleware(_CheckedChat, name=args["served_name"])
    app = _guarded(app, key)  # its key check is added last, so it runs first

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    uvicorn.run(app, host=args["host"], port=args["port"], log_level="info")
