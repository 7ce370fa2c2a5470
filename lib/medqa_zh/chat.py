"""The chat of notebook 09: one function answers a turn; an ipywidgets panel calls it.

``Chat.respond(message, model, retriever)`` is the whole turn: retrieve passages (optional),
build the messages with :func:`prompts.chat_messages` (a typed exam question gets exactly the
evaluated prompt), stream the reply token by token from a backend, and keep the history. The
widget's send button calls :meth:`ChatPanel.send`, which calls ``respond``; under papermill the
notebook calls ``send`` itself, so the headless run exercises the code a person clicks.

Backends stream text pieces for a list of messages, with greedy decoding as in the evaluations:

* :class:`ApiBackend`: an OpenAI-compatible server (``/v1/chat/completions`` with ``stream``: the loop
  is :func:`stream_reply`), e.g. one started by notebook 05 or ``python -m medqa_zh.serve``;
* :class:`LocalBackend`: a model loaded in this kernel, streamed with transformers'
  ``TextIteratorStreamer`` (no server needed).
"""
from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import ipywidgets as w
import openai
from IPython.display import display

from . import answers, models, prompts, rag

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast.

DISCLAIMER = ("教学演示：这是在考试题上微调的小模型，回答可能是错的，不构成医疗建议。"
              "A teaching model trained on exam questions: its answers may be wrong and are not medical advice.")


# --------------------------------------------------------------------------- backends


def stream_reply(client, model: str, messages: list[dict], max_tokens: int) -> Iterator[str]:
    """The streaming loop: ask ``client`` (an ``openai.OpenAI``) for ``model``'s greedy reply to ``messages``
    with ``stream=True`` and yield its text pieces as they arrive. Closed early, it hangs up (the server stops)."""
    chunks = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens,
                                            stream=True)
    try:
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:  # the first chunk carries the role, the last none
                yield chunk.choices[0].delta.content
    finally:
        chunks.close()


