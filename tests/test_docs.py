"""The docs say only what is true (issue 44): every `section.key` that README.md or docs/*.md writes in
backticks, where section is a top-level key of profiles/base.yaml, is a setting of base.yaml. A function is
written with its parentheses (`train.auto_tokens()`), a file by its name (`smoke.yaml`): neither reads as a setting."""
import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# `section.key`, optionally followed by a value (`train.padding_free: true`, `seed=1`, `eval.rotations false`)
KEY = re.compile(r"^([a-z_]+)\.([a-z_][a-z_0-9.]*)(?:[:= ].*)?$")
FILE = re.compile(r"\.(ya?ml|json|jsonl|safetensors|py|md|csv|png|html|gguf)$")


def _has(tree, parts) -> bool:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def settings_that_are_not(text: str, base: dict) -> list[tuple[int, str]]:
    """(line, span) for each backticked `section.key` of ``text`` that ``base`` does not have."""
    bad = []
    for n, line in enumerate(text.splitlines(), 1):
        for span in re.findall(r"`([^`]+)`", line):
            m = KEY.match(span.strip())
            if m and m.group(1) in base and not FILE.search(span.strip()) and not _has(
                    base, [m.group(1), *m.group(2).split(".")]):
                bad.append((n, span))
    return bad


def test_the_rule_tells_settings_from_functions_files_and_gone_keys():
    base = {"train": {"padding_free": False, "lora": {"r": 16}}, "serve": {"backend": "auto"}, "seed": 0}
    text = ("`train.padding_free: true` `train.lora.r` `train.auto_tokens()` `smoke.yaml` `seed`\n"
            "`train.auto_tokens` and `serve.continuous_batching: false`, `train.lora.rank=8`, `model.dtype`")
    assert settings_that_are_not(text, base) == [
        (2, "train.auto_tokens"), (2, "serve.continuous_batching: false"), (2, "train.lora.rank=8")]


def test_every_setting_the_docs_name_is_in_the_base_profile():
    base = yaml.safe_load((REPO / "profiles" / "base.yaml").read_text(encoding="utf-8"))
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) > 3
    bad = [f"{page.relative_to(REPO)}:{n}: `{span}`" for page in pages
           for n, span in settings_that_are_not(page.read_text(encoding="utf-8"), base)]
    assert not bad, ("not settings of profiles/base.yaml (a function is written with its parentheses, "
                     "`train.auto_tokens()`; a removed setting is told as history, not as a key):\n" + "\n".join(bad))


def _summary(notebook: Path) -> str:
    """The 中文摘要 cell: the second cell of every notebook."""
    cell = json.loads(notebook.read_text(encoding="utf-8"))["cells"][1]
    return "".join(cell["source"])


def test_the_chinese_summaries_say_what_the_english_says():
    notebooks = sorted((REPO / "notebooks").glob("[01][0-9]_*.ipynb"))
    assert len(notebooks) == 10
    summaries = {nb.name[:2]: _summary(nb) for nb in notebooks}
    # the cpu run times: the ones docs/results-cpu.md gives per notebook ("Per notebook: 01 0.2, 02 22.2 (...), ...")
    results = (REPO / "docs" / "results-cpu.md").read_text(encoding="utf-8")
    sentence = re.search(r"Per notebook: (.*?) minutes\.", results, re.S).group(1)
    measured = dict(re.findall(r"\b(0[1-9]|10) (\d+(?:\.\d+)?)\b", re.sub(r"\([^()]*\)", "", sentence)))
    assert sorted(measured) == sorted(summaries), measured
    for nb, text in summaries.items():
        said = re.search(r"cpu 配置（2 核 CPU，实测）([\d.]+) 分钟", text).group(1)
        assert said == measured[nb], f"{nb}: the summary says {said} minutes, docs/results-cpu.md {measured[nb]}"
    once = re.search(r"about (\d+) minutes once", results).group(1)  # embedding the corpus, the first time
    assert f"首次为全部教材段落计算向量约需 {once} 分钟" in summaries["08"]
    # one term for pre-registration; memory that is not only a GPU's; the loss where train.loss_on puts it
    assert not any("预先登记" in text for text in summaries.values())
    assert all("内存/显存" in text for text in summaries.values() if "显存" in text)
    assert "损失只算在答案上" not in summaries["02"] and "`train.loss_on`" in summaries["02"]


def test_the_readme_gives_medqa_s_layout_and_source():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    tree = next(block for block in re.findall(r"```text\n(.*?)```", readme, re.S) if "questions/Mainland/" in block)
    for part in ("data/medqa/", "$MEDQA_DIR", "train.jsonl", "dev.jsonl", "test.jsonl", "textbooks/zh_paragraph/",
                 "*.txt"):
        assert part in tree, part
    assert "[jind11/MedQA](https://github.com/jind11/MedQA)" in readme and "data_clean" in readme


# Each notebook's English markdown, in characters (the 中文摘要 cell left out), as issue 52 left it (never more than when
# it began): a cell that shows code replaces prose that described it, so no notebook's prose may grow. Lower it when
# a notebook shrinks.
PROSE_BUDGET = {"01_data": 5135, "02_lora_sft": 5068, "03_full_sft": 1872, "04_merge": 7270, "04b_grpo": 5831,
                "05_serve": 2807, "06_eval_direct": 8716, "07_eval_api": 2763, "08_eval_rag": 6057,
                "09_chat_demo": 2812, "10_report": 6413}


def prose_characters(path: Path) -> int:
    """The characters of a notebook's markdown cells, its Chinese summary (the cell that opens with **中文摘要**) left out."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    texts = ("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return sum(len(t) for t in texts if not t.lstrip().startswith("**中文摘要**"))


def test_no_notebooks_prose_grows():
    found = {path.stem: prose_characters(path) for path in sorted((REPO / "notebooks").glob("*.ipynb"))}
    assert sorted(found) == sorted(PROSE_BUDGET), "a notebook was added or renamed: give it its budget"
    grown = {name: f"{PROSE_BUDGET[name]} -> {n}" for name, n in found.items() if n > PROSE_BUDGET[name]}
    assert not grown, f"these notebooks' prose grew (characters, 中文摘要 left out): {grown}; show it in code instead"
