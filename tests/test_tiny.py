import hashlib
import json

import pytest

from medqa_zh import config, data, tiny


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


def test_build_is_skipped_when_current_and_redone_when_stale(tmp_path):
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
    """smoke.yaml's eval (test[:43]) is the 40 test questions with the 3 planted repeats of train; its
    replication set (test[43:]) the TEST_EXTRA questions after them, none in another role."""
    qdir = tiny_assets["medqa"] / "questions" / "Mainland"
    specs = config.load("smoke")["data.splits"]
    splits = data.load_splits(qdir, specs)
    assert len(splits.overlaps["eval"]) == tiny.PLANTED["test_in_train"]
    assert len(splits["eval"]) == tiny.SPLIT_SIZES["test"]
    assert len(splits["replication"]) == tiny.TEST_EXTRA and not splits.overlaps["replication"]
    assert not splits.skipped


def test_synthetic_answers_follow_the_textbook_facts():
    """The world is consistent: each diagnosis question's answer is the disease with that symptom."""
    world = {d.symptom: d.name for d in tiny.make_world(0)}
    diagnosis = [r for r in tiny.make_questions(0)["train"] if r["meta_info"] == "合成·诊断"]
    assert diagnosis
    for r in diagnosis:
        symptom = next(s for s in world if s in r["question"])
        assert r["answer"] == world[symptom]


@pytest.mark.parametrize("seed", [0, 1])
def test_answer_letters_are_spread(seed):
    from collections import Counter

    counts = Counter(r["answer_idx"] for r in tiny.make_questions(seed)["train"])
    assert set(counts) == set("ABCDE")
    assert max(counts.values()) < 0.35 * sum(counts.values())
