"""Read and validate MedQA (Mainland / MCMLE), build splits, export SFT and LLaMA-Factory files.

MedQA's ``data_clean`` layout::

    questions/Mainland/{train,dev,test}.jsonl     one question per line (5 options, A-E)
    questions/Mainland/4_options/*.jsonl          the same questions with 4 options
    textbooks/zh_paragraph/*.txt                  33 textbooks, one paragraph per line

Every question gets a stable id ``<file stem>:<line number>`` (``dev:1747``), so any result can
be traced back to its line. Bad input raises :class:`MedQAFormatError` naming the file, the line,
what is wrong and how to fix it. Exact duplicates and overlaps between roles are removed, counted and
reported; nothing else is dropped.
"""
from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

from . import files, prompts

REQUIRED_FIELDS = ("question", "options", "answer", "answer_idx", "meta_info")
# what an error about missing MedQA files adds: where they come from and where they go (the README shows the layout)
GET_MEDQA = (
    "These files are MedQA's data_clean folder: the GitHub project jind11/MedQA (https://github.com/jind11/MedQA) "
    "links its Google Drive download; unzip it, then put data_clean's contents at data/medqa/ in this project (the "
    "profile's data.medqa_dir) or point MEDQA_DIR at the data_clean folder. It holds "
    "questions/Mainland/{train,dev,test}.jsonl and textbooks/zh_paragraph/*.txt."
)
MAX_ERRORS_SHOWN = 20


class MedQAFormatError(ValueError):
    """A MedQA file that cannot be used as it is; the message names file, line(s) and fix."""


@dataclass(frozen=True)
class Question:
    id: str  # "<file stem>:<line>", e.g. "dev:1747"
    question: str
    options: dict[str, str]
    answer_idx: str  # the correct letter
    answer: str  # the correct option's text
    meta_info: str  # MedQA's section label

    def record(self) -> dict:
        """The MedQA row plus its id, as written to the split files."""
        return asdict(self)

    def messages(self, with_answer: bool = True, completion: str = "letter") -> list[dict]:
        return prompts.build_messages(self.question, self.options, self.answer_idx if with_answer else None,
                                      completion=completion)

    def permuted(self, order: list[str]) -> Question:
        """This question with its option contents moved: the new option ``A`` holds the old option
        ``order[0]``, and so on; the correct letter follows its content, the answer text is kept."""
        letters = sorted(self.options)
        if sorted(order) != letters:
            raise ValueError(f"{self.id}: {order} is not an ordering of the options {letters}")
        options = {new: self.options[old] for new, old in zip(letters, order, strict=True)}
        return replace(self, options=options, answer_idx=letters[order.index(self.answer_idx)])

    @property
    def content_key(self) -> tuple:
        """What makes two questions 'the same question': stem and options."""
        return (self.question, tuple(sorted(self.options.items())))

    @property
    def row_key(self) -> tuple:
        """What makes two rows exact duplicates: same question, options and answer.

        ``meta_info`` is left out on purpose: it is the section a question was filed under, and
        MedQA files a few identical questions under two sections.
        """
        return (*self.content_key, self.answer_idx, self.answer)


# --------------------------------------------------------------------------- reading


