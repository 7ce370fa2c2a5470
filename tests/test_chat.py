"""medqa_zh.chat: one chat turn (retrieval, the shared prompt, streaming, history) and the panel
that calls it, with a local model and through the HTTP API."""
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from medqa_zh import chat, models, prompts, rag, serve

pytestmark = pytest.mark.timeout(1200)  # a hang fails with its stack; at least 5x the longest such test measured with both cores busy

QUESTION = "下列哪种药物首选用于治疗虚拟甲一综合征？\nA. 示例药07号\nB. 阿司匹林\nC. 青霉素"


class Recording:
    """A backend that answers with fixed pieces and keeps the messages it was sent."""

    def __init__(self, pieces=("答案", "：", "A"), fail=None):
        self.pieces, self.fail, self.sent = pieces, fail, []
        self.tokenizer = _CharTokenizer()

    def stream(self, messages):
        self.sent.append(messages)
        if self.fail:
            raise self.fail
        yield from self.pieces


class _CharTokenizer:
    """Counts one token per character (for the context budget)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


@pytest.fixture(scope="module")
def noisy_model(tiny_assets, tmp_path_factory):
    """The tiny model with its weights shaken, so that greedy decoding writes varied text (the
    untrained one writes only newlines, which would make the comparisons below trivial)."""
    model = models.load_model(str(tiny_assets["model"]), "float32")
    tokenizer = models.load_tokenizer(str(tiny_assets["model"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    folder = tmp_path_factory.mktemp("noisy") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer, folder


@pytest.fixture(scope="module")
def retrieval():
    texts = [("药理学", "虚拟甲一综合征首选示例药07号治疗，疗效确切。"), ("内科学", "高血压患者应限制钠盐摄入。"),
             ("外科学", "阑尾炎的典型表现是转移性右下腹痛。"), ("药理学", "青霉素主要用于革兰阳性菌感染。")]
    passages = [rag.Passage(book, line, 0, 0, text) for line, (book, text) in enumerate(texts, start=1)]
    corpus = rag.Corpus(passages, {}, "test-corpus")
    return rag.Retrieval(corpus, rag.BM25.build(corpus, "bigram", progress=False), None)


def test_local_streaming_equals_plain_greedy_generation(noisy_model):
    model, tokenizer, _ = noisy_model
    messages = prompts.chat_messages([], QUESTION)
    pieces = list(chat.LocalBackend(lambda: (model, tokenizer), max_tokens=20).stream(messages))
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    plain = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(pieces) > 1 and len(set(plain)) > 3  # streamed in pieces, and real text
    assert "".join(pieces) == plain


def test_local_backend_loads_its_model_on_first_use_only():
    calls = []
    backend = chat.LocalBackend(lambda: calls.append(1) or ("model", "tokenizer"))
    assert calls == []
    assert backend.tokenizer == "tokenizer" and backend.tokenizer == "tokenizer" and calls == [1]


def test_a_turn_streams_keeps_history_and_uses_the_evaluated_prompt():
    backend = Recording()
    talk = chat.Chat({"merged": backend})
    seen = []
    reply = talk.respond(QUESTION, "merged", on_piece=seen.append)
    assert seen == ["答案", "答案：", "答案：A"] and reply.text == "答案：A" and reply.pieces == 3
    question, options = prompts.parse_question(QUESTION)
    assert backend.sent[0] == prompts.build_messages(question, options)  # exactly what 06-08 asked
    talk.respond("为什么？", "merged")
    assert backend.sent[1][1:] == [*backend.sent[0][1:], {"role": "assistant", "content": "答案：A"},
                                   {"role": "user", "content": "为什么？"}]
    talk.clear()
    assert talk.history == [] and talk.replies == []


def test_a_failed_turn_leaves_the_history_unchanged():
    talk = chat.Chat({"base": Recording(fail=ConnectionError("server gone"))})
    with pytest.raises(ConnectionError, match="server gone"):
        talk.respond("你好", "base")
    assert talk.history == []


def test_retrieved_passages_go_into_the_prompt_with_their_books(retrieval):
    backend = Recording()
    talk = chat.Chat({"merged": backend}, retrieval, top_k=2, context_tokens=10_000)
    assert talk.retrievers == ["bm25"]  # no dense index: no dense or hybrid switch
    reply = talk.respond(QUESTION, "merged", "bm25")
    assert reply.passages[0].text.startswith("虚拟甲一综合征") and len(reply.passages) == 2
    user = backend.sent[0][-1]["content"]
    assert user.startswith(prompts.CONTEXT_INTRO) and "[1]《药理学》虚拟甲一综合征" in user
    question, options = prompts.parse_question(QUESTION)
    assert backend.sent[0] == prompts.build_messages(question, options,
                                                     context=[(p.book, p.text) for p in reply.passages])
    # the token budget keeps whole passages in rank order: room for one passage only
    one = len(prompts.format_context([(reply.passages[0].book, reply.passages[0].text)]))
    small = chat.Chat({"merged": Recording()}, retrieval, top_k=2, context_tokens=one)
    assert [p.id for p in small.respond(QUESTION, "merged", "bm25").passages] == [reply.passages[0].id]


def test_wrong_choices_are_refused_with_the_alternatives(retrieval):
    talk = chat.Chat({"base": Recording(), "merged": Recording()}, retrieval)
    with pytest.raises(ValueError, match="choose one of base, merged"):
        talk.respond("你好", "full")
    with pytest.raises(ValueError, match="'dense' is not available here.*bm25"):
        talk.respond("你好", "base", "dense")
    with pytest.raises(ValueError, match="empty message"):
        talk.respond("  ", "base")
    with pytest.raises(ValueError, match="no model to chat with"):
        chat.Chat({})


def test_the_panel_send_button_runs_the_turn_and_shows_it(retrieval):
    backend = Recording(pieces=("<b>答案", "：A</b>"))
    panel = chat.ChatPanel(chat.Chat({"merged": backend}, retrieval), retriever="bm25")
    panel.box.value = QUESTION
    panel.send_button.click()  # what a person does: the turn runs in a thread
    panel.wait(30)
    assert len(backend.sent) == 1 and panel.box.value == ""
    assert "&lt;b&gt;答案：A&lt;/b&gt;" in panel.history.value  # model text is escaped, not rendered
    assert "《药理学》" in panel.history.value and "药理学:1:0" in panel.history.value  # the sources
    assert not panel.send_button.disabled and "2 pieces" in panel.status.value
    assert chat.DISCLAIMER.split("：")[0] in panel.widget.children[0].value
    panel.clear()
    assert panel.history.value == "" and panel.chat.history == []


class Endless:
    """A backend that streams until it is closed, and says whether it was."""

    def __init__(self):
        self.tokenizer, self.closed, self.started = _CharTokenizer(), threading.Event(), threading.Event()

    def stream(self, messages):
        try:
            while True:
                self.started.set()
                time.sleep(0.01)
                yield "字"
        finally:
            self.closed.set()


def test_the_stop_button_ends_a_reply_running_in_the_background():
    backend = Endless()
    panel = chat.ChatPanel(chat.Chat({"base": backend}))
    panel.box.value = "请介绍一下高血压。"
    panel.send_button.click()
    assert backend.started.wait(10) and panel.busy and not panel.stop_button.disabled  # the click returned
    time.sleep(0.1)
    panel.stop_button.click()
    panel.wait(10)
    assert backend.closed.is_set() and not panel.busy and panel.stop_button.disabled
    reply = panel.chat.replies[-1]
    assert reply.stopped and reply.text.startswith("字字") and "stopped" in panel.history.value
    assert panel.chat.history[-1] == {"role": "assistant", "content": reply.text}


def test_a_local_reply_stopped_early_stops_generating(noisy_model):
    model, tokenizer, _ = noisy_model
    steps = []
    hook = model.register_forward_hook(lambda *args: steps.append(1))
    try:
        stream = chat.LocalBackend(lambda: (model, tokenizer), max_tokens=400).stream(prompts.chat_messages([], QUESTION))
        next(stream)
        stream.close()
    finally:
        hook.remove()
    assert len(steps) < 200  # halted, not run on to max_tokens in the background


def test_rag_off_is_a_real_selection_and_the_panel_says_what_each_model_is_for(retrieval):
    talk = chat.Chat({"base": Recording(), "merged": Recording(pieces=("答案：B",))}, retrieval)
    panel = chat.ChatPanel(talk)
    assert panel.retriever.value == chat.RAG_OFF and panel.retriever.index == 0  # shown as selected
    assert panel.model.value == "merged" and "choose base" in panel.use.value
    panel.model.value = "base"
    assert "free chat" in panel.use.value
    panel.model.value = "merged"
    reply = panel.send(QUESTION)
    assert reply.retriever is None and not reply.passages
    assert reply.choice == "B. 阿司匹林" and "→ <b>B. 阿司匹林</b>" in panel.history.value
    assert panel.send("你好").choice is None  # not an exam question


def test_the_panel_shows_an_error_and_can_send_again():
    panel = chat.ChatPanel(chat.Chat({"base": Recording(fail=ConnectionError("no answer from the server"))}))
    with pytest.raises(ConnectionError):
        panel.send("你好")
    assert "no answer from the server" in panel.status.value and not panel.send_button.disabled


def test_a_dead_endpoint_is_named():
    port = serve.free_port()
    backend = chat.ApiBackend(f"http://127.0.0.1:{port}/v1", "m", timeout=5)
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}/v1.*is it running"):
        list(backend.stream([{"role": "user", "content": "你好"}]))


class _Chunks:
    """What ``openai``'s ``create(stream=True)`` returns: chunks to iterate, and ``close`` to hang up."""

    def __init__(self, contents):
        delta = lambda content: SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=content))])  # noqa: E731
        self.chunks, self.closed = [delta(c) for c in contents] + [SimpleNamespace(choices=[])], False

    def __iter__(self):
        return iter(self.chunks)

    def close(self):
        self.closed = True