class ApiBackend:
    """Streams a reply from an OpenAI-compatible server; ``model`` is the name the server serves."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 256,
                 timeout: float = 120.0, tokenizer=None):
        self.model, self.max_tokens, self.tokenizer = model, max_tokens, tokenizer
        self.base_url = base_url
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)

    def stream(self, messages: list[dict]) -> Iterator[str]:
        try:
            yield from stream_reply(self.client, self.model, messages, self.max_tokens)
        except openai.APIConnectionError as e:
            raise ConnectionError(f"no answer from the server at {self.base_url} ({e}); is it running? "
                                  "Start one with notebook 05 or `python -m medqa_zh.serve MODEL_DIR`.") from e


class LocalBackend:
    """Streams a reply from a model loaded in this process (``load()`` returns (model, tokenizer),
    called on first use, so listing a model costs nothing until it is chosen)."""

    def __init__(self, load: Callable, max_tokens: int = 256):
        self._load, self.max_tokens = load, max_tokens
        self._loaded = None

    @property
    def tokenizer(self):
        return self._get()[1]

    def _get(self):
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    def stream(self, messages: list[dict]) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class Halt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device)

        model, tokenizer = self._get()
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(model.device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        failure, halt = [], threading.Event()

        def generate():
            try:
                with torch.inference_mode():
                    model.generate(**inputs, streamer=streamer, max_new_tokens=self.max_tokens, do_sample=False,
                                   temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                                   stopping_criteria=StoppingCriteriaList([Halt()]))
            except Exception as e:  # re-raised below, in the caller's thread
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            yield from (piece for piece in streamer if piece)
        finally:  # also when the caller stops early (closes this generator): generation ends at the next token
            halt.set()
            worker.join()
        if failure:
            raise failure[0]


# --------------------------------------------------------------------------- one turn


@dataclass
class Reply:
    message: str
    text: str
    model: str
    retriever: str | None
    passages: list = field(default_factory=list)  # rag.Passage, in the order they were given
    seconds: float = 0.0
    first_piece_s: float | None = None
    pieces: int = 0
    choice: str | None = None  # a typed exam question's answer: the letter and that option's text, "B. 阿司匹林"
    stopped: bool = False      # the stop button ended it early


class Chat:
    """The conversation: ``backends`` maps a model name to a backend; ``retrieval`` (a
    :class:`rag.Retrieval`, optional) supplies passages, the top ``top_k`` that fit ``context_tokens``."""

    def __init__(self, backends: dict, retrieval=None, top_k: int = 3, context_tokens: int = 768):
        if not backends:
            raise ValueError("no model to chat with: train one (02-04) or pass an endpoint")
        self.backends, self.retrieval = backends, retrieval
        self.top_k, self.context_tokens = top_k, context_tokens
        self.history: list[dict] = []
        self.replies: list[Reply] = []

    @property
    def retrievers(self) -> list[str]:
        if self.retrieval is None:
            return []
        return [m for m, needs in (("bm25", ("bm25",)), ("dense", ("dense",)), ("hybrid", ("bm25", "dense")))
                if all(getattr(self.retrieval, n) is not None for n in needs)]

    def passages_for(self, message: str, retriever: str, tokenizer) -> list:
        """The top ``top_k`` passages for ``message`` that fit ``context_tokens``; a typed exam
        question is searched as 08 searches it (question + options, :func:`rag.query_text`)."""
        parsed = prompts.parse_question(message)
        query = message if parsed is None else rag.query_text(*parsed)
        ranked = self.retrieval.rank([query], retriever, self.top_k)[0]
        return rag.fit_context([self.retrieval.corpus.passages[i] for i in ranked], rag.token_counter(tokenizer),
                               self.context_tokens)

    def respond(self, message: str, model: str, retriever: str | None = None,
                on_piece: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> Reply:
        """Answer ``message`` with ``model`` (a key of ``backends``), with passages from
        ``retriever`` (bm25 | dense | hybrid; None: off). ``on_piece(text_so_far)`` is called as
        pieces arrive; setting ``stop`` ends the reply after the current piece (it is kept, marked
        stopped). The turn joins the history once the reply has ended; a failed turn does not."""
        if not message.strip():
            raise ValueError("empty message")
        if model not in self.backends:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(self.backends)}")
        if retriever and retriever not in self.retrievers:
            raise ValueError(f"retriever {retriever!r} is not available here (available: "
                             f"{', '.join(self.retrievers) or 'none; no index was loaded'})")
        backend = self.backends[model]
        passages = self.passages_for(message, retriever, backend.tokenizer) if retriever else []
        messages = prompts.chat_messages(self.history, message,
                                         context=[(p.book, p.text) for p in passages] or None)
        start, first, text, pieces, stopped = time.perf_counter(), None, "", 0, False
        stream = backend.stream(messages)
        try:
            for piece in stream:
                if first is None:
                    first = time.perf_counter() - start
                text += piece
                pieces += 1
                if on_piece:
                    on_piece(text)
                if stop is not None and stop.is_set():
                    stopped = True
                    break
        finally:
            if hasattr(stream, "close"):
                stream.close()  # the backend stops generating
        reply = Reply(message, text.strip(), model, retriever, passages, time.perf_counter() - start, first, pieces,
                      choice=_choice(message, text), stopped=stopped)
        # the history keeps the turn as the model saw it, so a follow-up question reads the same context
        self.history += [messages[-1], {"role": "assistant", "content": reply.text}]
        self.replies.append(reply)
        return reply

    def clear(self) -> None:
        self.history.clear()
        self.replies.clear()


def _choice(message: str, reply: str) -> str | None:
    """For a typed exam question: the letter the reply gives and that option's text."""
    parsed = prompts.parse_question(message)
    letter = answers.extract_letter(reply, "".join(parsed[1])) if parsed else None
    return f"{letter}. {parsed[1][letter]}" if letter else None


# --------------------------------------------------------------------------- the panel

FINE_TUNED = ("lora", "full", "merged")
USES = {"base": "通用对话与考试题 · the base model: free chat and exam questions",
        **{name: "只适合考试题 · fine-tuned on exam questions: it answers 答案：X to anything; for free chat choose base"
           for name in FINE_TUNED}}