def _check_row(row: object) -> str | None:
    """What is wrong with one parsed row (None when it is a valid MedQA question)."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [f for f in REQUIRED_FIELDS if f not in row]
    if missing:
        return f"missing field(s) {', '.join(missing)} (a MedQA row has {', '.join(REQUIRED_FIELDS)})"
    q, opts, ans, idx = row["question"], row["options"], row["answer"], row["answer_idx"]
    if not isinstance(q, str) or not q.strip():
        return "empty question"
    if not isinstance(opts, dict) or len(opts) < 2:
        return f"options must be a dict of at least two letters to texts, like {{\"A\": \"...\", \"B\": \"...\"}}; got {opts!r:.80}"
    expected = list(string.ascii_uppercase[: len(opts)])
    if sorted(opts) != expected:
        return f"options must be keyed by the letters {', '.join(expected)}; got keys {list(opts)}"
    bad = [k for k, v in opts.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        return f"option(s) {', '.join(sorted(bad))} empty or not text"
    if not isinstance(row["meta_info"], str):
        return f"meta_info must be text; got {type(row['meta_info']).__name__}"
    if idx not in opts:
        return f"answer_idx {idx!r} is not among the options {', '.join(expected)}"
    if opts[idx] != ans:
        return f"answer {ans!r} differs from options[{idx!r}] = {opts[idx]!r}; one of answer / answer_idx is wrong"
    return None


def _question(row: dict, qid: str) -> Question:
    """A validated row as a :class:`Question` (options in letter order)."""
    return Question(
        id=qid, question=row["question"], options=dict(sorted(row["options"].items())),
        answer_idx=row["answer_idx"], answer=row["answer"], meta_info=row["meta_info"],
    )


@dataclass
class ReadReport:
    """What reading one jsonl file found."""

    path: Path
    rows: int = 0  # valid question rows
    blank_lines: int = 0  # whitespace-only lines, skipped


def json_problem(error: json.JSONDecodeError, line: str) -> str:
    """What is wrong with a line that is not JSON, in words: a line that stops before its JSON is complete
    looks cut off (a crash while writing, a truncated copy); anything else is named with its column."""
    if error.pos >= len(line.rstrip()):
        return f"the line looks cut off: it ends at column {len(line.rstrip())} before its JSON is complete"
    return f"invalid JSON: {error.msg} (column {error.colno})"


def read_questions(path: str | Path) -> tuple[list[Question], ReadReport]:
    """Read and validate one MedQA jsonl file, in file order.

    Every line is checked; if any is bad, one :class:`MedQAFormatError` lists them all
    (the first ``MAX_ERRORS_SHOWN``) as ``file:line: problem``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. {GET_MEDQA}")
    report = ReadReport(path)
    questions: list[Question] = []
    errors: list[str] = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.append(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8")
                continue
            if not line.strip():
                report.blank_lines += 1
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{path}:{line_no}: {json_problem(e, line)}; each line must be one JSON object")
                continue
            problem = _check_row(row)
            if problem:
                errors.append(f"{path}:{line_no}: {problem}")
                continue
            questions.append(_question(row, f"{path.stem}:{line_no}"))
    if errors:
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise MedQAFormatError(
            f"{len(errors)} bad line(s) in {path} (fix or delete them; nothing is skipped silently):\n  {shown}{more}"
        )
    report.rows = len(questions)
    return questions, report


# --------------------------------------------------------------------------- splits

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_\-]+)(?:\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


@dataclass(frozen=True)
class SplitSpec:
    """``dev``, ``dev[:2900]``, ``dev[2900:]``, ``train[100:200]``: a file and a slice of its rows."""

    name: str
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, spec: str) -> SplitSpec:
        m = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
        if not m:
            raise ValueError(
                f"bad split spec {spec!r}: use a file name with an optional Python slice, "
                f"like 'train', 'dev[:2900]' or 'dev[2900:]'"
            )
        to_int = lambda s: int(s) if s not in (None, "") else None  # noqa: E731
        return cls(m["name"], to_int(m["start"]), to_int(m["stop"]))

    def __str__(self) -> str:
        if self.start is None and self.stop is None:
            return self.name
        fmt = lambda v: "" if v is None else str(v)  # noqa: E731
        return f"{self.name}[{fmt(self.start)}:{fmt(self.stop)}]"

    def take(self, rows: list, source: Path | str = "") -> list:
        """Slice ``rows``; a bound beyond the file is an error, never a silently shorter split."""
        n = len(rows)
        for bound in (self.start, self.stop):
            if bound is not None and not -n <= bound <= n:
                raise ValueError(
                    f"split {self} asks for row {bound}, but {source or self.name} has only {n} rows; "
                    f"fix the slice in the profile (data.splits)"
                )
        taken = rows[self.start : self.stop]
        if not taken:
            raise ValueError(f"split {self} selects no rows of {source or self.name} ({n} rows): its start must come "
                             f"before its stop, e.g. {self.name}[:{max(n // 2, 1)}]; fix the slice in the profile (data.splits)")
        return taken


