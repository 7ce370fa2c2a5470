import hashlib
import json
import math
from collections import Counter

import pytest

from medqa_zh import config, data, evaluate, tiny


def test_tiny_model_loads_like_a_hub_model_and_generates(tiny_assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_assets["model"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2" and model.config.hidden_size == 64
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # Qwen's ChatML special tokens are single tokens, with Qwen's roles
    for token in tiny.SPECIAL_TOKENS:
        assert len(tokenizer(token)["input_ids"]) == 1
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    # Qwen2.5-Instruct ships sampling defaults; so does the tiny model
    assert model.generation_config.do_sample is True
    # the answer letters are single tokens after the prefix, as letter scoring needs
    ids = tokenizer("答案：B")["input_ids"]
    assert tokenizer.decode(ids[-1:]) == "B"

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 5


def test_tiny_tokenizer_roundtrips_chinese_and_ascii(tiny_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    text = "男，50岁。突发左足疼痛1天 (CT: 正常) 答案：E"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def _digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_assets_are_deterministic(tmp_path, tiny_assets):
    again = tiny.build_assets(tmp_path)
    for kind in ("model", "medqa"):
        assert _digest(again[kind]) == _digest(tiny_assets[kind])


def test_build_is_skipped_when_current_and_redone_when_stale(tmp_path, monkeypatch):
    monkeypatch.setitem(tiny.LETTER_SKEW, "steps", 1)  # the skip logic needs no planted prior: one pretraining step
    paths = tiny.build_assets(tmp_path)
    weights = paths["model"] / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    tiny.build_assets(tmp_path)
    assert weights.stat().st_mtime_ns == mtime
    (paths["model"] / "BUILD_INFO.json").write_text(json.dumps({"assets_version": -1, "seed": 0}))
    tiny.build_assets(tmp_path)
    assert weights.stat().st_mtime_ns != mtime
    assert not list(tmp_path.glob("*.building"))


def test_synthetic_data_is_valid_medqa_and_plainly_synthetic(tiny_assets):
    qdir = tiny_assets["medqa"] / "questions" / "Mainland"
    for split in tiny.SPLIT_SIZES:
        questions, _ = data.read_questions(qdir / f"{split}.jsonl")
        assert all(q.question.startswith("【合成题】") for q in questions)
        assert all(len(q.options) == 5 for q in questions)
    books = data.read_textbooks(tiny_assets["medqa"] / "textbooks" / "zh_paragraph")
    assert books and all("合成教材" in b.paragraphs[0][1] for b in books)
    assert sum(b.blank_lines for b in books) > 0  # so blank-line counting is exercised


def test_synthetic_data_has_the_planted_flaws(tiny_assets):
    qdir = tiny_assets["medqa"] / "questions" / "Mainland"
    splits = data.load_splits(qdir, {"train": "train", "dev": "dev", "eval": "test"})
    assert len(splits.duplicates["train"]) == tiny.PLANTED["train_duplicates"]
    assert len(splits.duplicates["dev"]) == tiny.PLANTED["dev_duplicates"]
    assert len(splits.overlaps["eval"]) == tiny.PLANTED["test_in_train"]
    assert len(splits.overlaps["dev"]) == 0
    assert [len(splits[r]) for r in ("train", "dev")] == [tiny.SPLIT_SIZES[s] for s in ("train", "dev")]
    assert len(splits["eval"]) == tiny.SPLIT_SIZES["test"] + tiny.TEST_EXTRA


def test_the_smoke_replication_set_is_the_extra_test_questions(tiny_assets):
    """smoke.yaml's eval (test[:153]) is the 150 test questions with the 3 planted repeats of train (removed); its
    replication set (test[153:]) the TEST_EXTRA (150) questions after them, none in another role. Both mix the
    groups as MIX says (60 trained, 60 passage, 30 unknown), which the planted file records per question."""
    qdir = tiny_assets["medqa"] / "questions" / "Mainland"
    specs = config.load("smoke")["data.splits"]
    splits = data.load_splits(qdir, specs)
    assert len(splits.overlaps["eval"]) == tiny.PLANTED["test_in_train"]
    assert len(splits["eval"]) == tiny.SPLIT_SIZES["test"]
    assert len(splits["replication"]) == tiny.TEST_EXTRA and not splits.overlaps["replication"]
    assert not splits.skipped
    record = tiny.planted(tiny_assets["medqa"])
    for role in ("eval", "replication"):
        groups = Counter(record["questions"][q.id]["group"] for q in splits[role])
        assert groups == {g: round(len(splits[role]) * share) for g, share in tiny.MIX.items()}, role


# --------------------------------------------------------------------------- the planted world


def _key(row: dict) -> tuple:
    return row["question"], tuple(row["options"].values())


def _blocks(splits: dict) -> dict[str, list[dict]]:
    """The unique questions make_questions drew for each split, before the planted copies: train and dev without
    their duplicates, test's first part without its repeats of train, and test's extra questions."""
    def unique(rows, drop=frozenset()):
        out, seen = [], set(drop)
        for r in rows:
            if _key(r) not in seen:
                seen.add(_key(r))
                out.append(r)
        return out

    cut = tiny.SPLIT_SIZES["test"] + tiny.PLANTED["test_in_train"]
    return {"train": unique(splits["train"]), "dev": unique(splits["dev"]),
            "test": unique(splits["test"][:cut], {_key(r) for r in splits["train"]}), "test extra": splits["test"][cut:]}


BLOCK_SIZES = {"train": tiny.SPLIT_SIZES["train"], "dev": tiny.SPLIT_SIZES["dev"], "test": tiny.SPLIT_SIZES["test"],
               "test extra": tiny.TEST_EXTRA}


@pytest.mark.parametrize("seed", [0, 1])
def test_the_world_has_its_groups_and_every_answer_is_its_diseases_fact(seed):
    """Every question, in every split and in the pretraining set, asks one fact of one disease (its ``_fact``), and
    its gold option is that fact; the diseases, named uniquely with a drug each, fall in the groups GROUP_SIZES says."""
    world = tiny.make_world(seed)
    by_name = {d.name: d for d in world}
    assert len(by_name) == len({d.drug for d in world}) == len(world) == sum(tiny.GROUP_SIZES.values())
    assert Counter(d.group for d in world) == tiny.GROUP_SIZES and set(tiny.GROUP_SIZES) == set(tiny.GROUPS)
    splits = {**tiny.make_questions(seed), "pretraining": tiny.pretraining_questions(seed, 200)}
    for split, rows in splits.items():
        for r in rows:
            name, kind, group = r["_fact"]
            d = by_name[name]
            assert d.group == group, (split, r)
            assert r["answer"] == getattr(d, kind) == r["options"][r["answer_idx"]], (split, r)
            assert list(r["options"].values()).count(r["answer"]) == 1, (split, r)
            assert name in r["question"] and not any(o in r["question"] for o in by_name if o != name), (split, r)
    assert {r["_fact"][2] for r in splits["pretraining"]} == {"pretraining"}


@pytest.mark.parametrize("seed", [0, 1])
def test_train_asks_the_trained_group_and_dev_and_test_mix_the_groups_as_planned(seed):
    splits = tiny.make_questions(seed)
    blocks = _blocks(splits)
    assert {b: len(rows) for b, rows in blocks.items()} == BLOCK_SIZES
    assert {r["_fact"][2] for r in splits["train"]} == {"trained"}
    for block in ("dev", "test", "test extra"):
        n = BLOCK_SIZES[block]
        assert Counter(r["_fact"][2] for r in blocks[block]) == {g: round(n * s) for g, s in tiny.MIX.items()}, block
    # the only repeats are the planted ones
    assert len({_key(r) for rows in blocks.values() for r in rows}) == sum(BLOCK_SIZES.values())


@pytest.mark.parametrize("seed", [0, 1])
def test_gold_letters_are_balanced_in_every_split(seed):
    """Each split's own gold letters are spread evenly: each letter a fifth of its questions, to one (the planted
    copies aside), so a letter prior cannot pass for knowledge."""
    for block, rows in _blocks(tiny.make_questions(seed)).items():
        counts = Counter(r["answer_idx"] for r in rows)
        assert set(counts) == set("ABCDE"), block
        assert all(abs(c - len(rows) / 5) <= 1 for c in counts.values()), (block, counts)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_textbooks_state_each_taught_fact_once_and_nothing_of_the_others(seed):
    """Every fact of the trained and passage groups is stated verbatim in exactly one book, once; the unknown and
    pretraining groups' diseases (and their drugs) are in no line of any book."""
    books = tiny.make_textbooks(seed)
    lines = [line for book in books.values() for line in book]
    for d in tiny.make_world(seed):
        if d.group in ("unknown", "pretraining"):
            assert not [line for line in lines if d.name in line or d.drug in line], d
            continue
        for kind in ("drug", "organ", "test"):
            sentence = tiny.fact_sentence(d, kind)
            holding = [book for book, b in books.items() if any(sentence in line for line in b)]
            assert len(holding) == 1, (d, kind, holding)
            assert sum(line.count(sentence) for line in books[holding[0]]) == 1, (d, kind)


PLANTED_KEYS = {"about", "assets_version", "seed", "chance", "letters", "groups", "mix", "letter_skew",
                "gold_letter_share", "thresholds", "questions"}


def test_the_planted_file_matches_the_written_questions_and_holds_no_outcome(tiny_assets):
    medqa = tiny_assets["medqa"]
    record = tiny.planted(medqa)
    assert set(record) == PLANTED_KEYS  # what was built, nothing measured
    assert record == json.loads(json.dumps(tiny.planted_record(0), ensure_ascii=False))
    assert (record["assets_version"], record["letter_skew"], record["thresholds"], record["mix"]) == \
        (tiny.ASSETS_VERSION, tiny.LETTER_SKEW, tiny.THRESHOLDS, tiny.MIX)
    assert tiny.planted(medqa / "textbooks") is None  # no planted file there: real MedQA reads as None
    tdir = medqa / "textbooks" / "zh_paragraph"
    books = {p.stem: p.read_text(encoding="utf-8").splitlines() for p in tdir.glob("*.txt")}
    qdir = medqa / "questions" / "Mainland"
    seen = set()
    for split in ("dev", "test"):
        assert "_fact" not in (qdir / f"{split}.jsonl").read_text(encoding="utf-8")
        questions, _ = data.read_questions(qdir / f"{split}.jsonl")
        for q in questions:
            p = record["questions"][q.id]
            seen.add(q.id)
            assert set(p) == {"group", "kind", "disease", "passage"}, q.id
            assert p["disease"] in q.question and p["disease"] in record["groups"][p["group"]]["diseases"], q.id
            if p["group"] == "unknown":
                assert p["passage"] is None, q.id
                continue
            assert p["group"] in ("trained", "passage") and set(p["passage"]) == {"book", "sentence"}, q.id
            sentence = p["passage"]["sentence"]
            # the sentence states this line's answer, about its disease, and none of its wrong options
            assert q.answer in sentence and p["disease"] in sentence, q.id
            assert [t for letter, t in q.options.items() if letter != q.answer_idx and t in sentence] == [], q.id
            assert sum(line.count(sentence) for line in books[p["passage"]["book"]]) == 1, q.id
    assert seen == set(record["questions"])


def test_the_pretraining_plants_the_letter_skew_in_the_base_model(tiny_assets):
    """The pretraining questions' gold letters are skewed as LETTER_SKEW says, and the pretrained tiny model has
    learned it: on questions nothing taught it (the unknown group) its letter scores pick the skewed letter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    skew = tiny.LETTER_SKEW
    rows = tiny.pretraining_questions(0)
    n = skew["steps"] * skew["batch"]
    counts = Counter(r["answer_idx"] for r in rows)
    assert len(rows) == n
    assert abs(counts[skew["letter"]] / n - skew["share"]) < 0.03
    assert all(abs(counts[x] / n - (1 - skew["share"]) / 4) < 0.03 for x in "ABCDE" if x != skew["letter"])

    record = tiny.planted(tiny_assets["medqa"])
    questions, _ = data.read_questions(tiny_assets["medqa"] / "questions" / "Mainland" / "test.jsonl")
    unknown = [q for q in questions if record["questions"][q.id]["group"] == "unknown"][:20]
    assert len(unknown) == 20
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["model"])
    scores = evaluate.letter_scores(model, tokenizer, unknown, progress=False)
    picked = Counter(r["pred"] for r in scores)
    assert picked[skew["letter"]] / len(scores) > 0.5, picked
    # not its gold share: the skewed letter is gold for far fewer of them
    assert sum(q.answer_idx == skew["letter"] for q in unknown) < picked[skew["letter"]]
    # a learned prior, not a random model's argmax (the random tiny model also picks one letter throughout, with
    # about a fifth of the letters' probability and almost none of the next token's): the answer format is learned
    # (the letters hold most of the next token's probability) and the skewed letter holds about its planted share
    letters = [{x: math.exp(lp) for x, lp in r["logprobs"].items()} for r in scores]
    assert sum(sum(p.values()) for p in letters) / len(letters) > 0.5
    assert sum(p[skew["letter"]] / sum(p.values()) for p in letters) / len(letters) > 0.4
