"""The one prompt format: SFT, direct evaluation, API evaluation, RAG and the demo all use it.

A multiple-choice question becomes a chat:

    system     SYSTEM_PROMPT
    user       the question, its options as "A. ...", one per line, and the answer instruction
    assistant  "答案：B"                 (train.completion: letter)
               "答案：B. <B's text>"      (train.completion: letter_text)

The letter always comes first, so letter scoring and answer parsing read the same position
whichever completion a model was trained on.

With retrieval (RAG, notebook 08) the user turn starts with the passages, each citing its book
(``format_context``); everything after them is unchanged.

The chat demo (09) uses the same format: a message that is a question with lettered options
becomes exactly this user turn (``chat_messages``); any other message is sent as typed, after the
passages when retrieval is on.

Letter scoring (later notebooks) reads the log-probability of each letter right after the
assistant's ``ANSWER_PREFIX``; generate-and-parse asks for exactly this line. Change the format
here and every path changes with it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

SYSTEM_PROMPT = "你是一名医学专家，正在解答中国执业医师资格考试的单项选择题。"
INSTRUCTION = "以下是一道单项选择题，请从选项中选出一个最佳答案。"
ANSWER_PREFIX = "答案："
ANSWER_FORMAT_HINT = f"请只回答“{ANSWER_PREFIX}”加上选项字母，例如“{ANSWER_PREFIX}A”。"
# GRPO's reasoning arm (grpo.arm: reasoning) only: a short analysis first, the same answer line last
REASONING_HINT = f"请先简要分析，最后单独一行写“{ANSWER_PREFIX}”加上选项字母，例如“{ANSWER_PREFIX}A”。"
CONTEXT_INTRO = "以下是可能相关的教材段落，仅供参考："


def format_options(options: Mapping[str, str]) -> str:
    """``A. 选项一`` lines, in letter order."""
    return "\n".join(f"{letter}. {options[letter]}" for letter in sorted(options))


def format_context(passages) -> str:
    """Retrieved passages as a numbered block that cites each passage's book:
    ``[1]《内科学》……``. ``passages``: (book, text) pairs, best first."""
    lines = [f"[{i}]《{book}》{text.strip()}" for i, (book, text) in enumerate(passages, start=1)]
    return CONTEXT_INTRO + "\n" + "\n".join(lines)


def format_user(question: str, options: Mapping[str, str], context=None, reasoning: bool = False) -> str:
    """The user turn: instruction, question, options, answer-format hint; with ``context`` (RAG:
    (book, text) pairs) the passages come first. Without context it is exactly the training prompt.
    ``reasoning``: :data:`REASONING_HINT` instead of the hint (GRPO's reasoning arm only)."""
    hint = REASONING_HINT if reasoning else ANSWER_FORMAT_HINT
    body = f"{INSTRUCTION}\n\n{question.strip()}\n\n{format_options(options)}\n\n{hint}"
    return f"{format_context(context)}\n\n{body}" if context else body


COMPLETIONS = ("letter", "letter_text")


def format_answer(letter: str, text: str | None = None) -> str:
    """The assistant turn the model is trained to produce: ``答案：B``, or with the option's
    ``text`` ``答案：B. 甲状腺``."""
    return f"{ANSWER_PREFIX}{letter}" if text is None else f"{ANSWER_PREFIX}{letter}. {text.strip()}"


def build_messages(question: str, options: Mapping[str, str], answer: str | None = None, context=None,
                   completion: str = "letter", reasoning: bool = False) -> list[dict]:
    """Chat messages for one question; with ``answer`` (a letter) the assistant turn is included,
    as ``completion`` says (``letter``: ``答案：B``; ``letter_text``: ``答案：B. <its text>``); with
    ``context`` ((book, text) pairs from retrieval) the passages precede the question."""
    if answer is not None and answer not in options:
        raise ValueError(f"answer {answer!r} is not one of the options {sorted(options)}")
    if completion not in COMPLETIONS:
        raise ValueError(f"completion must be one of {COMPLETIONS}, not {completion!r} (train.completion in the profile)")
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": format_user(question, options, context, reasoning)},
    ]
    if answer is not None:
        text = options[answer] if completion == "letter_text" else None
        messages.append({"role": "assistant", "content": format_answer(answer, text)})
    return messages


def answer_prompt(tokenizer, question: str, options: Mapping[str, str], context=None) -> str:
    """The rendered text right before the answer letter: the chat template with the assistant turn
    opened, plus ``ANSWER_PREFIX``. The model's next token after this text is its answer letter,
    which is what letter scoring reads and what the merge check compares. ``context``: retrieved
    (book, text) pairs, as in :func:`build_messages`."""
    text = tokenizer.apply_chat_template(build_messages(question, options, context=context), tokenize=False,
                                         add_generation_prompt=True)
    return text + ANSWER_PREFIX


_OPTION_LINE = re.compile(r"^\s*(?:[(（]([A-Ea-e])[)）]\s*[.．、:：]?|([A-Ea-e])\s*[.．、:：])\s*(\S.*)$")


def parse_question(text: str) -> tuple[str, dict[str, str]] | None:
    """A typed multiple-choice question, ``(question, {"A": ..., ...})``: the lines before the first
    option line are the question, and the options are lines such as ``A. ...``, ``B、...`` or
    ``(C) ...``, lettered A, B, C, ... in order (at least two). None when ``text`` is not one."""
    lines = text.strip().splitlines()
    first = next((i for i, line in enumerate(lines) if _OPTION_LINE.match(line)), None)
    if first is None or first == 0:
        return None
    options = {}
    for line in lines[first:]:
        if not line.strip():
            continue
        m = _OPTION_LINE.match(line)
        letter = (m.group(1) or m.group(2)).upper() if m else None
        if len(options) == 5 or letter != "ABCDE"[len(options)]:
            return None
        options[letter] = m.group(3).strip()
    question = "\n".join(lines[:first]).strip()
    # the user may have typed the instruction or the answer hint themselves: keep just the question
    question = question.replace(INSTRUCTION, "").strip()
    return (question, options) if len(options) >= 2 and question else None


def chat_messages(history: list[dict], message: str, context=None) -> list[dict]:
    """Messages for one chat turn: the system prompt, the earlier turns (``history``, role/content
    dicts) and ``message``. A message that :func:`parse_question` reads as a question with options
    becomes the evaluation's user turn (:func:`format_user`), so the demo asks exactly what was
    measured; any other message is sent as typed. ``context`` ((book, text) pairs) goes first."""
    parsed = parse_question(message)
    if parsed:
        user = format_user(*parsed, context=context)
    else:
        user = f"{format_context(context)}\n\n{message.strip()}" if context else message.strip()
    return [{"role": "system", "content": SYSTEM_PROMPT}, *history, {"role": "user", "content": user}]