def dedupe(questions: list[Question]) -> tuple[list[Question], list[tuple[str, str]]]:
    """Drop exact duplicate rows (same question, options and answer), keeping the first.

    Returns the kept questions and ``(removed id, id it duplicates)`` pairs.
    """
    first: dict[tuple, str] = {}
    kept, removed = [], []
    for q in questions:
        if q.row_key in first:
            removed.append((q.id, first[q.row_key]))
        else:
            first[q.row_key] = q.id
            kept.append(q)
    return kept, removed


def conflicting_labels(questions: list[Question]) -> list[list[str]]:
    """Groups of ids with the same question and options but different answers (kept, reported)."""
    answers: dict[tuple, dict[str, str]] = {}
    for q in questions:
        answers.setdefault(q.content_key, {}).setdefault(q.answer_idx, q.id)
    return [sorted(ids.values()) for ids in answers.values() if len(ids) > 1]


def remove_overlap(questions: list[Question], reference: list[Question]) -> tuple[list[Question], list[str]]:
    """Drop questions whose stem and options also appear in ``reference`` (an earlier role's split)."""
    seen = {q.content_key for q in reference}
    kept = [q for q in questions if q.content_key not in seen]
    removed = [q.id for q in questions if q.content_key in seen]
    return kept, removed


# the roles a profile names, in the order they claim a question that appears in more than one: a question
# of validation that is also in train is dropped from validation, one of eval that is in either is dropped
# from eval. Validation is where anything is chosen (eval loss, the recipe, the debiasing prior); eval is
# only reported; replication (optional) only checks the pre-registered comparisons on questions nobody chose on.
ROLES = ("train", "validation", "eval", "replication")
OPTIONAL_ROLES = ("replication",)  # null in the profile, or its file absent: skipped with a reason, never an error


