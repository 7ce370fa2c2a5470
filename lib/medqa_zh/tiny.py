"""Smoke-test assets, built locally in seconds with no network.

* A tiny Qwen2-architecture causal LM (2 layers, hidden 64, random weights) with a byte-level
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

The data has planted flaws that the data notebook must catch: exact duplicate rows in train and
dev, and test questions that also appear in train (see ``PLANTED``). Everything is deterministic
for a given seed.
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

ASSETS_VERSION = 4  # bump when the generator changes, so old assets are rebuilt
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's pre-tokenizer split (tokenizer.json of Qwen/Qwen2.5-0.5B-Instruct)
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5-Instruct's generation defaults (sampling!): evaluation must override them
QWEN_GENERATION_DEFAULTS = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)

SPLIT_SIZES = {"train": 240, "dev": 40, "test": 40}  # unique questions, before the planted flaws
# unique questions appended to test after the planted ones (the smoke profile's replication set: test[43:])
TEST_EXTRA = 20
PLANTED = {"train_duplicates": 3, "dev_duplicates": 2, "test_in_train": 3}

_STEMS = "甲乙丙丁戊己庚辛壬癸"
_SYMPTOMS = [
    "持续低热", "夜间咳嗽", "晨起头痛", "四肢环形皮疹", "餐后腹泻", "游走性关节痛", "活动后胸闷", "进行性乏力",
    "视物模糊", "单侧耳鸣", "夜间腰痛", "晨起呕吐", "双下肢水肿", "口唇发绀", "指尖麻木", "反复鼻出血",
    "手部震颤", "阵发性心悸", "皮肤瘙痒", "声音嘶哑",
]
_ORGANS = ["肝", "肺", "肾", "心", "脾", "胃", "脑", "皮肤", "骨", "眼"]
_TESTS = ["血常规", "尿常规", "胸部X线", "心电图", "腹部超声", "头颅CT", "骨髓穿刺", "肝功能", "脑脊液检查", "肺功能"]
_SECTIONS = {"diagnosis": "合成·诊断", "drug": "合成·治疗", "organ": "合成·病理", "test": "合成·检查"}


@dataclass(frozen=True)
class Disease:
    name: str
    symptom: str
    organ: str
    drug: str
    test: str


def make_world(seed: int = 0) -> list[Disease]:
    """Twenty fictional diseases, each with one symptom (unique), organ, drug (unique) and test."""
    rng = random.Random(f"world-{seed}")
    symptoms = rng.sample(_SYMPTOMS, len(_SYMPTOMS))
    drugs = [f"示例药{n:02d}号" for n in rng.sample(range(1, 100), len(symptoms))]
    world = []
    for i, (symptom, drug) in enumerate(zip(symptoms, drugs, strict=True)):
        name = f"虚拟{_STEMS[i % 10]}{'一二'[i // 10]}{'综合征' if i % 3 else '病'}"
        world.append(Disease(name, symptom, rng.choice(_ORGANS), drug, rng.choice(_TESTS)))
    return world


def _question(rng: random.Random, world: list[Disease]) -> dict:
    d = rng.choice(world)
    kind = rng.choice(list(_SECTIONS))
    if kind == "diagnosis":
        sex, age, days = rng.choice("男女"), rng.randint(18, 80), rng.randint(2, 30)
        stem = f"患者，{sex}，{age}岁。主诉{d.symptom}{days}天。最可能的诊断是（　　）。"
        right, pool = d.name, [x.name for x in world]
    elif kind == "drug":
        stem, right, pool = f"{d.name}的首选治疗药物是（　　）。", d.drug, [x.drug for x in world]
    elif kind == "organ":
        stem, right, pool = f"{d.name}最常累及的器官是（　　）。", d.organ, _ORGANS
    else:
        stem, right, pool = f"确诊{d.name}最常用的检查是（　　）。", d.test, _TESTS
    texts = [right] + rng.sample(sorted(set(pool) - {right}), 4)
    rng.shuffle(texts)
    options = dict(zip("ABCDE", texts, strict=True))
    letter = "ABCDE"[texts.index(right)]
    return {"question": f"【合成题】{stem}", "options": options, "answer": right,
            "meta_info": _SECTIONS[kind], "answer_idx": letter}


def make_questions(seed: int = 0) -> dict[str, list[dict]]:
    """Synthetic MedQA rows per split, with the ``PLANTED`` duplicates and train/test overlaps; ``test`` ends
    with ``TEST_EXTRA`` more unique questions."""
    world = make_world(seed)
    rng = random.Random(f"questions-{seed}")
    seen: set = set()
    splits: dict[str, list[dict]] = {}
    for split, n in SPLIT_SIZES.items():
        rows = []
        while len(rows) < n:
            row = _question(rng, world)
            key = (row["question"], tuple(row["options"].values()))
            if key not in seen:  # unique across all splits: the only repeats are the planted ones
                seen.add(key)
                rows.append(row)
        splits[split] = rows

    def plant(rows: list[dict], copies: list[dict]) -> None:
        for row in copies:
            rows.insert(rng.randrange(len(rows) + 1), dict(row))

    plant(splits["test"], rng.sample(splits["train"], PLANTED["test_in_train"]))
    plant(splits["train"], rng.sample(splits["train"], PLANTED["train_duplicates"]))
    plant(splits["dev"], rng.sample(splits["dev"], PLANTED["dev_duplicates"]))
    extra = random.Random(f"test-extra-{seed}")  # its own stream: the rows above stay as they were
    while len(splits["test"]) < SPLIT_SIZES["test"] + PLANTED["test_in_train"] + TEST_EXTRA:
        row = _question(extra, world)
        key = (row["question"], tuple(row["options"].values()))
        if key not in seen:
            seen.add(key)
            splits["test"].append(row)
    return splits


def make_textbooks(seed: int = 0) -> dict[str, list[str]]:
    """Three small synthetic books (lines, blank ones included) stating the world's facts."""
    world = make_world(seed)
    note = "本书为程序自动生成的合成教材，仅用于冒烟测试，书中疾病与药物纯属虚构。"
    internal = [note, ""]
    for d in world:
        internal.append(f"{d.name}是一种虚构的疾病。其典型表现为{d.symptom}，病变最常累及{d.organ}。")
        internal.append(f"{d.name}的诊断：出现{d.symptom}的患者应考虑本病，确诊最常用的检查是{d.test}。")
    internal.append("")
    pharmacology = [note] + [f"{d.drug}是{d.name}的首选治疗药物。{d.drug}为虚构药物，仅存在于本合成教材。" for d in world]
    # one paragraph of ~2,000 characters: real textbook lines run from a few characters to over 10,000
    long_para = "".join(f"{d.name}患者常见{d.symptom}；首选{d.test}明确诊断，并注意{d.organ}的受累情况。" for d in world * 3)
    diagnostics = [note, long_para, "", "   ", f"常用检查包括{'、'.join(_TESTS)}。"]
    return {"合成内科学": internal, "合成药理学": pharmacology, "合成诊断学": diagnostics}


def write_medqa(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the synthetic data in MedQA's ``data_clean`` layout under ``out_dir``."""
    out_dir = Path(out_dir)
    qdir = out_dir / "questions" / "Mainland"
    qdir.mkdir(parents=True, exist_ok=True)
    for split, rows in make_questions(seed).items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (qdir / f"{split}.jsonl").write_text(text, encoding="utf-8")
    tdir = out_dir / "textbooks" / "zh_paragraph"
    tdir.mkdir(parents=True, exist_ok=True)
    for book, lines in make_textbooks(seed).items():
        (tdir / f"{book}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
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


def write_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Tokenizer and model, saved with ``save_pretrained`` like any hub model folder."""
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(seed)
    model = build_model(tokenizer, seed)
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
