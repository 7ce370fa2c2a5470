import json
import re

import pytest

from helpers import row, write_jsonl
from medqa_zh import config, data, prompts
from medqa_zh.data import MedQAFormatError, SplitSpec

# --------------------------------------------------------------------------- validation

BAD_ROWS = {
    "cut-off JSON": ('{"question": "x", "options": ', "the line looks cut off: it ends at column 28"),
    "invalid JSON": ('{"question": "x",, "options": {}}', "invalid JSON: Expecting property name"),
    "not an object": ("[1, 2, 3]", "expected a JSON object"),
    "missing field": (row(answer_idx=None), "missing field(s) answer_idx"),
    "missing meta_info": (row(meta_info=None), "missing field(s) meta_info"),
    "options not a dict": (row(options=["甲", "乙"]), "options must be a dict"),
    "options not letters": (row(options={"1": "甲", "2": "乙"}, answer_idx="1", answer="甲"), "keyed by the letters A, B"),
    "options skip a letter": (row(options={"A": "甲", "C": "丙"}, answer_idx="A", answer="甲"), "keyed by the letters A, B"),
    "empty option": (row(options={"A": "甲", "B": " "}, answer_idx="A", answer="甲"), "option(s) B empty"),
    "answer_idx not an option": (row(answer_idx="F"), "answer_idx 'F' is not among the options A, B, C, D, E"),
    "answer differs from option": (row(answer="丙"), "differs from options['B']"),
    "empty question": (row(question="  "), "empty question"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_each_bad_row_names_file_line_and_problem(tmp_path, case):
    bad, expected = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "dev.jsonl", [row(), row(question="第二题"), bad])
    with pytest.raises(MedQAFormatError) as err:
        data.read_questions(path)
    message = str(err.value)
    assert f"{path}:3:" in message
    assert expected in message
    assert "at at" not in message


def test_all_bad_lines_are_listed_at_once(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [row(question=""), row(), "not json", row(answer_idx="Z")])
    with pytest.raises(MedQAFormatError) as err:
        data.read_questions(path)
    message = str(err.value)
    assert message.startswith("3 bad line(s)")
    for line in (1, 3, 4):
        assert f"{path}:{line}:" in message
    assert f"{path}:2:" not in message


def test_non_utf8_line_is_named(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_bytes(json.dumps(row(), ensure_ascii=False).encode() + b"\n" + "下列".encode("gb18030") + b"\n")
    with pytest.raises(MedQAFormatError, match=r"dev.jsonl:2: not UTF-8"):
        data.read_questions(path)


def test_missing_file_says_which_setting_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="MEDQA_DIR"):
        data.read_questions(tmp_path / "nope.jsonl")


def test_missing_or_incomplete_medqa_names_the_files_their_source_and_their_place(tmp_path):
    """issue 44: 01's error for a missing or incomplete MEDQA_DIR says which files it expected, where they come
    from (MedQA's data_clean, linked from github.com/jind11/MedQA) and where they go (data/medqa/ or MEDQA_DIR)."""
    qdir = tmp_path / "data_clean" / "questions" / "Mainland"
    write_jsonl(qdir / "dev.jsonl", [row(question=f"题{i}") for i in range(4)])  # incomplete: no train.jsonl
    with pytest.raises(FileNotFoundError) as e:
        data.load_splits(qdir, {"train": "train", "validation": "dev[:2]", "eval": "dev[2:]"})
    said = str(e.value)
    assert said.startswith("MedQA is missing or incomplete: the splits (data.splits) read dev.jsonl, train.jsonl "
                           f"in {qdir}, and train.jsonl is not there. These files are MedQA's data_clean folder")
    for part in ("MedQA's data_clean folder", "jind11/MedQA", "Google Drive", "data/medqa/", "MEDQA_DIR",
                 "questions/Mainland/{train,dev,test}.jsonl", "textbooks/zh_paragraph/*.txt"):
        assert part in said, part
    with pytest.raises(FileNotFoundError, match=r"read test.jsonl, train.jsonl in .*nowhere/questions/Mainland, and "
                                                "that folder does not exist"):
        data.load_splits(tmp_path / "nowhere" / "questions" / "Mainland", {"train": "train", "eval": "test"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"read test.jsonl, train.jsonl in .*empty, and "
                                                "test.jsonl, train.jsonl are not there"):
        data.load_splits(tmp_path / "empty", {"train": "train", "eval": "test"})
    with pytest.raises(FileNotFoundError) as e:
        data.read_textbooks(tmp_path / "data_clean" / "textbooks" / "zh_paragraph")
    assert "no *.txt textbooks" in str(e.value) and data.GET_MEDQA in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        data.read_questions(qdir / "test.jsonl")
    assert str(e.value) == f"{qdir / 'test.jsonl'}: no such file. {data.GET_MEDQA}"


def test_valid_file_reads_in_order_with_line_ids_and_counts_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [row(question="一"), "", "   ", row(question="二")])
    questions, report = data.read_questions(path)
    assert [q.question for q in questions] == ["一", "二"]
    assert [q.id for q in questions] == ["dev:1", "dev:4"]
    assert (report.rows, report.blank_lines) == (2, 2)
    assert questions[0].options["B"] == questions[0].answer == "乙"


def test_four_option_rows_are_valid(tmp_path):
    four = row(options={"A": "甲", "B": "乙", "C": "丙", "D": "丁"})
    questions, _ = data.read_questions(write_jsonl(tmp_path / "dev.jsonl", [four]))
    assert list(questions[0].options) == ["A", "B", "C", "D"]


# --------------------------------------------------------------------------- split specs


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("train", SplitSpec("train")),
        ("dev[:2900]", SplitSpec("dev", None, 2900)),
        ("dev[2900:]", SplitSpec("dev", 2900, None)),
        ("test[10:20]", SplitSpec("test", 10, 20)),
        ("dev[-100:]", SplitSpec("dev", -100, None)),
        (" dev[:5] ", SplitSpec("dev", None, 5)),
    ],
)
def test_split_spec_parses(spec, parsed):
    assert SplitSpec.parse(spec) == parsed
    assert SplitSpec.parse(str(parsed)) == parsed