class _Client:
    """An ``openai.OpenAI`` stand-in that streams ``contents`` and keeps what it was asked."""

    def __init__(self, contents):
        self.asked, self.streams = [], []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))
        self.contents = contents

    def _create(self, **kwargs):
        self.asked.append(kwargs)
        self.streams.append(_Chunks(self.contents))
        return self.streams[-1]


def test_stream_reply_yields_the_text_pieces_greedily_and_is_the_api_backends_loop():
    messages = [{"role": "user", "content": "你好"}]
    client = _Client([None, "答案", "", "：A"])  # the role chunk and an empty one carry no text
    assert list(chat.stream_reply(client, "merged", messages, 7)) == ["答案", "：A"]
    assert client.asked == [{"model": "merged", "messages": messages, "temperature": 0, "max_tokens": 7, "stream": True}]
    assert client.streams[-1].closed
    stream = chat.stream_reply(client, "merged", messages, 7)
    next(stream)
    stream.close()  # stopped early: it hangs up
    assert client.streams[-1].closed
    backend = chat.ApiBackend("http://127.0.0.1:1/v1", "merged", max_tokens=9)
    backend.client = client  # the panel's API backend runs the same loop
    assert list(backend.stream(messages)) == ["答案", "：A"] and client.asked[-1]["max_tokens"] == 9


