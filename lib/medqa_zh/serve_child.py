"""What runs inside the transformers server's own process (``serve.start`` starts it with
``python -c "import medqa_zh.serve_child as s; s.main(args)"``): ``transformers serve``'s server,
pinned to one model under its served name, with what it does differently from the OpenAI API mended:

- an API-key check on every path but ``/health`` (the key comes through the environment);
- its model-management endpoints (``/load_model``, ``/reset``) turned off;
- errors in the OpenAI API's shape, which OpenAI clients read;
- another model name refused (404), request fields it would silently ignore refused (400), ``temperature``
  above 0 sampling, a ``stop`` string left out of a plain reply, and a stream ending with ``data: [DONE]``.

Nothing here runs in the notebook's process: ``serve`` holds the parent's side (start, check, stop).
"""
from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

API_KEY_ENV = "MEDQA_SERVE_API_KEY"  # the key reaches the child this way, so it does not show in `ps`
OPEN_PATHS = ("/health",)                 # answered without the key, as vLLM does
REFUSED_PATHS = ("/load_model", "/reset")  # transformers serve's model management: this server serves one model
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
               404: "NotFoundError", 422: "UnprocessableEntityError"}


def openai_error(status: int, message: str) -> dict:
    """An error body in the OpenAI API's shape (as vLLM sends it), which OpenAI clients read."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": None, "code": status}}


def unsupported(body: dict) -> list[str]:
    """The request fields the transformers backend would silently ignore although they change the reply:
    ``n`` > 1, ``logprobs``/``top_logprobs``, ``presence_penalty``, a ``response_format`` other than text."""
    checks = {"n": lambda v: v not in (None, 1), "logprobs": bool, "top_logprobs": bool,
              "presence_penalty": lambda v: v not in (None, 0), "response_format": lambda v: v not in (None, {"type": "text"})}
    return [key for key, bad in checks.items() if key in body and bad(body[key])]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first of the ``stops`` (which OpenAI's API leaves out), and whether one was found."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


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


def _openai_handlers(name: str) -> None:
    """What transformers serve's chat endpoint does differently from the OpenAI API, mended in place: another
    model name gets a 404, fields it would ignore get a 400 (:func:`unsupported`), ``temperature`` > 0 samples,
    a ``stop`` string is left out of a (non-streamed) reply, and a stream ends with ``data: [DONE]``."""
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.utils import BaseHandler

    build_config = BaseHandler._build_generation_config

    def build_generation_config(self, body, *args, **kwargs):
        config = build_config(self, body, *args, **kwargs)
        if body.get("temperature") is not None and float(body["temperature"]) > 0:
            config.do_sample = True  # else a model whose generation config lacks do_sample stays greedy
        return config

    handle = ChatCompletionHandler.handle_request

    async def handle_request(self, body, request_id):
        if body.get("model") not in (None, name):
            raise HTTPException(404, f"The model `{body['model']}` does not exist; this server serves `{name}`.")
        # one list of non-empty strings; none at all (lm-evaluation-harness sends []) would fail transformers' setup
        stops = [s for s in ([body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop") or []) if s]
        body.pop("stop", None)
        if stops:
            body["stop"] = stops
        ignored = unsupported(body)
        if ignored:
            raise HTTPException(400, f"not supported by this server (transformers backend): {', '.join(ignored)}; "
                                     "leave them out, or serve with vLLM on a GPU")
        response = await handle(self, body, request_id)
        if body.get("stream"):
            response.body_iterator = _then_done(response.body_iterator)
        elif body.get("stop") and isinstance(response, JSONResponse):
            reply = json.loads(response.body)
            for choice in reply.get("choices", []):
                text, found = cut_at_stop(choice["message"].get("content") or "", body["stop"])
                choice["message"]["content"] = text
                if found:
                    choice["finish_reason"] = "stop"
            response = JSONResponse(reply, status_code=response.status_code)
        return response

    BaseHandler._build_generation_config = build_generation_config
    ChatCompletionHandler.handle_request = handle_request


async def _then_done(chunks):
    try:
        async for chunk in chunks:
            yield chunk
        yield "data: [DONE]\n\n"
    finally:
        if hasattr(chunks, "aclose"):
            await chunks.aclose()  # a client that hung up stops the generation


def _guarded(app, key: str | None):
    """The app with every path but ``/health`` behind the key (when one is set), the model-management
    endpoints refused, and errors in the OpenAI API's shape."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.middleware("http")
    async def check_key(request, call_next):
        path = request.url.path
        given = request.headers.get("authorization", "")
        if key and path not in OPEN_PATHS and not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return JSONResponse(openai_error(401, "missing or wrong API key"), status_code=401)
        if path in REFUSED_PATHS:
            return JSONResponse(openai_error(403, f"{path} is turned off: this server serves one model"), status_code=403)
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def as_openai_error(request, exc):
        return JSONResponse(openai_error(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    return app


def main(args_json: str) -> None:
    """Runs in the child: ``transformers serve``'s own server (``transformers.cli.serve.Serve``), pinned
    to one model under its served name, with the key check, refusals and fixes above."""
    args = json.loads(args_json)
    key = os.environ.pop(API_KEY_ENV, None)
    from transformers.cli import serve as cli_serve
    from transformers.cli.serving import server as serving

    name = _name_by_link(args["model"], args.get("served_name") or args["model"])
    build = serving.build_server
    serving.build_server = lambda *a, **kw: _guarded(build(*a, **kw), key)
    _openai_handlers(name)
    cli_serve.Serve(force_model=name, host=args["host"], port=args["port"], device=args["device"],
                    dtype=args["dtype"], continuous_batching=args["continuous_batching"], log_level="info")
