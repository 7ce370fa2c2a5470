"""Smoke-test assets, built locally in seconds with no network.

* A tiny Qwen2-architecture causal LM (2 layers, hidden 64), pretrained here for a few seconds to plant a
  letter prior (:func:`pretrain`), with a byte-level
  BPE tokenizer trained here with the ``tokenizers`` library. It has Qwen's ChatML special tokens
  (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``), Qwen2.5's pre-tokenizer and chat
  template, and Qwen2.5-Instruct's sampling defaults in ``generation_config.json`` (so an
  evaluation that forgets to force greedy decoding shows it). Saved with ``save_pretrained``: every
  later step loads it exactly as it loads Qwen/Qwen2.5-0.5B-Instruct.
* Synthetic questions in MedQA's own layout (``questions/Mainland/{train,dev,test}.jsonl``) about
  a made-up world of fictional diseases ("虚拟甲一综合征"), drugs ("示例药07号"), organs and tests,
  and a few synthetic textbooks (``textbooks/zh_paragraph/``) that state the same facts, so that
  fine-tuning and retrieval have something to learn and find. Every question starts with
  ``【合成题】`` and every book says it is synthetic; no MedQA text is used.

It is a planted world: its effects are built in and written down before any run, in ``planted.json``
beside the questions (:func:`planted_record`): which questions ask about facts the train split teaches,
which about facts only the textbooks state, which about facts nothing states (:data:`GROUPS`), each
question's gold passage, the base model's letter skew (:data:`LETTER_SKEW`) and the thresholds the
series must meet (:data:`THRESHOLDS`); ``medqa_zh.planted`` measures each from a run. The data also has
planted flaws that the data notebook must catch: exact duplicate rows in train and dev, and test
questions that also appear in train (see ``PLANTED``). Everything is deterministic for a given seed.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import files, prompts

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast.

ASSETS_VERSION = 5  # bump when the generator changes, so old assets are rebuilt
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's pre-tokenizer split (tokenizer.json of Qwen/Qwen2.5-0.5B-Instruct)
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5-Instruct's generation defaults (sampling!): evaluation must override them
QWEN_GENERATION_DEFAULTS = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)

SPLIT_SIZES = {"train": 240, "dev": 60, "test": 150}  # unique questions, before the planted flaws
# unique questions appended to test after the planted ones (the smoke profile's replication set: test[153:])
TEST_EXTRA = 150
PLANTED = {"train_duplicates": 3, "dev_duplicates": 2, "test_in_train": 3}
PLANTED_FILE = "planted.json"  # what the world was built with, written beside the questions (planted())

_STEMS = "甲乙丙丁戊己庚辛壬癸"
_NUMERALS = "一二三四五六"
_ORGANS = ["肝", "肺", "肾", "心", "脾", "胃", "脑", "皮肤", "骨", "眼"]
_TESTS = ["血常规", "尿常规", "胸部X线", "心电图", "腹部超声", "头颅CT", "骨髓穿刺", "肝功能", "脑脊液检查", "肺功能"]
_SECTIONS = {"drug": "合成·治疗", "organ": "合成·病理", "test": "合成·检查"}
_BOOKS = {"drug": "合成药理学", "organ": "合成内科学", "test": "合成内科学"}
# The world's diseases in four groups, by what teaches their facts (GROUP_SIZES diseases each, drawn by the seed):
GROUPS = {
    "trained": "asked in the train split (SFT learns them) and in eval, validation and replication, with other "
               "distractors and option orders; stated in the textbooks",
    "passage": "stated in the textbooks only: no training question asks them; asked in eval, validation and "
               "replication (retrieval must bring them)",
    "unknown": "in no training question and no textbook: no model can know them; asked in eval, validation and "
               "replication (the held-out set on which a model's letter prior is measured)",
    "pretraining": "only in the asset build's pretraining of the base model, whose gold letters are skewed "
                   "(LETTER_SKEW); asked nowhere else",
}
GROUP_SIZES = {"trained": 24, "passage": 18, "unknown": 9, "pretraining": 9}
# how each evaluated split is made up, by group (eval and replication: 150 each, 60 / 60 / 30)
MIX = {"trained": 0.4, "passage": 0.4, "unknown": 0.2}
# The base model's planted letter prior: the asset build pretrains the random model on questions about the
# pretraining group whose gold letter is LETTER_SKEW["letter"] in LETTER_SKEW["share"] of them (the rest spread
# evenly), for LETTER_SKEW["steps"] optimizer steps of LETTER_SKEW["batch"] questions. Every split's own gold letters
# are spread evenly (each letter a fifth, to one question).
LETTER_SKEW = {"letter": "C", "share": 0.6, "steps": 150, "batch": 16, "learning_rate": 3.0e-3}
# What the series must find in this world, fixed with it (issue 51), never chosen after a run.
THRESHOLDS = {
    "sft_lower_bound": 0.20,       # merged vs base on the trained-fact questions: the 95% interval's low end at least this
    "skew_plain_excess": 0.20,     # base, plain letter reading: the skewed letter's share at least this above its gold share
    "skew_debiased_within": 0.05,  # base, debiased reading: the skewed letter's share within this of its gold share
    "pride_within": 0.05,          # PriDe's prior of the skewed letter within this of the true prior (every rotation, unknown)
    "retrieval_recall_at_k": 0.8,  # bm25's top rag.top_k passages hold the gold sentence for at least this share
    "grpo_reward_rise": 0.20,      # 04b: the mean reward rises at least this
    "grpo_spread_share": 0.5,      # 04b: at least this share of prompts have a reward spread at the start
    "control_within": 0.10,        # the negative control's 95% interval within +-this
}


@dataclass(frozen=True)
class Disease:
    name: str
    organ: str
    drug: str
    test: str
    group: str


def make_world(seed: int = 0) -> list[Disease]:
    """Sixty fictional diseases, each with one organ, drug (unique) and test, and its group (:data:`GROUPS`)."""
    rng = random.Random(f"world-{seed}")
    n = sum(GROUP_SIZES.values())
    drugs = [f"示例药{k:02d}号" for k in rng.sample(range(1, 100), n)]
    groups = [g for g, size in GROUP_SIZES.items() for _ in range(size)]
    rng.shuffle(groups)
    return [Disease(f"虚拟{_STEMS[i % 10]}{_NUMERALS[i // 10]}{'综合征' if i % 3 else '病'}", rng.choice(_ORGANS),
                    drugs[i], rng.choice(_TESTS), groups[i]) for i in range(n)]


def fact_sentence(d: Disease, kind: str) -> str:
    """The textbook sentence that states one fact: a question's gold passage holds it."""
    return {"drug": f"{d.drug}是{d.name}的首选治疗药物。", "organ": f"{d.name}病变最常累及{d.organ}。",
            "test": f"确诊{d.name}最常用的检查是{d.test}。"}[kind]