@pytest.mark.parametrize("spec", ["", "dev[", "dev[1]", "dev[a:b]", "dev[1:2:3]", "dev/../x", 42])
def test_bad_split_spec_explains_the_form(spec):
    with pytest.raises(ValueError, match="like 'train', 'dev\\[:2900\\]'"):
        SplitSpec.parse(spec)


def test_split_slices_rows_and_refuses_to_silently_shrink():
    rows = list(range(10))
    assert SplitSpec.parse("dev[:7]").take(rows) == list(range(7))
    assert SplitSpec.parse("dev[7:]").take(rows) == [7, 8, 9]
    assert SplitSpec.parse("dev[-2:]").take(rows) == [8, 9]
    with pytest.raises(ValueError, match="has only 10 rows"):
        SplitSpec.parse("dev[:2900]").take(rows)


# --------------------------------------------------------------------------- duplicates and overlap


def _questions(tmp_path, rows, name="dev"):
    return data.read_questions(write_jsonl(tmp_path / f"{name}.jsonl", rows))[0]


def test_exact_duplicates_are_removed_and_reported(tmp_path):
    a, b = row(question="一"), row(question="二")
    qs = _questions(tmp_path, [a, b, a, dict(a, meta_info="另一章"), b])
    kept, removed = data.dedupe(qs)
    assert [q.id for q in kept] == ["dev:1", "dev:2"]
    assert removed == [("dev:3", "dev:1"), ("dev:4", "dev:1"), ("dev:5", "dev:2")]


def test_same_stem_with_other_options_or_answer_is_not_a_duplicate(tmp_path):
    base = row()
    other_options = row(options={"A": "甲", "B": "乙", "C": "丙", "D": "丁", "E": "己"})
    other_answer = row(answer_idx="C", answer="丙")
    qs = _questions(tmp_path, [base, other_options, other_answer])
    kept, removed = data.dedupe(qs)
    assert len(kept) == 3 and removed == []
    assert data.conflicting_labels(kept) == [["dev:1", "dev:3"]]


def test_overlap_with_train_is_removed(tmp_path):
    train = _questions(tmp_path, [row(question="一"), row(question="二")], "train")
    same_stem_other_options = row(question="二", options={"A": "甲", "B": "乙"})
    test = _questions(tmp_path, [row(question="二", answer_idx="A", answer="甲"), row(question="三"), same_stem_other_options], "test")
    kept, removed = data.remove_overlap(test, train)
    assert removed == ["test:1"]  # same stem and options (even with another answer)
    assert [q.id for q in kept] == ["test:2", "test:3"]


