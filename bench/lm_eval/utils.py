"""Hooks of the ``medqa_zh`` lm-evaluation-harness task (``medqa_zh.yaml``): the questions from a
clean split that notebook 01 wrote, the user turn from ``medqa_zh.prompts`` and the letter from
``medqa_zh.answers``, so the harness asks and reads exactly as notebook 07 does. The system turn
is passed on lm_eval's command line (``--system_instruction``, see docs/serving.md)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lib"))  # the project's lib, stdlib-only modules

from medqa_zh import answers, prompts  # noqa: E402


def load(path: str | None = None, **_):
    """The questions of a jsonl split (one MedQA row per line) as the task's ``test`` split."""
    import datasets

    if path is None:
        raise ValueError('the medqa_zh task needs its questions: --metadata \'{"path": "outputs/cpu/data/questions/eval.jsonl"}\'')
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        row = json.loads(line)
        # options as a JSON string: a datasets struct would give every row the union of the letters
        rows.append({"id": row.get("id", f"{Path(path).stem}:{number}"), "question": row["question"],
                     "options": json.dumps(row["options"], ensure_ascii=False), "answer_idx": row["answer_idx"]})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_text(doc) -> str:
    return prompts.format_user(doc["question"], json.loads(doc["options"]))


def process_results(doc, results):
    letter = answers.extract_letter(results[0], "".join(sorted(json.loads(doc["options"]))))
    return {"acc": float(letter == doc["answer_idx"]), "unparseable": float(letter is None)}