def _question(rng: random.Random, world: list[Disease], d: Disease, kind: str, letter: str) -> dict:
    """A question about one fact of ``d``, its right answer under ``letter``, four distractors drawn by ``rng``."""
    if kind == "drug":
        stem, right, pool = f"{d.name}的首选治疗药物是（　　）。", d.drug, [x.drug for x in world]
    elif kind == "organ":
        stem, right, pool = f"{d.name}最常累及的器官是（　　）。", d.organ, _ORGANS
    else:
        stem, right, pool = f"确诊{d.name}最常用的检查是（　　）。", d.test, _TESTS
    wrong = rng.sample(sorted(set(pool) - {right}), 4)
    i = "ABCDE".index(letter)
    texts = wrong[:i] + [right] + wrong[i:]
    return {"question": f"【合成题】{stem}", "options": dict(zip("ABCDE", texts, strict=True)), "answer": right,
            "meta_info": _SECTIONS[kind], "answer_idx": letter, "_fact": (d.name, kind, d.group)}


def _letters(rng: random.Random, n: int) -> list[str]:
    """n gold letters, each letter a fifth of them (to one), in a seeded order."""
    letters = ["ABCDE"[i % 5] for i in range(n)]
    rng.shuffle(letters)
    return letters


def _groups(rng: random.Random, n: int, mix: dict) -> list[str]:
    counts = {g: round(n * share) for g, share in mix.items()}
    counts[next(iter(mix))] += n - sum(counts.values())
    groups = [g for g, c in counts.items() for _ in range(c)]
    rng.shuffle(groups)
    return groups


