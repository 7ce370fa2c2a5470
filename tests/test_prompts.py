import pytest

from medqa_zh import prompts

OPTIONS = {"B": "乙", "A": "甲", "C": "丙"}


def test_user_turn_has_question_and_options_in_letter_order():
    text = prompts.format_user("  下列哪项正确？ ", OPTIONS)
    assert text.startswith(prompts.INSTRUCTION)
    assert "\n\n下列哪项正确？\n\nA. 甲\nB. 乙\nC. 丙\n\n" in text
    assert text.endswith(prompts.ANSWER_FORMAT_HINT)


def test_messages_with_and_without_answer():
    with_answer = prompts.build_messages("问题", OPTIONS, "C")
    assert [m["role"] for m in with_answer] == ["system", "user", "assistant"]
    assert with_answer[0]["content"] == prompts.SYSTEM_PROMPT
    assert with_answer[2]["content"] == "答案：C" == prompts.ANSWER_PREFIX + "C"
    assert prompts.build_messages("问题", OPTIONS) == with_answer[:2]


def test_answer_must_be_an_option():
    with pytest.raises(ValueError, match="'E' is not one of the options"):
        prompts.build_messages("问题", OPTIONS, "E")


def test_chat_template_renders_answer_as_the_last_assistant_turn(tiny_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    messages = prompts.build_messages("问题", OPTIONS, "B")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    # the generation prompt followed by the answer is exactly the training text
    assert text == prompt + "答案：B<|im_end|>\n"
    assert text.startswith(f"<|im_start|>system\n{prompts.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")


def test_tiny_template_renders_like_the_real_qwen_tokenizer(tiny_assets):
    """Where the Qwen2.5-class stand-in exists (../shared/tools/standin-models.sh), both agree."""
    import os
    from pathlib import Path

    from transformers import AutoTokenizer

    real = Path(os.environ.get("MEDQA_STANDIN_LM", Path.home() / ".cache/medqa-standin/qwen2.5-coder-0.5b-instruct"))
    if not (real / "tokenizer.json").is_file():
        pytest.skip(f"no Qwen2.5 tokenizer at {real} (run ../shared/tools/standin-models.sh)")
    messages = prompts.build_messages("问题", OPTIONS, "A")
    tiny = AutoTokenizer.from_pretrained(tiny_assets["model"])
    qwen = AutoTokenizer.from_pretrained(real)
    for msgs, gen in ((messages, False), (messages[:2], True), (messages[1:2], True)):
        assert tiny.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == qwen.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen
        )


def _standin_tokenizer_dir():
    import os
    from pathlib import Path

    return Path(os.environ.get("MEDQA_STANDIN_LM", Path.home() / ".cache/medqa-standin/qwen2.5-coder-0.5b-instruct"))


@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_answer_letter_is_one_token_right_after_the_answer_prompt(which, tiny_assets):
    """Letter scoring and the merge check read the logits after ``answer_prompt``; that only works
    if the training text tokenizes as answer_prompt's tokens + one token for the letter."""
    from transformers import AutoTokenizer

    path = tiny_assets["model"] if which == "tiny" else _standin_tokenizer_dir()
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"no Qwen2.5 tokenizer at {path} (run ../shared/tools/standin-models.sh)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = prompts.answer_prompt(tokenizer, "问题", OPTIONS)
    prompt_ids = tokenizer(prompt)["input_ids"]
    for letter in OPTIONS:
        full = tokenizer.apply_chat_template(prompts.build_messages("问题", OPTIONS, letter), tokenize=False)
        ids = tokenizer(full)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert tokenizer.decode(ids[len(prompt_ids)]) == letter


def test_rag_context_comes_first_cites_books_and_leaves_the_rest_unchanged():
    plain = prompts.build_messages("问题", OPTIONS)
    rag = prompts.build_messages("问题", OPTIONS, context=[("内科学", " 段落一。 "), ("病理学", "段落二。")])
    user = rag[1]["content"]
    assert user.startswith(prompts.CONTEXT_INTRO + "\n[1]《内科学》段落一。\n[2]《病理学》段落二。\n\n")
    assert user.endswith(plain[1]["content"]) and rag[0] == plain[0]
    assert prompts.build_messages("问题", OPTIONS, context=[]) == plain  # no passages: the training prompt


@pytest.mark.parametrize("text, expected", [
    ("下列哪项正确？\nA. 甲\nB. 乙", ("下列哪项正确？", {"A": "甲", "B": "乙"})),
    ("多行\n题干？\nA、甲\n\nB、乙\nC：丙", ("多行\n题干？", {"A": "甲", "B": "乙", "C": "丙"})),
    ("题干\n(A) 甲\n（B）乙", ("题干", {"A": "甲", "B": "乙"})),
    (f"{prompts.INSTRUCTION}\n\n题干\na. 甲\nb. 乙", ("题干", {"A": "甲", "B": "乙"})),
    ("你好，请解释高血压。", None),  # no options
    ("题干\nA. 甲", None),  # one option is not a choice
    ("题干\nA. 甲\nC. 丙", None),  # letters out of order
    ("A. 甲\nB. 乙", None),  # no question
    ("题干\nA. 甲\nB. 乙\n还有一句", None),  # text after the options: not a plain question
])
def test_parse_question(text, expected):
    assert prompts.parse_question(text) == expected


def test_chat_messages_reuse_the_evaluated_prompt_for_a_typed_question():
    options = {"A": "甲", "B": "乙"}
    context = [("内科学", "一段文字。")]
    assert prompts.chat_messages([], "题干\nA. 甲\nB. 乙") == prompts.build_messages("题干", options)
    assert prompts.chat_messages([], "题干\nA. 甲\nB. 乙", context) == prompts.build_messages("题干", options,
                                                                                           context=context)
    history = [{"role": "user", "content": "上一题"}, {"role": "assistant", "content": "答案：A"}]
    free = prompts.chat_messages(history, " 为什么？ ", context)
    assert free[0]["role"] == "system" and free[1:3] == history
    assert free[3]["content"] == prompts.format_context(context) + "\n\n为什么？"
    assert prompts.chat_messages([], "为什么？")[-1]["content"] == "为什么？"
