"""Read the chosen option letter out of a model's free-text answer.

The model is trained and prompted to answer ``答案：B``, but a base model (or one served by
someone else) answers in many ways: ``答案是B``, ``故选B``, ``【答案】B``, ``(B)``, ``B. 甲状腺``,
``The answer is B``, a full-width ``Ｂ``... :func:`extract_letter` reads all of these and
returns ``None`` (counted as wrong, never dropped) when the text names no option letter or names
several that disagree.

No ``\\b`` anywhere: Python's ``\\b`` treats Chinese characters as word characters, so ``\\bB\\b``
fails on ``选B项``. Letters are delimited by "not an ASCII letter" instead.
"""
from __future__ import annotations

import re
import unicodedata

LETTERS = "ABCDE"

_NOT_ASCII_LETTER_BEFORE = r"(?<![A-Za-z])"
_NOT_ASCII_LETTER_AFTER = r"(?![A-Za-z])"
_OPEN = r"[\s(\[【{<'\"“‘]*"  # brackets or quotes that may wrap the letter (after NFKC)
# a letter, or several joined ("A和B", "A、C", "B or D"): several are not one answer
_CHAIN = r"([A-Ea-e](?:\s*(?:和|与|及|或|、|,|/|&|and|or)\s*[A-Ea-e])*)" + _NOT_ASCII_LETTER_AFTER
_AFTER_MARKER = r"\s*(?:应该|应|是|为|选|:|=|】|\]|\))*" + _OPEN + _CHAIN

# Explicit statements of the answer, strongest first; case-insensitive.
_STRONG = re.compile(r"(?:答案|故选|应选|当选|answer\s*(?:is)?)" + _AFTER_MARKER, re.IGNORECASE)
_WEAK = re.compile(r"(?:选择|选项|选)" + _AFTER_MARKER, re.IGNORECASE)
# Any standalone capital letter (or chain). Not "A patient ..." (an English article), and not a
# letter inside a name such as "维生素B12".
_STANDALONE = re.compile(
    _NOT_ASCII_LETTER_BEFORE + r"(?!A\s+[a-z])([A-E](?:\s*(?:和|与|及|或|、|,|/|&)\s*[A-E])*)(?![A-Za-z0-9])"
)


def normalize(text: str) -> str:
    """NFKC: full-width letters, digits, colons and brackets become their ASCII forms."""
    return unicodedata.normalize("NFKC", text)


def _decide(chains: list[str], allowed: str) -> str | None:
    letters = {c.upper() for chain in chains for c in re.findall(r"(?<![A-Za-z])[A-Ea-e](?![A-Za-z])", chain)}
    if len(letters) != 1:
        return None
    (letter,) = letters
    return letter if letter in allowed else None


def extract_letter(text: str | None, options: str = LETTERS) -> str | None:
    """The option letter ``text`` chooses, or ``None``.

    The first of these that finds a letter decides: letters after a strong answer marker
    (``答案``, ``故选``, ``answer is``...); after a weak one (``选``, ``选项``); standalone capital
    letters anywhere. Exactly one distinct letter is the answer; several different ones (``A和B``,
    an echoed option list) or a letter not among ``options`` give ``None``.
    """
    if not text:
        return None
    text = normalize(text).strip()
    for pattern in (_STRONG, _WEAK, _STANDALONE):
        found = pattern.findall(text)
        if found:
            return _decide(found, options)
    return None
