"""Letter extraction from free-text answers: the forms models really write, and the traps."""
import pytest

from medqa_zh.answers import extract_letter

CASES = [
    # the trained format and its close relatives
    ("答案：B", "B"),
    ("答案:B", "B"),
    ("答案： B", "B"),
    ("答案是B", "B"),
    ("答案为C。", "C"),
    ("答案应该是D", "D"),
    ("正确答案是E", "E"),
    ("【答案】B", "B"),
    ("【答案】：A【解析】略", "A"),
    ("答案：B. 甲状腺功能亢进症", "B"),
    ("答案：(C)", "C"),
    ("答案：“D”", "D"),
    ("故选B", "B"),
    ("因此本题选C。", "C"),
    ("应选A", "A"),
    ("选B项", "B"),
    ("首选D", "D"),
    # a letter alone, wrapped, or followed by the option text
    ("B", "B"),
    ("B.", "B"),
    ("B、", "B"),
    ("(B)", "B"),
    ("（B）", "B"),
    ("Ｂ", "B"),
    ("答案：Ｃ", "C"),
    ("E. 青霉素", "E"),
    ("C 急性阑尾炎", "C"),
    ("C选项正确", "C"),
    ("我认为是D，因为患者有典型的三联征。", "D"),
    # English
    ("The answer is C.", "C"),
    ("Answer: A", "A"),
    ("answer: d", "D"),
    ("I think the correct option is E.", "E"),
    ("This is a tricky question, but the answer is B", "B"),  # stray lowercase "a"
    ("A patient with these findings most likely has B", "B"),  # "A" as an article is not a choice
    # explained answers that repeat the same letter
    ("答案：B。解析：……故选B。", "B"),
    # traps: no letter, or several that disagree
    ("", None),
    ("我不确定。", None),
    ("以上都不对", None),
    ("A和B", None),
    ("答案：A和B", None),
    ("A、C都正确", None),
    ("B or D", None),
    ("A. 甲\nB. 乙\nC. 丙\nD. 丁\nE. 戊", None),  # the option list echoed back
    ("答案是A……不对，答案应该是C", None),
    ("答案：F", None),  # not an option
    ("ABC", None),  # a word, not a letter
    ("DNA检测阳性", None),
    ("维生素B12缺乏", None),  # a letter inside a name
    ("答案：B，维生素B12缺乏", "B"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


def test_at_least_forty_cases():
    assert len(CASES) >= 40


def test_letters_outside_the_options_are_invalid():
    assert extract_letter("答案：E", options="ABCD") is None
    assert extract_letter("答案：D", options="ABCD") == "D"
