"""The one prompt format: SFT, direct evaluation, API evaluation, RAG and the demo all use it.

A multiple-choice question becomes a chat:

    system     SYSTEM_PROMPT
    user       the question, its options as "A. ...", one per line, and the answer instruction
    assistant  "答案：B"

Letter scoring (later notebooks) reads the log-probability of each letter right after the
assistant's ``ANSWER_PREFIX``; generate-and-parse asks for exactly this line. Change the format
here and every path changes with it.
"""
from __future__ import annotations

from collections.abc import Mapping

SYSTEM_PROMPT = "你是一名医学专家，正在解答中国执业医师资格考试的单项选择题。"
INSTRUCTION = "以下是一道单项选择题，请从选项中选出一个最佳答案。"
ANSWER_PREFIX = "答案："
ANSWER_FORMAT_HINT = f"请只回答“{ANSWER_PREFIX}”加上选项字母，例如“{ANSWER_PREFIX}A”。"


def format_options(options: Mapping[str, str]) -> str:
    """``A. 选项一`` lines, in letter order."""
    return "\n".join(f"{letter}. {options[letter]}" for letter in sorted(options))


def format_user(question: str, options: Mapping[str, str]) -> str:
    """The user turn: instruction, question, options, answer-format hint."""
    return f"{INSTRUCTION}\n\n{question.strip()}\n\n{format_options(options)}\n\n{ANSWER_FORMAT_HINT}"


def format_answer(letter: str) -> str:
    """The assistant turn the model is trained to produce: ``答案：B``."""
    return f"{ANSWER_PREFIX}{letter}"


def build_messages(question: str, options: Mapping[str, str], answer: str | None = None) -> list[dict]:
    """Chat messages for one question; with ``answer`` (a letter) the assistant turn is included."""
    if answer is not None and answer not in options:
        raise ValueError(f"answer {answer!r} is not one of the options {sorted(options)}")
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": format_user(question, options)},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": format_answer(answer)})
    return messages


def answer_prompt(tokenizer, question: str, options: Mapping[str, str]) -> str:
    """The rendered text right before the answer letter: the chat template with the assistant turn
    opened, plus ``ANSWER_PREFIX``. The model's next token after this text is its answer letter,
    which is what letter scoring reads and what the merge check compares."""
    text = tokenizer.apply_chat_template(build_messages(question, options), tokenize=False, add_generation_prompt=True)
    return text + ANSWER_PREFIX
