"""The CPU server's request checks, without a server: the validated request model, the context check, the
queue, the stream mender and the error shape (medqa_zh.serve_child). test_serve.py checks them on a live server."""
import asyncio
import contextlib
import json
import threading
import time

import pytest

from helpers import HOSTILE, OK, client_port, nested
from medqa_zh import serve_child as child

VOCAB = 1000  # the served model's token ids: 0 to 999


def check(body, backend="transformers"):
    return child.check_request(body, "m", VOCAB, backend=backend)


def refused(body, backend="transformers"):
    with pytest.raises(child.ApiError) as e:
        check(body, backend)
    return e.value


MALFORMED = [  # (what, body, status, param)
    ("a list, not an object", [OK], 400, None),
    ("no messages", {"model": "m"}, 400, "messages"),
    ("empty messages", {**OK, "messages": []}, 400, "messages"),
    ("messages not a list", {**OK, "messages": "hi"}, 400, "messages"),
    ("a message not an object", {**OK, "messages": ["hi"]}, 400, "messages[0]"),
    ("an unknown role", {**OK, "messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
    ("no role", {**OK, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("no content", {**OK, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("content a number", {**OK, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("an image part", {**OK, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     400, "messages[0].content[0].type"),
    ("a text part without text", {**OK, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, "messages[0].content[0].text"),
    ("a tool message without its call id", {**OK, "messages": [{"role": "tool", "content": "x"}]},
     400, "messages[0].tool_call_id"),
    ("an unknown message field", {**OK, "messages": [{"role": "user", "content": "x", "mood": 1}]},
     400, "messages[0].mood"),
    ("max_tokens 0", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens a string", {**OK, "max_tokens": "16"}, 400, "max_tokens"),
    ("max_tokens a float", {**OK, "max_tokens": 1.5}, 400, "max_tokens"),
    ("max_completion_tokens negative", {**OK, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("temperature below 0", {**OK, "temperature": -0.1}, 400, "temperature"),
    ("temperature above 2", {**OK, "temperature": 2.5}, 400, "temperature"),
    ("temperature a string", {**OK, "temperature": "0"}, 400, "temperature"),
    ("top_p 0", {**OK, "top_p": 0}, 400, "top_p"),
    ("top_p above 1", {**OK, "top_p": 1.5}, 400, "top_p"),
    ("stop a number", {**OK, "stop": 3}, 400, "stop"),
    ("stop a list of numbers", {**OK, "stop": [1]}, 400, "stop[0]"),
    ("stream a string", {**OK, "stream": "yes"}, 400, "stream"),
    ("seed a string", {**OK, "seed": "0"}, 400, "seed"),
    ("n 0", {**OK, "n": 0}, 400, "n"),
    ("presence_penalty out of range", {**OK, "presence_penalty": 3}, 400, "presence_penalty"),
    ("frequency_penalty out of range", {**OK, "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ("top_logprobs above 20", {**OK, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("logit_bias with a word for a key", {**OK, "logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ("logit_bias out of range", {**OK, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("logit_bias below the range", {**OK, "logit_bias": {"5": -100.5}}, 400, "logit_bias"),
    ("logit_bias an id beyond the vocabulary", {**OK, "logit_bias": {"99999999": 5}}, 400, "logit_bias"),
    ("logit_bias the first id past the vocabulary", {**OK, "logit_bias": {str(VOCAB): 5}}, 400, "logit_bias"),
    ("logit_bias a negative id", {**OK, "logit_bias": {"-1": 5}}, 400, "logit_bias"),
    ("seed beyond 64 bits", {**OK, "seed": 2**80}, 400, "seed"),
    ("seed just beyond int64", {**OK, "seed": 2**63}, 400, "seed"),
    ("seed below int64", {**OK, "seed": -2**63 - 1}, 400, "seed"),
    ("stream_options with stream false", {**OK, "stream": False, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("stream_options without stream", {**OK, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("response_format of an unknown type", {**OK, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("a field the API does not have", {**OK, "max_token": 16}, 400, "max_token"),
    ("transformers' own generation_config", {**OK, "generation_config": "{}"}, 400, "generation_config"),
    ("model not a string", {**OK, "model": 3}, 400, "model"),
    ("another model", {**OK, "model": "gpt-4o"}, 404, "model"),
    # accepted by the schema, but this backend would ignore them: refused too
    ("n above 1", {**OK, "n": 2}, 400, "n"),
    ("logprobs", {**OK, "logprobs": True}, 400, "logprobs"),
    ("presence_penalty", {**OK, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("frequency_penalty", {**OK, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("tools (no tool calls are parsed out of a reply)",
     {**OK, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("JSON mode", {**OK, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("tool_choice none", {**OK, "tool_choice": "none"}, 400, "tool_choice"),
]


@pytest.mark.parametrize("what, body, status, param", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_body_is_refused_naming_the_field(what, body, status, param):
    error = refused(body)
    assert (error.status, error.param) == (status, param), error.message
    shaped = child.openai_error(error.status, error.message, error.param)["error"]
    assert set(shaped) == {"message", "type", "param", "code"} and shaped["param"] == param


def test_a_good_body_passes_as_the_handler_takes_it():
    body = {**OK, "temperature": 0, "top_p": 1, "max_tokens": 8, "stop": ["\n", ""], "stream": True, "seed": 1,
            "n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {"12": -100},
            "response_format": {"type": "text"}, "user": "u", "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                         {"role": "assistant", "content": "a"}, {"role": "user", "content": "again"}]}
    out = check(body)
    assert out["stop"] == ["\n"] and out["logit_bias"] == {"12": -100} and out["stream_options"]["include_usage"]
    assert not {"n", "user", "presence_penalty", "frequency_penalty", "response_format"} & set(out)
    assert check({**OK, "max_completion_tokens": 5}) == {**OK, "max_tokens": 5}
    assert "stop" not in check({**OK, "stop": []})  # lm-evaluation-harness sends []
    assert check({**OK, "stop": "x"})["stop"] == ["x"]
    assert "model" in check(OK) and check({"messages": OK["messages"]})
    edges = {**OK, "logit_bias": {"0": -100, str(VOCAB - 1): 100}, "seed": -2**63}
    assert check(edges)["logit_bias"] == edges["logit_bias"] and check({**OK, "seed": 2**63 - 1})["seed"] == 2**63 - 1


def test_a_refused_logit_bias_names_the_token_and_the_range():
    beyond = refused({**OK, "logit_bias": {"99999999": 5}})
    assert "99999999" in beyond.message and f"0 to {VOCAB - 1}" in beyond.message, beyond.message
    strong = refused({**OK, "logit_bias": {"5": 101}})
    assert "101" in strong.message and "[-100, 100]" in strong.message, strong.message
    for backend in ("transformers", "llamacpp"):
        assert refused({**OK, "logit_bias": {"99999999": 5}}, backend).param == "logit_bias"
        assert refused({**OK, "seed": 2**80}, backend).param == "seed"
    assert "stream=True" in refused({**OK, "stream_options": {"include_usage": True}}).message  # as vLLM says it


@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_max_completion_tokens_wins_over_max_tokens(backend):
    both = {**OK, "max_tokens": 4, "max_completion_tokens": 2}
    out = check(both, backend)
    assert out["max_tokens"] == 2 and "max_completion_tokens" not in out  # the newer name first, as vLLM and OpenAI
    assert check({**OK, "max_tokens": 4}, backend)["max_tokens"] == 4
    # the context check counts the number that is generated: 2 fits, the 5000 that is not used does not matter
    assert child.context_check(check({**both, "max_tokens": 5000}, backend), 90, 100)["max_tokens"] == 2


def test_the_llamacpp_backend_refuses_what_llama_cpp_python_would_ignore_and_keeps_what_it_honours():
    for field, value in (("n", 2), ("logprobs", True), ("top_logprobs", 2), ("tool_choice", "none"),
                         ("chat_template_kwargs", {"enable_thinking": False})):
        with pytest.raises(child.ApiError) as e:
            check({**OK, field: value, "stream": True}, backend="llamacpp")
        assert e.value.status == 400 and e.value.param == field and "llamacpp backend" in e.value.message
    honoured = {**OK, "presence_penalty": 0.5, "frequency_penalty": -1.5, "response_format": {"type": "json_object"},
                "stop": "x", "max_completion_tokens": 7}
    out = check(honoured, backend="llamacpp")
    usage = {**OK, "stream": True, "stream_options": {"include_usage": True}}
    assert check(usage, backend="llamacpp")["stream_options"] == {"include_usage": True}  # _CheckedChat answers it
    assert out["presence_penalty"] == 0.5 and out["response_format"] == {"type": "json_object"}
    assert out["max_tokens"] == 7 and "max_completion_tokens" not in out  # llama-cpp-python's name for it
    assert check({**honoured, "max_tokens": 3}, backend="llamacpp")["max_tokens"] == 7  # the newer name wins
    with pytest.raises(child.ApiError):  # the transformers backend would get these wrong: refused there
        check({**OK, "presence_penalty": 0.5})


def test_the_context_is_enforced_and_a_missing_max_tokens_capped_to_what_fits():
    assert child.context_check({**OK, "max_tokens": 10}, 90, 100, 1024)["max_tokens"] == 10
    assert child.context_check(OK, 90, 100, 1024)["max_tokens"] == 10  # the room left
    assert child.context_check(OK, 10, 100_000, 1024)["max_tokens"] == 1024  # the model's own default, when it fits
    assert child.context_check(OK, 10, 100_000)["max_tokens"] == 99_990  # none: the room left, as vLLM
    with pytest.raises(child.ApiError, match=r"maximum context length is 100 tokens.*101 tokens \(90 in the "
                                             r"messages, 11 in the completion\)") as e:
        child.context_check({**OK, "max_tokens": 11}, 90, 100, 1024)
    assert (e.value.status, e.value.param) == (400, "max_tokens")
    with pytest.raises(child.ApiError) as e:
        child.context_check({**OK, "max_tokens": 5}, 120, 100, 1024)
    assert e.value.param == "messages"  # the prompt alone does not fit
    with pytest.raises(child.ApiError, match="your messages resulted in 100 tokens") as e:
        child.context_check(OK, 100, 100, 1024)
    assert e.value.param == "messages"
    assert child.context_check(OK, 10**6, None, 1024) == {**OK, "max_tokens": 1024}  # no known context: nothing to check
    with pytest.raises(child.ApiError, match="max_tokens is required"):
        child.context_check(OK, 10, None)


def test_the_gate_refuses_beyond_the_queue_and_times_out_a_long_wait():
    async def scenario():
        gate = child.Gate(slots=1, max_queue=1, timeout=1.0)
        never = asyncio.Event()

        async def connected():
            return never.is_set()

        first = await gate.enter(connected)  # generating
        waiting = asyncio.create_task(gate.enter(connected))
        await asyncio.sleep(0.05)
        with pytest.raises(child.ApiError) as full:
            await gate.enter(connected)
        assert full.value.status == 429 and int(full.value.headers["Retry-After"]) >= 1
        with pytest.raises(child.ApiError) as late:
            await waiting  # the slot stays taken past the timeout
        assert late.value.status == 503 and "serve.request_timeout" in late.value.message
        gate.leave(first)
        gate.leave(await gate.enter(connected))  # free again: the next one goes straight in
        assert gate.waiting == 0

    asyncio.run(scenario())


def test_the_gate_drops_a_request_whose_client_hung_up_while_waiting():
    async def scenario():
        gate = child.Gate(slots=1, max_queue=4, timeout=None)
        first = await gate.enter(lambda: asyncio.sleep(0, False))

        async def gone():
            return True

        with pytest.raises(ConnectionAbortedError):
            await gate.enter(gone)
        assert gate.waiting == 0
        gate.leave(first)

    asyncio.run(scenario())


@pytest.mark.parametrize("pieces, stops, sent, found", [
    (["ab", "cd", "ef"], ["cd"], "ab", True),
    (["ab", "c", "def"], ["cde"], "ab", True),  # the stop string split over pieces
    (["abc", "dx", "y"], ["cde"], "abcdxy", False),  # a held-back start that was no stop string after all
    (["答案：", "B", "\n解析"], ["\n"], "答案：B", True),
])
def test_a_streamed_reply_stops_before_its_stop_string(pieces, stops, sent, found):
    cutter, out, hit = child.StopCutter(stops), "", False
    for piece in pieces:
        text, hit = cutter.feed(piece)
        out += text
        if hit:
            break
    out += "" if hit else cutter.flush()
    assert (out, hit) == (sent, found)


class FakeRun:
    """What :func:`serve_child.stream` reads of a generation: text pieces, then the new token ids (or an error)."""

    def __init__(self, pieces, ids=None, error=None, **body):
        self.texts, self.ids, self.body, self.cancelled = pieces, [1, 2, 3], {"max_tokens": 8, **body}, False
        self.result, self.error = ids if ids is not None else list(range(len(pieces))), error

    def cancel(self):
        self.cancelled = True

    async def pieces(self):
        for text in self.texts:
            yield text

    @property
    def done(self):
        future = asyncio.get_running_loop().create_future()
        future.set_exception(self.error) if self.error else future.set_result(self.result)
        return future


class FakeEngine:
    def finish_reason(self, new_ids, max_tokens, stopped):
        return "stop" if stopped else "length"


def _events(run):
    async def scenario():
        return [e async for e in child.stream(FakeEngine(), run, "m")]

    data = [e.removeprefix("data: ").strip() for e in asyncio.run(scenario())]
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    return data, chunks, text


def test_a_stream_cuts_at_the_stop_string_ends_with_done_and_stops_the_generation():
    run = FakeRun(["答案", "：B", "\n解析", "更多"], stop=["\n"])
    data, chunks, text = _events(run)
    assert text == "答案：B" and chunks[-1]["choices"][0]["finish_reason"] == "stop" and data[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and run.cancelled
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["object"] == "chat.completion.chunk"


def test_held_back_text_is_sent_before_the_last_chunk():
    data, chunks, text = _events(FakeRun(["ab", "c"], stop=["cd"]))
    assert text == "abc" and chunks[-1]["choices"][0]["finish_reason"] == "length" and data[-1] == "[DONE]"


def test_an_error_after_the_stream_started_is_an_error_event():
    data, chunks, text = _events(FakeRun(["ab"], error=RuntimeError("the model fell over")))
    error = json.loads(data[-2])["error"]
    assert text == "ab" and error["code"] == 500 and "fell over" in error["message"] and data[-1] == "[DONE]"


def test_a_stream_ends_with_usage_when_asked():
    data, chunks, _ = _events(FakeRun(["a", "b"], ids=[7, 8, 9], stream_options={"include_usage": True}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                                                   "total_tokens": 6}
    assert "usage" not in _events(FakeRun(["a"]))[1][-1]


def test_a_request_message_as_the_chat_template_reads_it():
    parts = {"role": "user", "content": [{"type": "text", "text": "一"}, {"type": "text", "text": "二"}]}
    assert child.template_message(parts) == {"role": "user", "content": "一\n二"}
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
    assert child.template_message(call)["tool_calls"][0]["function"]["arguments"] == {"x": 1}


def test_an_unexpected_error_is_a_500_in_openai_shape_and_the_app_goes_on():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.post(child.CHAT)
    def boom():
        raise KeyError("something the server did not expect")

    @app.get("/v1/models")
    def fine():
        return {"ok": True}

    # the exception is answered, not raised on (the test client would raise it, as uvicorn would close the connection)
    client = TestClient(child._guarded(app, key="k"), raise_server_exceptions=True)
    assert client.get("/v1/models").status_code == 401  # no key
    headers = {"Authorization": "Bearer k"}
    r = client.post(child.CHAT, headers=headers)
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
    assert "KeyError" in r.json()["error"]["message"]
    assert client.get("/v1/models", headers=headers).json() == {"ok": True}
    for path in ("/v1/completions", "/v1/engines/copilot-codex/completions", "/boom"):  # only what is offered
        assert client.post(path, headers=headers, json={}).json()["error"]["code"] == 404


def test_the_gate_serves_the_waiting_in_the_order_they_came():
    async def scenario():
        gate = child.Gate(slots=1, max_queue=10, timeout=None)

        async def connected():
            return False

        first = await gate.enter(connected)
        order = []

        async def client(i):
            since = await gate.enter(connected)
            order.append(i)
            await asyncio.sleep(0.01)
            gate.leave(since)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(client(i)))
            await asyncio.sleep(0.3)  # each waits across the gate's 1-second checks on its client
        await asyncio.sleep(1.5)
        gate.leave(first)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- the apps, in this process (no server)


@pytest.fixture(scope="module")
def engine(tiny_assets):
    return child.Engine.load(str(tiny_assets["model"]), "float32")


def _asgi(app, body: dict | bytes, hang_up: asyncio.Event | None = None):
    """``POST /v1/chat/completions`` straight into the ASGI ``app``, as uvicorn calls it (ASGI spec 2.3), with
    ``body`` as JSON (or these bytes); the client hangs up once ``hang_up`` is set. Returns the status and the body's
    bytes."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": child.CHAT, "raw_path": child.CHAT.encode(),
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    sent, out = False, {"status": None, "body": b""}

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            return {"type": "http.request", "body": raw, "more_body": False}
        await (hang_up or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    async def call():
        await app(scope, receive, send)
        return out["status"], out["body"]

    return call()


async def _until(condition, within=30.0):
    """Wait for ``condition()`` (a state the code reaches, not a time), failing after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the server never got there"
        await asyncio.sleep(0.01)


def test_the_transformers_app_refuses_before_it_generates(engine):
    """The served model's own vocabulary bounds logit_bias: a 400 on the app, streamed or not, and nothing started."""
    app = child.app_for(engine, "m", None, {"max_queue": 4, "request_timeout": None})
    vocab = engine.vocab
    assert vocab == engine.model.get_output_embeddings().weight.shape[0]
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}

    async def scenario():  # one event loop for every request, as uvicorn has
        for bad, param in (({"logit_bias": {str(vocab): 5}}, "logit_bias"),
                           ({"logit_bias": {"99999999": 5}, "stream": True}, "logit_bias"),
                           ({"seed": 2**80}, "seed"), ({"seed": 2**80, "stream": True}, "seed"),
                           ({"stream_options": {"include_usage": True}}, "stream_options"),
                           ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
                           ({"chat_template_kwargs": {"eos_token": "x"}}, "chat_template_kwargs")):
            status, raw = await _asgi(app, {**base, **bad})
            error = json.loads(raw)["error"]
            assert (status, error["param"], error["code"]) == (400, param, 400), (bad, raw)
        status, raw = await _asgi(app, {**base, "logit_bias": {str(vocab - 1): 5}, "seed": 2**63 - 1})
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2, raw

    asyncio.run(scenario())


def test_max_completion_tokens_over_max_tokens_generates_at_most_that_many(engine):
    async def scenario():  # one event loop for every request, as uvicorn has
        app = child.app_for(engine, "m", None, {"max_queue": 4, "request_timeout": None})
        base = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}

        async def usage(body):
            return json.loads((await _asgi(app, {**base, **body}))[1])["usage"]

        assert (await usage({"max_tokens": 4}))["completion_tokens"] == 4  # the tiny model does write 4 tokens
        assert (await usage({"max_tokens": 4, "max_completion_tokens": 2}))["completion_tokens"] <= 2
        # the context check counts the same number: a max_tokens beyond the context does not matter
        assert (await usage({"max_tokens": engine.limit + 1, "max_completion_tokens": 2}))["completion_tokens"] <= 2

    asyncio.run(scenario())


HELD = 3  # max_tokens of a request whose generation HeldEngine holds


class HeldEngine(child.Engine):
    """The tiny model's engine, whose generations of ``HELD`` tokens hold the worker thread until the test lets
    them go (streamed ones send no text); ``log`` says in which order the requests started and their workers
    finished."""

    def __init__(self, engine):
        super().__init__(engine.model, engine.tokenizer)
        self.log, self.runs = [], []
        self.holding, self.let_go = threading.Event(), threading.Event()
        self.awaiting_result = None  # set once the stream has sent its text and waits for the result

    def start(self, ids, body):
        self.log.append(("start", body["max_tokens"]))
        run = super().start(ids, body)
        self.runs.append(run)
        if body.get("stream"):
            async def no_text():  # the stream goes on to wait for the result (`await run.done`) at once
                self.awaiting_result.set()
                return
                yield

            run.pieces = no_text
        return run

    def _generate(self, run, config):
        if run.body["max_tokens"] != HELD:
            return super()._generate(run, config)
        self.holding.set()
        self.let_go.wait(60)  # the worker is busy until the test says so, whatever the client does
        self.log.append(("worker done", run.body["max_tokens"], run.cancelled.is_set()))
        return [5, 6, 7]


def test_a_client_that_leaves_mid_generation_keeps_its_slot_until_the_worker_is_done(engine):
    """slots = 1: a client hangs up while its stream waits for the worker (`await run.done`). The worker is told
    to stop, and the next request waits at the gate (not in the executor's own queue, which has no timeout)
    until the worker has let go; only then does it start."""
    held = HeldEngine(engine)

    async def scenario():
        held.awaiting_result = asyncio.Event()
        app = child.app_for(held, "m", None, {"max_queue": 4, "request_timeout": None})
        gate = app.state.gate
        messages = [{"role": "user", "content": "hi"}]
        hang_up = asyncio.Event()
        first = asyncio.create_task(_asgi(app, {"messages": messages, "max_tokens": HELD, "stream": True}, hang_up))
        await held.awaiting_result.wait()
        await _until(held.holding.is_set)  # the worker generates the first request
        hang_up.set()  # ... and its client leaves
        await first
        assert held.runs[0].cancelled.is_set()  # the worker was told to stop early
        second = asyncio.create_task(_asgi(app, {"messages": messages, "max_tokens": 2, "temperature": 0}))
        await _until(lambda: gate.waiting == 1 or len(held.log) > 1)  # it queued, or it went straight in
        assert held.log == [("start", HELD)], "the slot was given away while the worker still generates"
        held.let_go.set()
        status, raw = await second
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2, raw
        assert held.log == [("start", HELD), ("worker done", HELD, True), ("start", 2)]
        assert gate.waiting == 0

    try:
        asyncio.run(scenario())
    finally:
        held.let_go.set()
        held.worker.shutdown(wait=True)


def test_a_plain_reply_whose_client_leaves_tells_the_worker_to_stop(engine):
    """Not streamed: the handler checks on its client while the worker generates (each second); one that left
    cancels the generation, and the slot is free once the worker has stopped."""
    held = HeldEngine(engine)

    async def scenario():
        app = child.app_for(held, "m", None, {"max_queue": 4, "request_timeout": None})
        hang_up = asyncio.Event()
        messages = [{"role": "user", "content": "hi"}]
        first = asyncio.create_task(_asgi(app, {"messages": messages, "max_tokens": HELD}, hang_up))
        await _until(held.holding.is_set)
        hang_up.set()
        await _until(lambda: held.runs[0].cancelled.is_set(), within=10)  # the client's leaving reached the worker
        held.let_go.set()
        await first
        status, raw = await _asgi(app, {"messages": messages, "max_tokens": 2, "temperature": 0})
        assert status == 200 and held.log == [("start", HELD), ("worker done", HELD, True), ("start", 2)]

    try:
        asyncio.run(scenario())
    finally:
        held.let_go.set()
        held.worker.shutdown(wait=True)


def test_a_slot_whose_request_loop_has_closed_is_given_back(engine):
    """A client leaves while the worker still generates, and its event loop ends before the worker does (a test's
    ``asyncio.run``, a server stopping): the worker gives the slot back all the same, so the next request, on another
    loop, is answered instead of waiting for ever."""
    held = HeldEngine(engine)
    app = child.app_for(held, "m", None, {"max_queue": 4, "request_timeout": None})
    messages = [{"role": "user", "content": "hi"}]

    async def leaves():
        held.awaiting_result = asyncio.Event()
        hang_up = asyncio.Event()
        first = asyncio.create_task(_asgi(app, {"messages": messages, "max_tokens": HELD, "stream": True}, hang_up))
        await held.awaiting_result.wait()
        await _until(held.holding.is_set)
        hang_up.set()
        await first  # the stream has ended; the worker still holds the request

    async def next_request():
        return await asyncio.wait_for(_asgi(app, {"messages": messages, "max_tokens": 2, "temperature": 0}), 30)

    try:
        asyncio.run(leaves())  # this loop is closed now
        held.let_go.set()
        held.worker.submit(lambda: None).result(timeout=30)  # the worker has let go of the first request
        status, raw = asyncio.run(next_request())
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2, raw
    finally:
        held.let_go.set()
        held.worker.shutdown(wait=True)


class FakeVocab:
    """What :class:`serve_child._CheckedChat` asks of a GGUF's vocabulary before it renders a prompt."""

    def n_vocab(self):
        return VOCAB


def test_the_llamacpp_checks_refuse_before_llama_cpp_python_sees_the_request():
    seen = []

    async def llama_cpp_python(scope, receive, send):  # what would generate: it must never be reached
        seen.append(scope["path"])

    app = child._CheckedChat(llama_cpp_python, name="m", vocab=FakeVocab(), n_ctx=64)
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def scenario():
        for bad, param in (({"logit_bias": {"99999999": 5}}, "logit_bias"),
                           ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
                           ({"logit_bias": {"5": 101}}, "logit_bias"), ({"seed": 2**80}, "seed"),
                           ({"stream_options": {"include_usage": True}}, "stream_options")):
            status, raw = await _asgi(app, {**base, **bad})
            error = json.loads(raw)["error"]
            assert (status, error["param"], error["type"]) == (400, param, "BadRequestError"), (bad, raw)

    asyncio.run(scenario())
    assert seen == []


# --------------------------------------------------------------------------- hostile bodies: refused before anything reads them

@pytest.mark.parametrize("what, raw, param", HOSTILE, ids=[h[0] for h in HOSTILE])
@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_a_hostile_body_is_a_400_naming_its_field(what, raw, param, backend):
    with pytest.raises(child.ApiError) as e:
        child.check_request(child._read_body(raw), "m", VOCAB, backend=backend)
    assert (e.value.status, e.value.param) == (400, param), e.value.message
    assert len(e.value.message) < 400  # a 5,000-digit number is quoted, not repeated


def test_nesting_up_to_the_limit_is_read_and_beyond_it_refused():
    assert child._read_body(nested(child.MAX_DEPTH - 1))["metadata"]  # the body's own object is the first level
    with pytest.raises(child.ApiError, match="nested deeper than 64 levels"):
        child._read_body(nested(child.MAX_DEPTH))
    twenty = json.dumps(OK).replace("{", '{"seed": ' + "9" * child.MAX_DIGITS + ", ", 1).encode()
    assert child._read_body(twenty)["seed"] == int("9" * child.MAX_DIGITS)  # read: the request model refuses it


@pytest.mark.parametrize("backend", ["transformers", "llamacpp"])
def test_a_temperature_below_the_sampling_epsilon_is_greedy_as_in_vllm(backend):
    assert check({**OK, "temperature": 1e-300}, backend)["temperature"] == 0
    assert check({**OK, "temperature": 0.5 * child.GREEDY_BELOW}, backend)["temperature"] == 0
    assert check({**OK, "temperature": child.GREEDY_BELOW}, backend)["temperature"] == child.GREEDY_BELOW


def test_the_transformers_app_answers_hostile_bodies_with_a_400_and_then_answers(engine):
    app = child.app_for(engine, "m", None, {"max_queue": 4, "request_timeout": None})

    async def scenario():
        for what, raw, param in HOSTILE:
            status, out = await _asgi(app, raw)
            assert (status, json.loads(out)["error"]["param"]) == (400, param), (what, out[:300])
        tiny = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 1e-300}
        for stream in (False, True):
            status, out = await _asgi(app, {**tiny, "stream": stream})
            assert status == 200 and b'"error"' not in out, out  # greedy, not inf/nan probabilities
        return out

    asyncio.run(scenario())


class TemplateVocab(FakeVocab):
    """A GGUF's vocabulary as :func:`serve_child.llama_prompt_tokens` reads it: a chat template, a byte a token."""

    metadata = {"tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}

    def detokenize(self, ids, special=False):
        return b""

    def token_eos(self):
        return -1

    def token_bos(self):
        return -1

    def tokenize(self, text, add_bos=False, special=False):
        return list(text)


def test_llamacpp_gets_text_parts_as_one_string_and_no_stream_options():
    seen = []

    async def llama_cpp_python(scope, receive, send):
        seen.append(json.loads((await receive())["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    pytest.importorskip("llama_cpp")  # its chat formatter renders the prompt
    app = child._CheckedChat(llama_cpp_python, name="m", vocab=TemplateVocab(), n_ctx=64)
    parts = {"role": "user", "content": [{"type": "text", "text": "你好"}, {"type": "text", "text": "!"}]}
    status, _ = asyncio.run(_asgi(app, {"messages": [parts], "max_tokens": 2, "stream": True,
                                        "stream_options": {"include_usage": True}}))
    assert status == 200 and seen[0]["messages"] == [{"role": "user", "content": "你好\n!"}]
    assert "stream_options" not in seen[0] and seen[0]["stream"] is True


def test_llamacpp_gets_what_its_request_model_takes_and_a_body_it_refuses_is_a_400():
    """llama-cpp-python's server answers a body its own request model refuses with a 500: a null ``tool_calls`` (valid
    OpenAI), which is mended here, and a ``tools`` entry that is no function, which is a 400 naming the field."""
    pytest.importorskip("llama_cpp")
    seen = []

    async def llama_cpp_python(scope, receive, send):
        seen.append(json.loads((await receive())["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = child._CheckedChat(llama_cpp_python, name="m", vocab=TemplateVocab(), n_ctx=64)
    nulls = {"messages": [{"role": "user", "content": []}, {"role": "assistant", "tool_calls": None, "content": []}],
             "max_tokens": 2, "metadata": {"k": "v"}, "store": False}

    async def scenario():
        status, _ = await _asgi(app, nulls)
        assert status == 200 and seen[0]["messages"] == [{"role": "user", "content": ""},
                                                         {"role": "assistant", "content": ""}]
        assert "metadata" not in seen[0] and "store" not in seen[0]  # fields llama.cpp does not have: they change nothing
        status, raw = await _asgi(app, {**nulls, "tools": [{"not": "a function"}]})
        error = json.loads(raw)["error"]
        assert (status, error["param"], error["type"]) == (400, "tools[0].type", "BadRequestError"), raw
        assert len(seen) == 1  # never handed on

    asyncio.run(scenario())


def test_a_llamacpp_stream_gets_its_usage_before_done():
    sent = []

    async def send(message):
        sent.append(message)

    class Vocab:
        def tokenize(self, text, add_bos=False, special=False):
            return list(text.decode("utf-8"))  # a token per character

    def chunk(content, finish=None):
        return {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m",
                "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}

    async def scenario(finish):
        sent.clear()
        usage = child._StreamUsage(send, Vocab(), prompt_tokens=7, max_tokens=9)
        await usage({"type": "http.response.start", "status": 200, "headers": []})
        stream = (child._event(chunk("答案")) + child._event(chunk("：B", finish)) + "data: [DONE]\n\n").encode()
        for i in range(0, len(stream), 10):  # the events split anywhere across the body's messages
            await usage({"type": "http.response.body", "body": stream[i:i + 10], "more_body": True})
        await usage({"type": "http.response.body", "body": b"", "more_body": False})
        body = b"".join(m.get("body", b"") for m in sent).decode()
        events = [e.removeprefix("data: ") for e in body.split("\n\n") if e]
        assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["delta"]["content"] == "答案"
        return json.loads(events[-2])

    last = asyncio.run(scenario("stop"))
    assert last["choices"] == [] and last["id"] == "c1"
    assert last["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert asyncio.run(scenario("length"))["usage"]["completion_tokens"] == 9  # cut at max_tokens: exactly that many


# --------------------------------------------------------------------------- one connection, after a failure


@contextlib.contextmanager
def uvicorn_serving(app):
    """``app`` served by uvicorn on a free local port, in a thread of this process; yields its URL."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def one_connection(url: str):
    """An HTTP client with one keep-alive connection."""
    import httpx

    client = httpx.Client(base_url=url, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                          timeout=60)
    return client


def test_a_500_leaves_the_connection_usable_on_both_backends_apps():
    """An unexpected exception in a handler (the transformers backend's routes) or in the checks in front of
    llama-cpp-python (the llamacpp backend's middleware) is a 500 in the OpenAI shape, and the same connection's next
    request is answered (starlette's own 500 handler raises again, and uvicorn then closes the connection)."""
    from fastapi import FastAPI

    pytest.importorskip("llama_cpp")  # its chat formatter renders the prompt

    class Broken(TemplateVocab):
        calls = 0

        def n_vocab(self):
            Broken.calls += 1
            if Broken.calls == 1:
                raise KeyError("the checks failed once")
            return VOCAB

    transformers_like = FastAPI()

    @transformers_like.post(child.CHAT)
    async def chat(body: dict):
        if body.get("fail"):
            raise KeyError("the handler failed")
        return {"ok": True}

    llamacpp_like = FastAPI()  # llama-cpp-python's app, with the checks in front as llamacpp_main puts them

    @llamacpp_like.post(child.CHAT)
    async def llama_cpp_python(body: dict):
        return {"ok": True}

    llamacpp_like.add_middleware(child._CheckedChat, name="m", vocab=Broken(), n_ctx=64)

    bodies = {"transformers": ({"fail": True, "messages": []}, {"messages": []}),
              "llamacpp": ({**OK, "max_tokens": 2}, {**OK, "max_tokens": 2})}
    for backend, app in (("transformers", transformers_like), ("llamacpp", llamacpp_like)):
        failing, good = bodies[backend]
        with uvicorn_serving(child._guarded(app, key=None)) as url:
            client = one_connection(url)
            with client:
                first = client.post(child.CHAT, json=failing)
                assert first.status_code == 500 and first.json()["error"]["type"] == "InternalServerError", first.text
                assert "KeyError" in first.json()["error"]["message"]
                second = client.post(child.CHAT, json=good)
                assert second.status_code == 200, (backend, second.text)
                assert client_port(first) == client_port(second)  # the same connection


def test_a_stream_that_fails_after_its_first_byte_ends_with_an_error_event():
    """What no handler caught, after a stream began (llama-cpp-python's, say): the client gets an error event and
    ``data: [DONE]``, not a stream cut off without an end, and the same client's next request is answered."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.post(child.CHAT)
    def chat():
        def events():
            yield child._event({"choices": [{"index": 0, "delta": {"content": "答案"}}]})
            raise RuntimeError("the model fell over mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    def models():
        return {"ok": True}

    with TestClient(child._guarded(app, key=None)) as client:
        r = client.post(child.CHAT)
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        assert r.status_code == 200 and events[-1] == "[DONE]", r.text
        error = json.loads(events[-2])["error"]
        assert error["code"] == 500 and "RuntimeError" in error["message"]
        assert client.get("/v1/models").json() == {"ok": True}