def test_load_splits_counts_add_up(tmp_path):
    qdir = tmp_path / "questions"
    rows = [row(question=f"题{i}") for i in range(10)]
    rows.insert(3, rows[1])  # a duplicate inside the train slice
    rows.append(rows[2])  # a copy of a train question inside the eval slice
    write_jsonl(qdir / "dev.jsonl", rows)
    splits = data.load_splits(qdir, {"train": "dev[:8]", "eval": "dev[8:]"})
    report = {r["role"]: r for r in splits.report}
    assert report["train"]["rows_in_slice"] == 8 and report["train"]["duplicates_removed"] == 1
    assert report["eval"]["rows_in_slice"] == 4 and report["eval"]["overlap_removed"] == 1
    assert [len(splits["train"]), len(splits["eval"])] == [7, 3]
    assert splits.overlaps["eval"] == [("dev:12", "train")]
    train_ids = {q.id for q in splits["train"]}
    assert not train_ids & {q.id for q in splits["eval"]}
    assert list(splits.table().index) == ["train", "eval"]
    removed = splits.removed()
    assert list(removed["reason"]) == ["exact duplicate", "also in train"]
    assert list(removed["id"]) == ["dev:4", "dev:12"]


def test_three_roles_share_no_question(tmp_path):
    """train, validation and eval: a question in two roles stays only in the first of them
    (train, then validation), whatever order the profile lists them in."""
    qdir = tmp_path / "questions"
    rows = [row(question=f"题{i}") for i in range(12)]
    rows += [rows[1], rows[5], rows[2]]  # dev:13 copies train, dev:14 copies validation, dev:15 copies train
    write_jsonl(qdir / "dev.jsonl", rows)
    rows[7] = rows[0]
    write_jsonl(qdir / "dev.jsonl", rows)  # dev:8, in validation, copies a train question
    splits = data.load_splits(qdir, {"eval": "dev[9:]", "validation": "dev[4:9]", "train": "dev[:4]"})
    ids = {role: {q.id for q in splits[role]} for role in ("train", "validation", "eval")}
    keys = {role: {q.content_key for q in splits[role]} for role in ids}
    for a, b in (("train", "validation"), ("train", "eval"), ("validation", "eval")):
        assert not ids[a] & ids[b] and not keys[a] & keys[b], (a, b)
    assert splits.overlaps == {"train": [], "validation": [("dev:8", "train")],
                               "eval": [("dev:13", "train"), ("dev:15", "train"), ("dev:14", "validation")]}
    assert sorted(ids["eval"]) == ["dev:10", "dev:11", "dev:12"] and len(ids["validation"]) == 4
    table = splits.table()
    assert list(table.index) == ["train", "validation", "eval"]
    assert list(table["overlap_removed"]) == [0, 1, 3]
    assert set(splits.removed()["reason"]) == {"also in train", "also in validation"}


@pytest.mark.parametrize("spec", ["dev[5:2]", "dev[10:]", "dev[-1:-3]"])
def test_a_slice_that_selects_nothing_names_the_spec_and_the_fix(spec):
    with pytest.raises(ValueError, match=rf"split {re.escape(spec)} selects no rows of dev \(10 rows\).*data.splits"):
        SplitSpec.parse(spec).take(list(range(10)))


def test_an_eval_split_emptied_by_the_overlap_with_train_names_both_specs(tmp_path):
    qdir = tmp_path / "questions"
    write_jsonl(qdir / "dev.jsonl", [row(question=f"题{i}") for i in range(10)])
    with pytest.raises(ValueError, match=r"split eval = dev\[:4\] is empty .* in train \(dev\[:8\]\): 4 of its 4 rows"):
        data.load_splits(qdir, {"train": "dev[:8]", "eval": "dev[:4]"})


def test_the_replication_set_is_a_fourth_role_sharing_no_question(tmp_path):
    qdir = tmp_path / "questions"
    write_jsonl(qdir / "dev.jsonl", [row(question=f"题{i}") for i in range(10)])
    write_jsonl(qdir / "test.jsonl", [row(question="题1"), row(question="题8"), row(question="新题")])
    splits = data.load_splits(qdir, {"train": "dev[:6]", "eval": "dev[6:]", "replication": "test"})
    assert [q.id for q in splits["replication"]] == ["test:3"]  # one repeats train, one repeats eval
    assert splits.overlaps["replication"] == [("test:1", "train"), ("test:2", "eval")]
    assert list(splits.table().index) == ["train", "eval", "replication"] and not splits.skipped


@pytest.mark.parametrize("spec", [None, "test[:500]"])
def test_a_replication_set_that_is_null_or_absent_is_skipped_with_the_reason(tmp_path, spec):
    qdir = tmp_path / "questions"
    write_jsonl(qdir / "dev.jsonl", [row(question=f"题{i}") for i in range(10)])
    splits = data.load_splits(qdir, {"train": "dev[:6]", "eval": "dev[6:]", "replication": spec})
    assert list(splits.questions) == ["train", "eval"]
    why = splits.skipped["replication"]
    assert why == "data.splits.replication is null" if spec is None else (
        f"{qdir / 'test.jsonl'} is absent" in why and "data.splits.replication: null" in why)