@pytest.mark.slow
def test_api_streaming_equals_local_streaming(noisy_model, tmp_path):
    model, tokenizer, folder = noisy_model
    messages = prompts.chat_messages([], QUESTION)
    local = "".join(chat.LocalBackend(lambda: (model, tokenizer), max_tokens=20).stream(messages))
    with serve.serve(folder, backend="transformers", dtype="float32", log_path=tmp_path / "server.log",
                     quiet=True) as server:
        api = list(chat.ApiBackend(server.base_url, server.model, max_tokens=20).stream(messages))
    assert len(api) > 1 and "".join(api) == local


@pytest.mark.slow
def test_a_profile_chat_lists_the_served_models_by_their_run_names(project, tiny_assets, tmp_path):
    from medqa_zh import config

    cfg = config.load("smoke", {"model.base": str(tiny_assets["model"])})
    with serve.serve(cfg.base_model, backend="transformers", dtype="float32", log_path=tmp_path / "server.log",
                     served_name="base", quiet=True) as server:
        talk = chat.from_profile(cfg, server.base_url)
        assert list(talk.backends) == ["base"]  # served under the run's name, as 05 and 07 serve it
        reply = talk.respond(QUESTION, "base")
    assert reply.pieces >= 1 and talk.backends["base"].tokenizer is not None
    with pytest.raises(ConnectionError, match="is the server running"):
        chat.from_profile(cfg, server.base_url)  # stopped now