RAG_OFF = "off"  # the retrieval switch's value for no passages (None would read as "nothing selected")


def render_reply(reply: Reply | None, message: str = "", partial: str = "") -> str:
    """One exchange as HTML: the message, the (partial) answer, and the passages with their books."""
    if reply is not None:
        message, partial = reply.message, reply.text
    out = [f'<div style="margin:6px 0"><b>你 · you</b><div style="white-space:pre-wrap">{html.escape(message)}</div></div>',
           '<div style="margin:6px 0 12px 0;padding:6px;background:#f4f6fa;border-radius:4px">'
           f'<b>模型 · model</b><div style="white-space:pre-wrap">{html.escape(partial) or "…"}</div>']
    if reply is not None:
        if reply.choice:
            out.append(f'<div style="margin-top:4px">→ <b>{html.escape(reply.choice)}</b></div>')
        stopped = " · 已停止 stopped" if reply.stopped else ""
        out.append(f'<div style="color:#777;font-size:85%">{html.escape(reply.model)}'
                   f'{" + " + reply.retriever if reply.retriever else ""} · {reply.seconds:.1f} s{stopped}</div>')
        if reply.passages:
            items = "".join(f"<li><b>《{html.escape(p.book)}》</b> <code>{html.escape(p.id)}</code>: "
                            f"{html.escape(p.text)}</li>" for p in reply.passages)
            out.append(f"<details><summary>参考段落 · sources ({len(reply.passages)})</summary>"
                       f'<ol style="font-size:85%">{items}</ol></details>')
        elif reply.retriever:
            out.append('<div style="color:#a60;font-size:85%">no passage fit the context budget</div>')
    out.append("</div>")
    return "".join(out)