def test_01_deletes_a_stale_replication_set_and_later_notebooks_say_why_there_is_none(smoke):
    cfg = smoke()
    splits = data.load_splits(cfg.questions_dir, cfg["data.splits"])
    data.write_splits(cfg, splits)
    got, why = data.replication_questions(cfg)
    assert why is None and [q.id for q in got] == [q.id for q in splits["replication"]]
    absent = smoke(**{"data.splits.replication": "nosuchfile[:10]"})
    data.write_splits(absent, data.load_splits(absent.questions_dir, absent["data.splits"]))
    assert not data.split_path(absent, "replication").exists() and not data.split_path(absent, "replication", "sft").exists()
    got, why = data.replication_questions(absent)
    assert got == [] and "notebook 01 wrote none" in why and "'nosuchfile[:10]'" in why
    assert data.replication_questions(smoke(**{"data.splits.replication": None})) == (
        [], "data.splits.replication is null: no replication set in this profile")


def test_halves_are_disjoint_seeded_and_stratified_by_the_correct_letter(tmp_path):
    rows = [row(question=f"题{i}", answer_idx=letter, answer=row()["options"][letter])
            for i, letter in enumerate("AAAAABBBCCCCCCCDDE" * 3)]
    qs = _questions(tmp_path, rows)
    first, second = data.halves(qs, seed=0)
    assert sorted(first + second) == sorted(q.id for q in qs) and not set(first) & set(second)
    assert abs(len(first) - len(second)) <= 1
    letter = {q.id: q.answer_idx for q in qs}
    for x in "ABCDE":
        assert abs(sum(letter[i] == x for i in first) - sum(letter[i] == x for i in second)) <= 1, x
    assert data.halves(qs, seed=0) == (first, second) and data.halves(qs, seed=1) != (first, second)


def test_load_splits_needs_a_train_role(tmp_path):
    with pytest.raises(ValueError, match="no 'train' role"):
        data.load_splits(tmp_path, {"eval": "test"})


# --------------------------------------------------------------------------- writing


def test_clean_split_roundtrips(tmp_path):
    qs = _questions(tmp_path, [row(question="一"), row(question="二", answer_idx="E", answer="戊")])
    path = data.write_questions(qs, tmp_path / "out" / "eval.jsonl")
    assert data.read_clean(path) == qs


def test_damaged_clean_split_names_file_line_and_fix(tmp_path):
    qs = _questions(tmp_path, [row(question="一"), row(question="二")])
    path = data.write_questions(qs, tmp_path / "out" / "eval.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text(lines[0] + "\n" + lines[1][:20] + "\n", encoding="utf-8")
    with pytest.raises(MedQAFormatError, match=r"eval.jsonl:2: invalid JSON.*re-run notebook 01"):
        data.read_clean(path)
    path.write_text(json.dumps(row()) + "\n", encoding="utf-8")
    with pytest.raises(MedQAFormatError, match=r"eval.jsonl:1: missing id"):
        data.read_clean(path)


def test_sft_jsonl_uses_the_one_prompt(tmp_path):
    qs = _questions(tmp_path, [row()])
    path = data.write_sft_jsonl(qs, tmp_path / "sft.jsonl")
    (record,) = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert record["id"] == "dev:1" and record["answer_idx"] == "B"
    assert record["messages"] == prompts.build_messages(qs[0].question, qs[0].options, "B")
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert record["messages"][-1]["content"] == "答案：B"


def test_llamafactory_files_match_their_dataset_info(tmp_path):
    qs = _questions(tmp_path, [row(), row(question="二")])
    written = data.write_llamafactory({"train": qs, "eval": qs[:1]}, tmp_path / "lf")
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text(encoding="utf-8"))
    assert set(info) == {"medqa_zh_train", "medqa_zh_eval"}
    assert {p.name for p in written} == {"medqa_zh_train.json", "medqa_zh_eval.json", "dataset_info.json"}
    for name, entry in info.items():
        rows = json.loads((tmp_path / "lf" / entry["file_name"]).read_text(encoding="utf-8"))
        assert len(rows) == (2 if name.endswith("train") else 1)
        for column in entry["columns"].values():
            assert column in rows[0]
    first = json.loads((tmp_path / "lf" / "medqa_zh_train.json").read_text(encoding="utf-8"))[0]
    chat = qs[0].messages()
    assert (first["system"], first["instruction"], first["output"]) == tuple(m["content"] for m in chat)


# --------------------------------------------------------------------------- textbooks