def _unique_rows(rng, world, groups: list[str], seen: set) -> list[dict]:
    """One new question per entry of ``groups`` (a disease of that group, a kind, a letter), none asked before."""
    by_group = {g: [d for d in world if d.group == g] for g in GROUP_SIZES}
    rows = []
    for group, letter in zip(groups, _letters(rng, len(groups)), strict=True):
        while True:
            row = _question(rng, world, rng.choice(by_group[group]), rng.choice(list(_SECTIONS)), letter)
            key = (row["question"], tuple(row["options"].values()))
            if key not in seen:  # unique across all splits: the only repeats are the planted ones
                seen.add(key)
                rows.append(row)
                break
    return rows


def make_questions(seed: int = 0) -> dict[str, list[dict]]:
    """Synthetic MedQA rows per split, with the ``PLANTED`` duplicates and train/test overlaps; ``test`` ends
    with ``TEST_EXTRA`` more unique questions. train asks the trained group only; dev, test and its extra
    questions mix the groups as :data:`MIX` says. Each row keeps ``_fact`` (disease, kind, group), which
    :func:`write_medqa` moves to the planted file."""
    world = make_world(seed)
    rng = random.Random(f"questions-{seed}")
    seen: set = set()
    splits = {"train": _unique_rows(rng, world, ["trained"] * SPLIT_SIZES["train"], seen)}
    for split in ("dev", "test"):
        splits[split] = _unique_rows(rng, world, _groups(rng, SPLIT_SIZES[split], MIX), seen)

    def plant(rows: list[dict], copies: list[dict]) -> None:
        for row in copies:
            rows.insert(rng.randrange(len(rows) + 1), dict(row))

    plant(splits["test"], rng.sample(splits["train"], PLANTED["test_in_train"]))
    plant(splits["train"], rng.sample(splits["train"], PLANTED["train_duplicates"]))
    plant(splits["dev"], rng.sample(splits["dev"], PLANTED["dev_duplicates"]))
    extra = random.Random(f"test-extra-{seed}")  # its own stream: the rows above stay as they were
    splits["test"] += _unique_rows(extra, world, _groups(extra, TEST_EXTRA, MIX), seen)
    return splits


def pretraining_questions(seed: int = 0, n: int | None = None) -> list[dict]:
    """The asset build's pretraining questions: the pretraining group's facts, gold letters skewed as
    :data:`LETTER_SKEW` says (``n``: steps x batch)."""
    world = make_world(seed)
    rng = random.Random(f"pretraining-{seed}")
    n = n or LETTER_SKEW["steps"] * LETTER_SKEW["batch"]
    skewed, share = LETTER_SKEW["letter"], LETTER_SKEW["share"]
    weights = [share if letter == skewed else (1 - share) / 4 for letter in "ABCDE"]
    pool = [d for d in world if d.group == "pretraining"]
    return [_question(rng, world, rng.choice(pool), rng.choice(list(_SECTIONS)), rng.choices("ABCDE", weights)[0])
            for _ in range(n)]


def make_textbooks(seed: int = 0) -> dict[str, list[str]]:
    """Three small synthetic books (lines, blank ones included) stating the facts of the trained and passage
    groups, one sentence per fact (:func:`fact_sentence`); the unknown and pretraining groups are in none."""
    world = [d for d in make_world(seed) if d.group in ("trained", "passage")]
    note = "本书为程序自动生成的合成教材，仅用于冒烟测试，书中疾病与药物纯属虚构。"
    internal = [note, ""]
    for d in world:
        internal.append(f"{d.name}是一种虚构的疾病。{fact_sentence(d, 'organ')}{fact_sentence(d, 'test')}")
    internal.append("")
    pharmacology = [note] + [f"{fact_sentence(d, 'drug')}{d.drug}为虚构药物，仅存在于本合成教材。" for d in world]
    # one paragraph of ~2,000 characters: real textbook lines run from a few characters to over 10,000
    long_para = "".join(f"{d.name}患者首选{d.test}明确诊断，并注意{d.organ}的受累情况。" for d in world * 2)
    diagnostics = [note, long_para, "", "   ", f"常用检查包括{'、'.join(_TESTS)}。"]
    return {"合成内科学": internal, "合成药理学": pharmacology, "合成诊断学": diagnostics}


