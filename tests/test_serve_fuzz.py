"""Any request body, on both CPU servers (medqa_zh.serve_child, live): a 200 or an OpenAI-shaped 4xx, never a 500,
and the same connection's next request answered.

The bodies come from the request model's own JSON schema (hypothesis-jsonschema on
``ChatCompletionRequest.model_json_schema()``), and the same bodies with one field, or one message's field, set to
a hostile value: lone surrogates, NUL, NaN and Infinity, integers of thousands of digits, deep nesting, long
strings, other JSON types. Each backend gets a bounded number of bodies (``FUZZ_BODIES``) on a small context (every
generation ends within ``CONTEXT`` tokens), so the test stops by itself in a few minutes."""
import json
import os
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from helpers import HOSTILE, OK, client_port, server_processes
from medqa_zh import serve
from medqa_zh import serve_child as child

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # a hang fails with its stack; at least 5x the longest such test measured with both cores busy

FUZZ_BODIES = int(os.environ.get("MEDQA_FUZZ_BODIES", "60"))  # per backend; more: MEDQA_FUZZ_BODIES=1000
CONTEXT = 192  # tokens of prompt + completion: a generation is short whatever max_tokens a body asks for

def deep(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


# values a field may hold that no well-behaved client sends (each is valid JSON text, as json.dumps writes it)
HOSTILE_VALUES = st.sampled_from([
    "\ud800", "a\udfffb", "\x00", "\u202e", "🩺" * 3, "x" * 20_000, "", " ", "答案：" * 50,
    float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 5e-324, 1e-300,
    10**30, -(10**30), 2**63, -(2**63) - 1, 10**3000, 0, -1, True, None,
    [], {}, deep(70),
    {"type": "text", "text": "\ud800"}, [{"type": "text"}], {"9" * 30: 1.0}, {"include_usage": "yes"},
])
FIELDS = sorted(child.ChatCompletionRequest.model_fields)
MESSAGE_FIELDS = sorted(child.Message.model_fields)
BODIES = from_schema(child.ChatCompletionRequest.model_json_schema())


PLAUSIBLE = ("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
             "stream_options", "seed", "user", "metadata")


TEXT = st.text(max_size=120)  # any code point but surrogates: Chinese, emoji, controls, NUL
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                        min_size=1, max_size=3))}), min_size=1, max_size=4)


@st.composite
def bodies(draw):
    """A body of the request schema as it is drawn (most of them refused: another model, fields a CPU server does
    not honour), or its plausible part (the served model, the fields a chat client sends), or that with one field (of
    the body or of a message) made hostile."""
    body = draw(BODIES)
    kind = draw(st.sampled_from(["schema", "plausible", "plausible", "hostile"]))
    if kind != "schema":
        body = {"model": "m", **{k: v for k, v in body.items() if k in PLAUSIBLE}, "messages": draw(MESSAGES)}
    if kind == "hostile":
        if draw(st.booleans()):
            body[draw(st.sampled_from(FIELDS))] = draw(HOSTILE_VALUES)
        else:
            message = draw(st.integers(0, len(body["messages"]) - 1))
            body["messages"][message] = {**body["messages"][message],
                                         draw(st.sampled_from(MESSAGE_FIELDS)): draw(HOSTILE_VALUES)}
    return body


def encode(body) -> bytes:
    import sys

    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # the 3,000-digit integers as a client sends them
    try:
        return json.dumps(body).encode()
    finally:
        sys.set_int_max_str_digits(limit)


@pytest.fixture(scope="module", autouse=True)
def no_server_left_behind():
    before = set(server_processes())
    yield
    assert not [pid for pid in server_processes() if pid not in before], "server processes left running"