@dataclass
class Splits:
    """The questions of each role (``train``, ``validation``, ``eval``) and how they were made."""

    questions: dict[str, list[Question]]
    report: list[dict] = field(default_factory=list)  # one row per role, for a table
    duplicates: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    overlaps: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # role -> (removed id, earlier role)
    conflicts: dict[str, list[list[str]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # optional role -> why it has no questions

    def __getitem__(self, role: str) -> list[Question]:
        return self.questions[role]

    def table(self):
        """One row per role: rows read, sliced, removed (and why), kept."""
        return pd.DataFrame(self.report).set_index("role")

    def removed(self):
        """Every removed question: role, id, reason and the id it duplicates."""
        rows = [
            {"role": role, "id": qid, "reason": "exact duplicate", "same as": first}
            for role, pairs in self.duplicates.items() for qid, first in pairs
        ] + [
            {"role": role, "id": qid, "reason": f"also in {earlier}", "same as": ""}
            for role, pairs in self.overlaps.items() for qid, earlier in pairs
        ]
        return pd.DataFrame(rows, columns=["role", "id", "reason", "same as"])


def load_splits(questions_dir: str | Path, specs: dict[str, str], train_role: str = "train") -> Splits:
    """Build every role's split from its spec, e.g. ``{"train": "dev[:2400]", "validation":
    "dev[2400:2900]", "eval": "dev[2900:]"}``.

    Per role: read and validate the file, slice it, drop exact duplicates; then drop from each role
    the questions that also appear in a role before it (``train`` first, then the order of
    :data:`ROLES`, then any other role in the order given), so no question is in two roles. All
    counts are reported. An optional role (:data:`OPTIONAL_ROLES`) that is null, or whose file is
    absent (MedQA's ``test`` where only ``dev`` is at hand), is left out, with the reason in
    :attr:`Splits.skipped`.
    """
    questions_dir = Path(questions_dir)
    if train_role not in specs:
        raise ValueError(f"the splits {sorted(specs)} name no {train_role!r} role; add one in the profile (data.splits)")
    files: dict[str, tuple[list[Question], ReadReport]] = {}
    out = Splits(questions={})
    specs = dict(specs)
    for role in OPTIONAL_ROLES:
        if role in specs and specs[role] is None:
            del specs[role]
            out.skipped[role] = f"data.splits.{role} is null"
        elif role in specs and not (path := questions_dir / f"{SplitSpec.parse(specs[role]).name}.jsonl").is_file():
            out.skipped[role] = (f"data.splits.{role} = {specs[role]!r}, but {path} is absent: no {role} set in this run "
                                 f"(MedQA's data_clean has it; set data.splits.{role}: null to silence this)")
            del specs[role]
    order = [train_role] + [r for r in ROLES if r in specs and r != train_role] + \
        [r for r in specs if r not in ROLES and r != train_role]
    expected = sorted({f"{SplitSpec.parse(specs[role]).name}.jsonl" for role in order})
    if missing := [name for name in expected if not (questions_dir / name).is_file()]:
        where = (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not there" if questions_dir.is_dir()
                 else "that folder does not exist")
        raise FileNotFoundError(f"MedQA is missing or incomplete: the splits (data.splits) read {', '.join(expected)} "
                                f"in {questions_dir}, and {where}. {GET_MEDQA}")
    for role in order:
        spec = SplitSpec.parse(specs[role])
        if spec.name not in files:
            files[spec.name] = read_questions(questions_dir / f"{spec.name}.jsonl")
        rows, read = files[spec.name]
        sliced = spec.take(rows, read.path)
        kept, removed = dedupe(sliced)
        out.questions[role] = kept
        out.duplicates[role] = removed
        out.conflicts[role] = conflicting_labels(kept)
        out.report.append(
            {
                "role": role,
                "spec": str(spec),
                "rows_in_file": read.rows,
                "blank_lines": read.blank_lines,
                "rows_in_slice": len(sliced),
                "duplicates_removed": len(removed),
                "overlap_removed": 0,
                "conflicting_labels": len(out.conflicts[role]),
                "questions": len(kept),
            }
        )
    for i, row in enumerate(out.report):
        role, overlaps = row["role"], []
        for earlier in order[:i]:
            kept, removed = remove_overlap(out.questions[role], out.questions[earlier])
            out.questions[role] = kept
            overlaps += [(qid, earlier) for qid in removed]
        out.overlaps[role] = overlaps
        row["overlap_removed"] = len(overlaps)
        row["questions"] = len(out.questions[role])
    for row in out.report:
        assert row["questions"] == row["rows_in_slice"] - row["duplicates_removed"] - row["overlap_removed"]
        if not row["questions"]:
            earlier = ", ".join(f"{r} ({specs[r]})" for r in order[: order.index(row["role"])])
            raise ValueError(f"split {row['role']} = {row['spec']} is empty after removing the questions that are also "
                             f"in {earlier}: {row['overlap_removed']} of its {row['rows_in_slice']} rows overlap. Give the "
                             "roles rows that do not overlap in the profile (data.splits), e.g. train: dev[:2400], "
                             "validation: dev[2400:2900] and eval: dev[2900:]")
    return out


# --------------------------------------------------------------------------- writing


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_questions(questions: list[Question], path: str | Path) -> Path:
    """The clean split in MedQA's own format (plus ``id``), for every later notebook."""
    return files.write_text(path, _jsonl(q.record() for q in questions))


def split_path(cfg, role: str, kind: str = "questions") -> Path:
    """Where notebook 01 writes a split: ``outputs/<profile>/data/<kind>/<role>.jsonl``; ``kind`` is
    ``questions`` (the clean questions, with ids: what every later notebook reads) or ``sft`` (chat-format
    training examples, for other trainers)."""
    return cfg.out / "data" / kind / f"{role}.jsonl"


def ensure_splits(cfg) -> None:
    """The clean split files where training and the evaluations read them, written as notebook 01 writes
    them when any is missing: for a script or test that trains without running 01 (files there are kept)."""
    if all(split_path(cfg, role).is_file() for role in cfg["data.splits"] if role not in OPTIONAL_ROLES):
        return
    for role, questions in load_splits(cfg.questions_dir, cfg["data.splits"]).questions.items():
        write_questions(questions, split_path(cfg, role))


def write_splits(cfg, splits: Splits) -> list[Path]:
    """Notebook 01's split files: per role the clean questions and the chat-format SFT examples
    (:func:`split_path`); a skipped optional role's files from an earlier run are deleted, so that no
    later notebook reads a stale set as this run's."""
    written = []
    for role, questions in splits.questions.items():
        written.append(write_questions(questions, split_path(cfg, role)))
        written.append(write_sft_jsonl(questions, split_path(cfg, role, "sft")))
    for role in splits.skipped:
        for kind in ("questions", "sft"):
            split_path(cfg, role, kind).unlink(missing_ok=True)
    return written


def halves(questions: list[Question], seed: int) -> tuple[list[str], list[str]]:
    """Two halves of ``questions`` (their ids), stratified by the correct letter: within each letter the
    questions are shuffled with ``seed`` and dealt alternately, each letter's odd one out going to the half
    that is short. So both halves have the same gold-letter mix, and a letter habit cannot favour one."""
    rng = random.Random(f"halves-{seed}")
    by_letter: dict[str, list[str]] = {}
    for q in questions:
        by_letter.setdefault(q.answer_idx, []).append(q.id)
    first, second = [], []
    for letter in sorted(by_letter):
        ids = by_letter[letter]
        rng.shuffle(ids)
        a, b = (first, second) if len(first) <= len(second) else (second, first)
        a += ids[0::2]
        b += ids[1::2]
    return first, second


def replication_questions(cfg) -> tuple[list[Question], str | None]:
    """The replication set notebook 01 wrote (``data.splits.replication``), or ``([], why there is none)``."""
    spec = cfg["data.splits.replication"]
    if spec is None:
        return [], "data.splits.replication is null: no replication set in this profile"
    if not split_path(cfg, "replication").is_file():
        return [], (f"no replication set: data.splits.replication = {spec!r}, but notebook 01 wrote none "
                    f"({split_path(cfg, 'replication')} is absent: its MedQA file is missing, 01 says which)")
    return load_split(cfg, "replication"), None


def load_split(cfg, role: str) -> list[Question]:
    """The clean split of ``role`` (train, validation, eval) notebook 01 wrote (:func:`split_path`), validated again."""
    path = split_path(cfg, role)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run notebook 01_data with profile {cfg.name!r} first")
    questions = read_clean(path)
    if not questions:
        raise ValueError(
            f"{path} has no questions: the {role} split (data.splits.{role} = {cfg['data.splits'].get(role)!r}) "
            "is empty. Fix the split spec in the profile or the overrides, and rerun 01_data."
        )
    return questions


def eval_questions(cfg) -> list[Question]:
    """The questions the evaluations answer (06, 07, 08, 10): the eval split, its first ``eval.max_questions``
    (null: all of it)."""
    return load_split(cfg, "eval")[: cfg["eval.max_questions"]]


def read_clean(path: str | Path) -> list[Question]:
    """Read back a split written by :func:`write_questions` (ids kept, validated again)."""
    path = Path(path)
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MedQAFormatError(f"{path}:{line_no}: {json_problem(e, line)}; re-run notebook 01 to rewrite it") from None
        problem = _check_row(row) or (None if isinstance(row.get("id"), str) else "missing id")
        if problem:
            raise MedQAFormatError(f"{path}:{line_no}: {problem}; re-run notebook 01 to rewrite it")
        out.append(_question(row, row["id"]))
    return out


def write_sft_jsonl(questions: list[Question], path: str | Path) -> Path:
    """Chat-format SFT rows: ``{"id", "answer_idx", "meta_info", "messages": [system, user, assistant]}``."""
    rows = ({"id": q.id, "answer_idx": q.answer_idx, "meta_info": q.meta_info, "messages": q.messages()} for q in questions)
    return files.write_text(path, _jsonl(rows))


def write_llamafactory(splits: dict[str, list[Question]], out_dir: str | Path, prefix: str = "medqa_zh") -> list[Path]:
    """Alpaca-format json per split plus ``dataset_info.json``, for ``llamafactory-cli train``; returns the files.

    Same system prompt, user text and answer as the chat jsonl; point LLaMA-Factory's
    ``dataset_dir`` at ``out_dir`` and use ``dataset: medqa_zh_train`` with ``template: qwen``.
    """
    out_dir = Path(out_dir)
    info, written = {}, []
    for role, questions in splits.items():
        name = f"{prefix}_{role}"
        rows = [
            {
                "instruction": prompts.format_user(q.question, q.options),
                "input": "",
                "output": prompts.format_answer(q.answer_idx),
                "system": prompts.SYSTEM_PROMPT,
            }
            for q in questions
        ]
        written.append(files.write_text(out_dir / f"{name}.json", json.dumps(rows, ensure_ascii=False, indent=1)))
        info[name] = {
            "file_name": f"{name}.json",
            "formatting": "alpaca",
            "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system"},
        }
    written.append(files.write_text(out_dir / "dataset_info.json", json.dumps(info, ensure_ascii=False, indent=2)))
    return written


# --------------------------------------------------------------------------- textbooks


@dataclass
class Book:
    name: str  # file stem, e.g. "内科学"
    path: Path
    paragraphs: list[tuple[int, str]]  # (line number, text), blank lines left out
    lines: int  # all lines in the file
    blank_lines: int

    @property
    def characters(self) -> int:
        return sum(len(t) for _, t in self.paragraphs)


def read_textbook(path: str | Path) -> Book:
    """One ``zh_paragraph`` file: a paragraph per line; blank lines are skipped and counted."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = data[: e.start].count(b"\n") + 1
        raise MedQAFormatError(
            f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start}); textbooks must be UTF-8 "
            f"(convert it, e.g. `iconv -f GB18030 -t UTF-8`)"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":  # a final newline ends the last line; it starts no new one
        lines.pop()
    paragraphs, blank = [], 0
    for line_no, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if line.strip():
            paragraphs.append((line_no, line.strip()))
        else:
            blank += 1
    return Book(path.stem, path, paragraphs, len(lines), blank)


def read_textbooks(textbooks_dir: str | Path) -> list[Book]:
    """Every ``*.txt`` in ``textbooks_dir`` (MedQA: ``textbooks/zh_paragraph``), sorted by name."""
    textbooks_dir = Path(textbooks_dir)
    files = sorted(textbooks_dir.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"{textbooks_dir}: no *.txt textbooks (MedQA's textbooks/zh_paragraph holds 33). {GET_MEDQA}")
    return [read_textbook(p) for p in files]


def textbook_table(books: list[Book]):
    return pd.DataFrame(
        [
            {"book": b.name, "lines": b.lines, "blank_lines": b.blank_lines, "paragraphs": len(b.paragraphs), "characters": b.characters}
            for b in books
        ]
    )


def letter_counts(questions: list[Question]) -> Counter:
    return Counter(q.answer_idx for q in questions)