def planted_record(seed: int = 0, splits: dict | None = None) -> dict:
    """What the world was built with, before any run (:data:`PLANTED_FILE`): the groups and their meaning, the
    diseases in each, chance, the base model's letter skew, the thresholds the series must meet, and for every
    question of dev and test (ids as ``data`` gives them, ``<split>:<line>``) its group, fact, disease and gold
    passage (the book and the sentence that states its answer; null for the unknown group). Only what was built,
    never a measured outcome."""
    world = make_world(seed)
    splits = splits or make_questions(seed)
    questions = {}
    for split in ("dev", "test"):
        for line, row in enumerate(splits[split], start=1):
            name, kind, group = row["_fact"]
            d = next(x for x in world if x.name == name)
            passage = ({"book": _BOOKS[kind], "sentence": fact_sentence(d, kind)}
                       if group in ("trained", "passage") else None)
            questions[f"{split}:{line}"] = {"group": group, "kind": kind, "disease": name, "passage": passage}
    return {
        "about": "What medqa_zh.tiny built into the smoke world, written by the asset build before any run. "
                 "Nothing here is measured.",
        "assets_version": ASSETS_VERSION, "seed": seed, "chance": 1 / 5, "letters": "ABCDE",
        "groups": {g: {"meaning": GROUPS[g], "diseases": [d.name for d in world if d.group == g]} for g in GROUPS},
        "mix": MIX, "letter_skew": LETTER_SKEW, "gold_letter_share": 1 / 5, "thresholds": THRESHOLDS,
        "questions": questions,
    }


def planted(medqa_dir: str | Path) -> dict | None:
    """The planted file of a synthetic MedQA folder (:func:`planted_record`), or None where there is none (real
    MedQA)."""
    path = Path(medqa_dir) / PLANTED_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_medqa(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the synthetic data in MedQA's ``data_clean`` layout under ``out_dir``."""
    out_dir = Path(out_dir)
    qdir = out_dir / "questions" / "Mainland"
    qdir.mkdir(parents=True, exist_ok=True)
    splits = make_questions(seed)
    for split, rows in splits.items():
        text = "".join(json.dumps({k: v for k, v in r.items() if k != "_fact"}, ensure_ascii=False) + "\n"
                       for r in rows)
        (qdir / f"{split}.jsonl").write_text(text, encoding="utf-8")
    tdir = out_dir / "textbooks" / "zh_paragraph"
    tdir.mkdir(parents=True, exist_ok=True)
    for book, lines in make_textbooks(seed).items():
        (tdir / f"{book}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / PLANTED_FILE).write_text(json.dumps(planted_record(seed, splits), ensure_ascii=False, indent=1),
                                        encoding="utf-8")
    (out_dir / "README.md").write_text(
        "Synthetic MedQA-format data built by medqa_zh.tiny for smoke tests. Not MedQA; not medicine.\n",
        encoding="utf-8",
    )
    return out_dir


# --------------------------------------------------------------------------- tokenizer and model


def _tokenizer_corpus(seed: int) -> list[str]:
    texts = [prompts.SYSTEM_PROMPT, prompts.INSTRUCTION, prompts.ANSWER_FORMAT_HINT]
    texts += [prompts.format_answer(letter) for letter in "ABCDE"]
    for rows in make_questions(seed).values():
        texts += [prompts.format_user(r["question"], r["options"]) for r in rows]
    for lines in make_textbooks(seed).values():
        texts += lines
    texts += [prompts.format_user(r["question"], r["options"]) for r in pretraining_questions(seed, 100)]
    return texts


def build_tokenizer(seed: int = 0, vocab_size: int = 1024):
    """A byte-level BPE tokenizer, Qwen2.5-style, trained on the synthetic corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    qwen = [pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
    # Trained with punctuation isolated: Qwen's vocabulary keeps "：" and the answer letter apart ("答案",
    # "：", "B"), but a BPE trained on this small corpus would merge "：B". Then saved with exactly Qwen2.5's
    # pre-tokenizer (no merge crosses punctuation, so the split changes nothing), which llama.cpp knows as
    # "qwen2": the GGUF export tokenizes as transformers does (medqa_zh.export).
    tok.pre_tokenizer = pre_tokenizers.Sequence([qwen[0], pre_tokenizers.Punctuation(behavior="isolated"), qwen[1]])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.Sequence(qwen)
    template = resources.files("medqa_zh").joinpath("qwen2_chat_template.jinja").read_text(encoding="utf-8")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=template,
        model_max_length=32768,
    )


def build_model(tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    """A randomly initialised Qwen2ForCausalLM sized for the tokenizer (float32, ~0.2M parameters)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    im_end, eot = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot, **QWEN_GENERATION_DEFAULTS
    )
    return model