@pytest.fixture(scope="module", params=["transformers", "llamacpp"])
def served(request, tiny_assets, tmp_path_factory):
    """The tiny model on each CPU backend (as its GGUF on llamacpp), a context of ``CONTEXT`` tokens."""
    model = tiny_assets["model"]
    if request.param == "llamacpp":
        pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
        from medqa_zh import export

        out = tmp_path_factory.mktemp("gguf")
        model = export.convert(model, out / "tiny-f16.gguf", log=out / "convert.log")
    logs = tmp_path_factory.mktemp("logs")
    with serve.serve(model, backend=request.param, dtype="float32", max_model_len=CONTEXT, served_name="m",
                     log_path=logs / "server.log", quiet=True, startup_timeout=180) as server:
        yield server


def openai_shaped(response: httpx.Response) -> bool:
    error = response.json().get("error")
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error) and \
        error["code"] == response.status_code


def test_no_body_is_a_500_and_the_connection_stays_usable(served):
    good = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    seen = Counter()
    with httpx.Client(base_url=served.url, limits=limits, timeout=120, headers=served.headers()) as client:

        @settings(max_examples=FUZZ_BODIES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(bodies())
        def any_body(body):
            with client.stream("POST", child.CHAT, content=encode(body),
                               headers={"content-type": "application/json"}) as r:
                text = r.read().decode("utf-8", "replace")
            assert r.status_code < 500, (body, text[:500])
            if r.status_code == 200:
                assert '"error"' not in text, (body, text[:500])  # no error event in a stream either
                seen["200"] += 1
            else:
                assert 400 <= r.status_code < 500 and openai_shaped(httpx.Response(r.status_code, content=text)), \
                    (body, r.status_code, text[:500])
                seen[f"{r.status_code} {json.loads(text)['error']['param']}"] += 1
            after = client.post(child.CHAT, json=good)
            assert after.status_code == 200 and client_port(after) == client_port(r), (body, after.text[:300])

        any_body()
    print(f"\n{served.backend}: {sum(seen.values())} bodies: {dict(seen.most_common())}")
    assert seen["200"] and len(seen) > 1, seen  # both kinds of body were sent


def test_the_hostile_bodies_are_400s_naming_their_field_on_one_connection(served):
    """Each body that was a 500 (or a reset connection) on one backend or the other: a 400 in the OpenAI shape with
    its field in ``param``, then a good request on the same connection; and the bodies clients send that llama.cpp
    refused: text parts, ``stream_options.include_usage``, a temperature of 1e-300."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=served.url, limits=limits, timeout=120, headers=served.headers()) as client:
        first = None
        for what, raw, param in HOSTILE:
            r = client.post(child.CHAT, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and openai_shaped(r) and r.json()["error"]["param"] == param, (what, r.text)
            first = first or client_port(r)
            good = client.post(child.CHAT, json={**OK, "max_tokens": 1})
            assert good.status_code == 200 and client_port(good) == first, (what, good.text)
        template = client.post(child.CHAT, json={**OK, "max_tokens": 1, "chat_template_kwargs": {"messages": []}})
        assert template.status_code == 400 and template.json()["error"]["param"] == "chat_template_kwargs"
        for path in ("/v1/completions", "/v1/engines/copilot-codex/completions", "/v1/embeddings", "/tokenize"):
            r = client.post(path, json={"prompt": "hi", "max_tokens": 100_000, "input": "hi"})
            assert r.status_code == 404 and openai_shaped(r), (path, r.text)  # not offered, on either backend
        parts = {"role": "user", "content": [{"type": "text", "text": "你好"}, {"type": "text", "text": "！"}]}
        greedy = {"model": "m", "max_tokens": 4, "temperature": 1e-300}
        plain = client.post(child.CHAT, json={**greedy, "messages": [parts]})
        assert plain.status_code == 200, plain.text
        joined = client.post(child.CHAT, json={**greedy, "messages": [{"role": "user", "content": "你好\n！"}]})
        assert joined.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]  # parts joined by \n
        assert joined.json()["usage"] == plain.json()["usage"]
        with client.stream("POST", child.CHAT, json={**greedy, "messages": [parts], "stream": True,
                                                      "stream_options": {"include_usage": True}}) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]", events
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
        assert text == plain.json()["choices"][0]["message"]["content"]  # greedy: the same reply, streamed
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain.json()["usage"], chunks[-1]