class ChatPanel:
    """The ipywidgets chat: a model selector with what each model is for, a retrieval switch, the
    conversation (scrolled to the newest turn), a message box, send / stop / clear buttons, and the
    disclaimer. The send button runs the turn in a thread, so the kernel stays free and stop works;
    ``send(text)`` runs it in the caller (what papermill and the tests call)."""

    def __init__(self, chat: Chat, model: str | None = None, retriever: str | None = None):
        self.chat = chat
        self.model = w.Dropdown(options=list(chat.backends), value=model or list(chat.backends)[-1],
                                description="model")
        self.use = w.HTML()
        self.model.observe(lambda _: self._show_use(), names="value")
        self._show_use()
        self.retriever = w.ToggleButtons(options=[("RAG off", RAG_OFF), *[(r, r) for r in chat.retrievers]],
                                         value=retriever or RAG_OFF, description="passages")
        self.history = w.HTML()
        self.current = w.HTML()
        # newest at the bottom, and the box stays scrolled there (a reversed flex column anchors its end); the inner
        # column keeps its full height (flex 0 0 auto): shrunk to the box, it scrolled itself, from the top
        conversation = w.Box([w.VBox([self.history, self.current], layout=w.Layout(flex="0 0 auto"))],
                             layout=w.Layout(max_height="480px", overflow="auto", display="flex",
                                             flex_flow="column-reverse"))
        self.box = w.Textarea(placeholder="输入问题（可带 A. B. C. 选项）… Type a question (options A. B. … optional)",
                              layout=w.Layout(width="100%", height="90px"))
        self.send_button = w.Button(description="发送 send", button_style="primary")
        self.stop_button = w.Button(description="停止 stop", disabled=True)
        self.clear_button = w.Button(description="清空 clear")
        self.status = w.HTML()
        self._stop, self._worker = threading.Event(), None
        self.send_button.on_click(lambda _: self.send(background=True))
        self.stop_button.on_click(lambda _: self._stop.set())
        self.clear_button.on_click(lambda _: self.clear())
        note = w.HTML(f'<div style="padding:6px;border:1px solid #e0a800;background:#fff8e1">⚠ {html.escape(DISCLAIMER)}</div>')
        self.widget = w.VBox([note, w.HBox([self.model, self.retriever]), self.use, conversation, self.box,
                              w.HBox([self.send_button, self.stop_button, self.clear_button, self.status])])

    def _ipython_display_(self):
        display(self.widget)

    def _show_use(self) -> None:
        use = USES.get(self.model.value, "")
        self.use.value = f'<div style="color:#555;font-size:90%">{html.escape(use)}</div>' if use else ""

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def send(self, text: str | None = None, background: bool = False) -> Reply | None:
        """Answer ``text`` (default: the message box), streaming into the panel. ``background``: in a
        thread (the send button), returning at once; :meth:`wait` joins it."""
        message = self.box.value if text is None else text
        if self.busy:
            self.status.value = "still answering: press stop first"
            return None
        if not message.strip():
            self.status.value = "type a message first"
            return None
        self.box.value = ""
        self.send_button.disabled, self.stop_button.disabled = True, False
        self.status.value = "answering…"
        self._stop = threading.Event()
        if not background:
            return self._turn(message)
        self._worker = threading.Thread(target=self._turn, args=(message, False), daemon=True)
        self._worker.start()
        return None

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a reply started by the send button."""
        if self._worker is not None:
            self._worker.join(timeout)

    def _turn(self, message: str, raise_errors: bool = True) -> Reply | None:
        retriever = None if self.retriever.value == RAG_OFF else self.retriever.value
        try:
            reply = self.chat.respond(message, self.model.value, retriever, stop=self._stop,
                                      on_piece=lambda partial: setattr(self.current, "value",
                                                                       render_reply(None, message, partial)))
        except Exception as e:
            self.status.value = f'<span style="color:#b00">{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>'
            self.current.value = ""
            if raise_errors:
                raise
            return None
        finally:
            self.send_button.disabled, self.stop_button.disabled = False, True
        self.current.value = ""
        self.history.value += render_reply(reply)
        self.status.value = f"{reply.pieces} pieces in {reply.seconds:.1f} s" + (" (stopped)" if reply.stopped else "")
        return reply

    def clear(self) -> None:
        self._stop.set()
        self.wait()
        self.chat.clear()
        self.history.value = self.current.value = self.status.value = ""


# --------------------------------------------------------------------------- a profile's chat


def from_profile(cfg, endpoint: str | None = None, api_key: str | None = None, retrieval=None) -> Chat:
    """The chat over one run's models. With ``endpoint`` (an OpenAI-compatible server's
    ``/v1`` URL) every model it serves; without, every model the run has (base, lora, full, merged:
    :func:`models.available`), loaded in this kernel when first chosen. ``retrieval``: a
    :class:`rag.Retrieval` for the passages (None: no RAG switch)."""
    found = models.available(cfg)
    max_tokens = cfg["chat.max_new_tokens"]
    if endpoint is None:
        backends = {name: LocalBackend(lambda name=name: models.load_for_eval(cfg, name), max_tokens)
                    for name in found}
    else:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            served = [m["id"] for m in httpx.get(endpoint.rstrip("/") + "/models", headers=headers,
                                                 timeout=10).raise_for_status().json()["data"]]
        except httpx.HTTPError as e:
            raise ConnectionError(f"cannot list the models at {endpoint}/models ({e}); is the server running, "
                                  "and is the URL its /v1 address?") from e
        by_path = {str(path): name for name, path in found.items()}
        backends = {}
        for model_id in served:
            # a run's model served under its name (merged) or, by an older server, its folder (outputs/.../merged);
            # the tokenizer counts the passages' tokens: that model's, else the base's
            name = model_id if model_id in found else by_path.get(model_id, model_id)
            source, setting = (found[name], name) if name in found else (cfg.base_model, "model.base")
            backends[name] = ApiBackend(endpoint, model_id, api_key, max_tokens, cfg["eval.request_timeout"],
                                        models.load_tokenizer(str(source), setting=setting))
    return Chat(backends, retrieval, cfg["rag.top_k"], cfg["rag.context_tokens"])