def answer_batch(tokenizer, rows: list[dict], completion: str = "letter") -> dict:
    """Questions with their answer turn (``completion``: prompts.COMPLETIONS) as one right-padded batch, the labels
    on the answer turn only (-100 elsewhere), as SFT's loss sees them: ``input_ids``, ``attention_mask``, ``labels``."""
    import torch

    encoded = []
    for r in rows:
        messages = prompts.build_messages(r["question"], r["options"], r["answer_idx"], completion=completion)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        encoded.append((tokenizer(full, add_special_tokens=False)["input_ids"],
                        len(tokenizer(prompt, add_special_tokens=False)["input_ids"])))
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, answer_from) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, answer_from: len(ids)] = torch.tensor(ids[answer_from:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pretrain(model, tokenizer, seed: int = 0) -> list[float]:
    """Plant the base model's letter prior (:data:`LETTER_SKEW`): AdamW steps on :func:`pretraining_questions`,
    the loss on the answer turn only (``答案：X``), as SFT's. It also learns the answer format. Returns each step's
    loss."""
    import torch

    rows, batch = pretraining_questions(seed), LETTER_SKEW["batch"]
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LETTER_SKEW["learning_rate"], weight_decay=0.0)
    model.train()
    losses = []
    for step in range(LETTER_SKEW["steps"]):
        loss = model(**answer_batch(tokenizer, rows[step * batch: (step + 1) * batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def write_model(out_dir: str | Path, seed: int = 0, pretrained: bool = True) -> Path:
    """Tokenizer and model, the model pretrained to plant its letter prior (:func:`pretrain`), saved with
    ``save_pretrained`` like any hub model folder. ``pretrained=False``: the random model before it, which never ends
    a reply by itself (the serving tests use it: every generation runs to its limit)."""
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(seed)
    model = build_model(tokenizer, seed)
    if pretrained:
        pretrain(model, tokenizer, seed)
    hf_logging.disable_progress_bar()  # a 0.6 MB file needs no progress bar
    try:
        model.save_pretrained(out_dir)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    # name Qwen's tokenizer class, as Qwen2.5's own tokenizer_config.json does
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return out_dir


def write_encoder(out_dir: str | Path, seed: int = 0, dim: int = 32, max_seq_length: int = 128) -> Path:
    """A tiny sentence-transformers encoder (BERT, 2 layers, hidden ``dim``, mean pooling, random
    weights) with a character vocabulary of the synthetic corpus, so the dense-retrieval code path
    runs in the smoke profile exactly as with ``BAAI/bge-small-zh-v1.5``. Its rankings mean nothing."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizer
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    chars = sorted({ch.lower() for text in _tokenizer_corpus(seed) for ch in text if not ch.isspace()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, tokenize_chinese_chars=True)
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=2 * dim, max_position_embeddings=max_seq_length))
    hf_logging.disable_progress_bar()
    try:
        bert.save_pretrained(out_dir / "hf")
        tokenizer.save_pretrained(out_dir / "hf")
        encoder = SentenceTransformer(modules=[Transformer(str(out_dir / "hf"), max_seq_length=max_seq_length),
                                               Pooling(dim, "mean")], device="cpu")
        encoder.save(str(out_dir))
    finally:
        hf_logging.enable_progress_bar()
    shutil.rmtree(out_dir / "hf")
    return out_dir


def build_assets(assets_dir: str | Path, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Build (once) ``assets_dir/tiny-qwen2``, ``assets_dir/medqa`` and ``assets_dir/tiny-encoder``;
    returns the three paths.

    Rebuilt when missing, when ``force``, or when the seed or generator version changed. Each part
    is built in a temporary folder and moved into place, so a crash leaves no half-built assets.
    """
    assets_dir = Path(assets_dir)
    info = {"assets_version": ASSETS_VERSION, "seed": seed}
    paths = {"model": assets_dir / "tiny-qwen2", "medqa": assets_dir / "medqa", "encoder": assets_dir / "tiny-encoder"}
    writers = {"model": write_model, "medqa": write_medqa, "encoder": write_encoder}
    for kind, path in paths.items():
        stamp = path / "BUILD_INFO.json"
        if not force and stamp.is_file() and json.loads(stamp.read_text()) == info:
            continue
        with files.replacing(path) as tmp:
            writers[kind](tmp, seed)
            (tmp / "BUILD_INFO.json").write_text(json.dumps(info))
    return paths