def test_textbook_lines_blank_lines_and_characters(tmp_path):
    (tmp_path / "书甲.txt").write_text("第一段。\n\n  \n第二段\r\n", encoding="utf-8")
    (tmp_path / "书乙.txt").write_text("没有结尾换行", encoding="utf-8")
    books = data.read_textbooks(tmp_path)
    assert [b.name for b in books] == ["书乙", "书甲"]
    b = books[1]
    assert (b.lines, b.blank_lines, b.characters) == (4, 2, 7)
    assert b.paragraphs == [(1, "第一段。"), (4, "第二段")]
    assert books[0].lines == 1


def test_non_utf8_textbook_is_named_with_its_line(tmp_path):
    (tmp_path / "好.txt").write_text("好\n", encoding="utf-8")
    (tmp_path / "坏.txt").write_bytes("第一行\n第二行".encode("gb18030"))
    with pytest.raises(MedQAFormatError, match=r"坏.txt:1: not UTF-8"):
        data.read_textbooks(tmp_path)


def test_no_textbooks_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.txt textbooks"):
        data.read_textbooks(tmp_path)


# --------------------------------------------------------------------------- the real data


@pytest.mark.shared
def test_real_medqa_dev_and_textbooks(shared_medqa):
    questions, report = data.read_questions(shared_medqa / "questions" / "Mainland" / "dev.jsonl")
    assert len(questions) == 3425 and report.blank_lines == 0
    kept, removed = data.dedupe(questions)
    assert len(removed) == 17 and len(kept) == 3408
    books = data.read_textbooks(shared_medqa / "textbooks" / "zh_paragraph")
    assert len(books) == 33
    assert sum(b.lines for b in books) == 118_250
    assert sum(len(b.paragraphs) for b in books) == 118_250 - sum(b.blank_lines for b in books)


@pytest.mark.shared
def test_the_cpu_profiles_three_roles_of_real_dev_share_no_question(shared_medqa):
    specs = config.load("cpu")["data.splits"]
    assert list(specs) == ["train", "validation", "eval", "replication"]
    splits = data.load_splits(shared_medqa / "questions" / "Mainland", specs)
    assert "test.jsonl is absent" in splits.skipped["replication"]  # ../shared holds dev only: skipped, said why
    specs = {role: spec for role, spec in specs.items() if role in splits.questions}
    assert list(specs) == ["train", "validation", "eval"]
    keys = {role: {q.content_key for q in splits[role]} for role in specs}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["eval"]
    assert not keys["validation"] & keys["eval"]
    report = {r["role"]: r for r in splits.report}
    assert sum(report[role]["rows_in_slice"] for role in specs) == 3425  # the three slices tile dev
    assert all(report[role]["questions"] >= 0.95 * report[role]["rows_in_slice"] for role in specs)


def test_plots_draw_from_splits_and_books(tmp_path):
    from medqa_zh import report

    qs = _questions(tmp_path, [row(question="一"), row(question="二二", answer_idx="C", answer="丙")])
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "书.txt").write_text("一段\n", encoding="utf-8")
    table = data.textbook_table(data.read_textbooks(tmp_path / "books"))
    figs = [
        report.plot_answer_letters({"train": qs, "eval": qs[:1]}),
        report.plot_question_lengths({"train": qs}),
        report.plot_top_sections(qs),
        report.plot_textbook_sizes(table),
    ]
    for i, fig in enumerate(figs):
        assert report.save(fig, tmp_path / f"{i}.png").stat().st_size > 1000
    bars = figs[0].axes[0].patches
    # every option letter gets a bar, zero shares included: train B/C 50% each, eval B 100%
    assert [round(b.get_height()) for b in bars] == [0, 50, 50, 0, 0, 0, 100, 0, 0, 0]
    report.use_cjk_font()
    report.use_cjk_font()
    import matplotlib.pyplot as plt

    fonts = plt.rcParams["font.sans-serif"]
    assert len(fonts) == len(set(fonts))


def test_ensure_splits_writes_what_01_writes_and_keeps_what_is_there(project, tiny_assets):
    from medqa_zh import config

    cfg = config.load("smoke", {"data.medqa_dir": str(tiny_assets["medqa"])})
    data.ensure_splits(cfg)
    splits = data.load_splits(cfg.questions_dir, cfg["data.splits"])
    for role, questions in splits.questions.items():
        assert data.load_split(cfg, role) == questions  # what notebook 01 writes and later notebooks read
    kept = data.split_path(cfg, "eval")
    data.write_questions(splits.questions["eval"][:3], kept)
    data.ensure_splits(cfg)
    assert len(data.load_split(cfg, "eval")) == 3  # not rewritten
