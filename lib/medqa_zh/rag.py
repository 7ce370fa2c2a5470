"""Retrieval over MedQA's 33 Chinese textbooks: passages, BM25 (bm25s), and rank fusion.

**Passages.** A textbook file holds one paragraph per line, from a few characters to over 17,000.
:func:`chunk_paragraph` cuts a paragraph into passages of at most ``max_chars`` characters on
Chinese sentence boundaries (``。！？；`` and their ASCII forms), so a passage never ends mid-
sentence unless one sentence alone is longer than ``max_chars`` (then it is cut at ``max_chars``).
Consecutive passages of a paragraph share up to ``overlap`` characters of whole sentences, so a
fact that straddles a boundary is whole in one of them. Nothing is dropped: each passage records
where it starts in its paragraph, and :func:`build_corpus` checks that the passages of every
paragraph cover it exactly, character for character.

**Provenance.** A passage id is ``<book>:<line>:<chunk>``: the book's file name, the paragraph's
line number in that file, and the passage's index within the paragraph.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import bm25s
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import data, evaluate, files, models, prompts

# torch and the Hugging Face stack (transformers, peft, trl, datasets, sentence-transformers, vLLM) are
# imported inside the functions that use them, so importing this module stays fast.

SENTENCE_ENDS = "。！？；!?;\n"
CLOSERS = "”’」』）)"


@dataclass(frozen=True)
class Passage:
    book: str    # textbook file stem, e.g. "内科学"
    line: int    # the paragraph's line number in the book file (1-based)
    chunk: int   # index of this passage within its paragraph (0-based)
    start: int   # character offset of the passage in its paragraph
    text: str

    @property
    def id(self) -> str:
        return f"{self.book}:{self.line}:{self.chunk}"


def split_sentences(text: str) -> list[str]:
    """Sentences, each ending with its mark (``。！？；`` or ASCII ``!?;`` or a newline) and any
    closing quotes or brackets after it; the last may have no mark. Joined, they give back
    ``text`` exactly."""
    sentences, start = [], 0
    for i, ch in enumerate(text):
        if ch in SENTENCE_ENDS and i >= start:
            end = i + 1
            while end < len(text) and text[end] in CLOSERS:
                end += 1
            sentences.append(text[start:end])
            start = end
    if start < len(text):
        sentences.append(text[start:])
    return sentences


def chunk_paragraph(text: str, max_chars: int, overlap: int = 0) -> list[tuple[int, str]]:
    """Cut ``text`` into ``(start offset, passage)`` pairs of at most ``max_chars`` characters, on
    sentence boundaries where possible, consecutive passages sharing up to ``overlap`` characters
    of whole sentences. The passages cover ``text`` completely, in order."""
    if max_chars < 1:
        raise ValueError(f"rag.max_chars must be at least 1, not {max_chars}")
    if not 0 <= overlap < max_chars:
        raise ValueError(f"rag.overlap must be at least 0 and below rag.max_chars ({max_chars}), not {overlap}")
    # sentences longer than max_chars are cut into pieces of max_chars: the only mid-sentence cuts
    pieces, offset = [], 0
    for sentence in split_sentences(text):
        for i in range(0, len(sentence), max_chars):
            pieces.append((offset + i, sentence[i: i + max_chars]))
        offset += len(sentence)
    chunks, current = [], []  # current: the pieces of the passage being filled
    for piece in pieces:
        if current and sum(len(p) for _, p in current) + len(piece[1]) > max_chars:
            chunks.append(current)
            # carry whole trailing sentences of up to `overlap` characters into the next passage
            carried = []
            for prev in reversed(current):
                if sum(len(p) for _, p in carried) + len(prev[1]) > overlap:
                    break
                carried.insert(0, prev)
            if carried == current:  # never repeat a whole passage
                carried = []
            while carried and sum(len(p) for _, p in carried) + len(piece[1]) > max_chars:
                carried.pop(0)
            current = carried
        current.append(piece)
    if current:
        chunks.append(current)
    return [(c[0][0], "".join(p for _, p in c)) for c in chunks]


def paragraph_passages(book: str, line: int, text: str, max_chars: int, overlap: int) -> list[Passage]:
    return [Passage(book, line, i, start, chunk)
            for i, (start, chunk) in enumerate(chunk_paragraph(text, max_chars, overlap))]


def check_coverage(text: str, passages: list[Passage]) -> None:
    """Raise unless the passages are verbatim slices of ``text`` that together cover all of it."""
    covered = 0
    for p in passages:
        if text[p.start: p.start + len(p.text)] != p.text:
            raise AssertionError(f"passage {p.id} is not the text at offset {p.start} of its paragraph")
        if p.start > covered:
            raise AssertionError(f"passage {p.id} starts at {p.start}: characters {covered}-{p.start} of "
                                 f"{p.book}:{p.line} are in no passage")
        covered = max(covered, p.start + len(p.text))
    if covered != len(text):
        raise AssertionError(f"{passages[0].book}:{passages[0].line}: the passages end at character {covered} of "
                             f"{len(text)}")


@dataclass
class Corpus:
    """The passages of every textbook, with the counts that prove nothing was lost."""

    passages: list[Passage]
    stats: dict
    fingerprint: str  # changes whenever a textbook or the chunking settings change

    def __len__(self) -> int:
        return len(self.passages)

    def table(self):
        """Per book: paragraphs, passages, characters in and out."""
        return pd.DataFrame(self.stats["books"])


def build_corpus(textbooks_dir, max_chars: int, overlap: int, progress: bool = True) -> Corpus:
    """Read every ``*.txt`` under ``textbooks_dir`` (:func:`data.read_textbooks`: UTF-8, one
    paragraph per line) and chunk every paragraph; checks that each paragraph is fully covered."""
    books = data.read_textbooks(textbooks_dir)
    h = hashlib.sha256(f"chunking v1|{max_chars}|{overlap}".encode())
    passages, rows = [], []
    for book in tqdm(books, desc="chunking textbooks", unit="book", disable=not progress):
        if not book.paragraphs:
            raise ValueError(f"{book.path}: no text (every line is blank); remove the file or restore its text")
        out = []
        for line, text in book.paragraphs:
            ps = paragraph_passages(book.name, line, text, max_chars, overlap)
            check_coverage(text, ps)
            out.extend(ps)
        h.update(book.name.encode() + b"\0" + book.path.read_bytes())
        passages.extend(out)
        rows.append({"book": book.name, "paragraphs": len(book.paragraphs), "passages": len(out),
                     "characters_in": book.characters, "characters_out": sum(len(p.text) for p in out),
                     "longest_paragraph": max(len(t) for _, t in book.paragraphs),
                     "split_paragraphs": sum(1 for p in out if p.chunk == 1)})
    stats = {
        "books": rows, "paragraphs": sum(r["paragraphs"] for r in rows), "passages": len(passages),
        "characters_in": sum(r["characters_in"] for r in rows),
        "characters_out": sum(r["characters_out"] for r in rows), "max_chars": max_chars, "overlap": overlap,
    }
    return Corpus(passages, stats, h.hexdigest()[:16])


def save_passages(corpus: Corpus, path) -> Path:
    """The passages as jsonl (one per line, with id and provenance), next to a stats json."""
    path = Path(path)
    with files.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for p in corpus.passages:
            f.write(json.dumps({"id": p.id, **asdict(p)}, ensure_ascii=False) + "\n")
    files.write_text(path.with_suffix(".stats.json"),
                     json.dumps({**corpus.stats, "fingerprint": corpus.fingerprint}, ensure_ascii=False, indent=1))
    return path


# --------------------------------------------------------------------------- BM25 (bm25s)

TOKENIZERS = ("bigram", "jieba")


def _runs(text: str):
    """Runs of Chinese characters and of ASCII letters/digits (NFKC, lowercase); the rest (spaces,
    punctuation) separates them."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.findall(r"[\u3400-\u4dbf\u4e00-\u9fff]+|[a-z0-9]+(?:\.[0-9]+)?", text)


def tokenize(text: str, method: str = "bigram") -> list[str]:
    """BM25 terms of ``text``.

    * ``bigram``: every two consecutive Chinese characters (a lone character stays a unigram),
      ASCII words and numbers whole. No dictionary: medical terms are never split wrongly, at the
      price of more, noisier terms.
    * ``jieba``: jieba's word segmentation (its default dictionary), punctuation dropped.
    """
    if method == "bigram":
        terms = []
        for run in _runs(text):
            if run[0].isascii():
                terms.append(run)
            elif len(run) == 1:
                terms.append(run)
            else:
                terms.extend(run[i: i + 2] for i in range(len(run) - 1))
        return terms
    if method == "jieba":
        import jieba  # only this tokenization needs the segmenter

        jieba.setLogLevel(60)  # no "Building prefix dict" chatter
        return [w for run in _runs(text) for w in jieba.lcut(run)]
    raise ValueError(f"rag.tokenizer must be one of {', '.join(TOKENIZERS)}, not {method!r}")


class BM25:
    """A bm25s index over a :class:`Corpus`, saved and loaded with the corpus fingerprint."""

    def __init__(self, retriever, tokenizer: str, fingerprint: str):
        self.retriever, self.tokenizer, self.fingerprint = retriever, tokenizer, fingerprint

    @classmethod
    def build(cls, corpus: Corpus, tokenizer: str = "bigram", k1: float = 1.5, b: float = 0.75,
              method: str = "lucene", progress: bool = True) -> "BM25":
        tokens = [tokenize(p.text, tokenizer) for p in tqdm(corpus.passages, desc=f"BM25 terms ({tokenizer})",
                                                             unit="passage", disable=not progress, mininterval=2)]
        retriever = bm25s.BM25(k1=k1, b=b, method=method)
        retriever.index(tokens, show_progress=False)
        return cls(retriever, tokenizer, corpus.fingerprint)

    def save(self, folder) -> Path:
        folder = Path(folder)
        with files.replacing(folder) as tmp:
            self.retriever.save(tmp)
            (tmp / "medqa_zh.json").write_text(json.dumps({"tokenizer": self.tokenizer, "corpus": self.fingerprint}))
        return folder

    @classmethod
    def load(cls, folder, corpus: Corpus) -> "BM25":
        """Load a saved index; an error when it was built from another corpus or other chunking."""
        folder = Path(folder)
        meta = json.loads((folder / "medqa_zh.json").read_text())
        if meta["corpus"] != corpus.fingerprint:
            raise ValueError(f"{folder} was built from another corpus ({meta['corpus']}, not {corpus.fingerprint}): "
                             "delete it, or let rag.bm25_index rebuild it")
        return cls(bm25s.BM25.load(folder), meta["tokenizer"], meta["corpus"])

    def search(self, queries: list[str], k: int = 10) -> list[list[tuple[int, float]]]:
        """For each query, the ``k`` best passages as (passage index, score), best first."""
        tokens = [tokenize(q, self.tokenizer) or ["<empty>"] for q in queries]
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)  # n_threads=0: no thread pool
        return [[(int(d), float(s)) for d, s in zip(row_d, row_s, strict=True)] for row_d, row_s in zip(docs, scores, strict=True)]


def bm25_index(corpus: Corpus, cache_dir, tokenizer: str = "bigram", progress: bool = True) -> BM25:
    """The BM25 index of ``corpus``: loaded from ``cache_dir/bm25-<tokenizer>-<fingerprint>`` when
    built before from the very same corpus, else built and saved there."""
    folder = Path(cache_dir) / f"bm25-{tokenizer}-{corpus.fingerprint}"
    if (folder / "medqa_zh.json").is_file():
        return BM25.load(folder, corpus)
    index = BM25.build(corpus, tokenizer, progress=progress)
    index.save(folder)
    return index


# --------------------------------------------------------------------------- fusion


def reciprocal_rank_fusion(rankings: list[list[int]], k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal rank fusion (Cormack et al., 2009): each item scores sum(1 / (k + rank)) over
    the rankings it appears in (rank from 1). Best first; ties keep first-seen order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: -kv[1])


# --------------------------------------------------------------------------- queries and retrieval quality


def query_text(question: str, options) -> str:
    """The retrieval query: the question and every option's text (the original LLaMA-Factory
    workflow searched with the question alone, missing the words that tell the options apart)."""
    return question.strip() + "\n" + "\n".join(options[letter] for letter in sorted(options))


def normalize(text: str) -> str:
    """For containment checks: NFKC, lowercase, no whitespace, punctuation or symbols."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch)[0] in "PS"))


def option_hits(context: str, options, answer: str) -> dict:
    """Does ``context`` contain the correct option's text, and does it contain any wrong option's
    text (both normalized; an option that normalizes to nothing is never "contained")?"""
    ctx = normalize(context)

    def found(text):
        t = normalize(text)
        return bool(t) and t in ctx

    wrong = [found(text) for letter, text in options.items() if letter != answer]
    return {"correct": found(options[answer]), "wrong": any(wrong),
            "wrong_per_option": sum(wrong) / len(wrong) if wrong else 0.0}


QUALITY_TABLE = "08_retrieval_quality.csv"  # retrieval_quality's table, as 08 writes it (10 reads it back)


def _check_rankings(name: str, ranked, questions) -> None:
    if len(ranked) != len(questions):
        raise ValueError(f"{name}: {len(ranked)} rankings for {len(questions)} questions (one ranked list of "
                         "passage indices per question, in the questions' order)")


def retrieval_quality(questions, rankings: dict, passages, ks=(1, 3, 5, 10)):
    """A **proxy** for retrieval quality, for data without gold passages (real MedQA): per
    retriever and k, the share of questions whose top-k passages contain the correct option's
    text, the share that contain a wrong option's text, and the difference. A retriever that
    finds the *answer* more often than a distractor is finding evidence, not just the topic.
    Where every question's gold passage is known (the smoke world), :func:`gold_recall`
    measures the real thing.

    A question has one correct option and three or four wrong ones, so "contains *a* wrong option"
    has more chances than "contains *the* correct one". ``wrong_per_option`` is the share for one
    wrong option on average, the fair baseline: an uninformative retriever finds the correct option
    as often as any one wrong option, so ``lift = contains_correct - wrong_per_option`` is about 0.

    ``rankings``: retriever name -> one ranked list of passage indices per question (best first,
    at least ``max(ks)`` long); ``passages``: the corpus's passages (anything with ``.text``)."""
    rows = []
    for name, ranked in rankings.items():
        _check_rankings(name, ranked, questions)
        for k in ks:
            hits = [option_hits("\n".join(passages[i].text for i in r[:k]), q.options, q.answer_idx)
                    for q, r in zip(questions, ranked, strict=True)]
            correct = sum(h["correct"] for h in hits) / len(hits)
            wrong = sum(h["wrong"] for h in hits) / len(hits)
            per_option = sum(h["wrong_per_option"] for h in hits) / len(hits)
            rows.append({"retriever": name, "k": k, "contains_correct": correct, "contains_wrong": wrong,
                         "difference": correct - wrong, "wrong_per_option": per_option,
                         "lift": correct - per_option, "n": len(hits)})
    return pd.DataFrame(rows)


GOLD_RECALL_TABLE = "08_gold_recall.csv"  # gold_recall's table, as 08 writes it where the data plants gold passages


def gold_recall(questions, rankings: dict, passages, gold: dict, ks=(1, 3, 5, 10)):
    """Recall@k against known gold passages: per retriever and k, the share of questions whose
    top-k passages hold the question's gold sentence, with its Wilson 95% interval
    (:func:`evaluate.wilson`) and ``n``, the questions that have one.

    ``gold``: question id -> the sentence that states its answer (the smoke world's planted file
    knows it for every question it planted a fact for). A question with no gold sentence (not in
    ``gold``, or None / empty there) is left out of ``n`` and counted in ``without_gold``.
    ``rankings`` and ``passages`` as for :func:`retrieval_quality`.

    "Holds" is exact: the sentence is a substring of one passage's text, verbatim. Passages are
    chunks that may cut a paragraph, so a sentence cut across two chunks counts as found only where
    one chunk holds it whole (``rag.overlap`` usually makes one do); two neighbouring chunks in the
    top k that each hold part of it do not count, since each passage is checked alone."""
    sentences = {q.id: (gold.get(q.id) or "").strip() for q in questions}
    with_gold = [i for i, q in enumerate(questions) if sentences[q.id]]
    rows = []
    for name, ranked in rankings.items():
        _check_rankings(name, ranked, questions)
        for k in ks:
            found = sum(any(sentences[questions[i].id] in passages[p].text for p in ranked[i][:k]) for i in with_gold)
            n = len(with_gold)
            low, high = evaluate.wilson(found, n)
            rows.append({"retriever": name, "k": k, "recall": found / n if n else float("nan"), "ci_low": low,
                         "ci_high": high, "found": found, "n": n, "without_gold": len(questions) - n})
    return pd.DataFrame(rows, columns=["retriever", "k", "recall", "ci_low", "ci_high", "found", "n", "without_gold"])


# --------------------------------------------------------------------------- dense (sentence-transformers)


class EmbedderNotFoundError(RuntimeError):
    """The embedding model named by ``rag.embedder`` could not be loaded."""


def load_embedder(name_or_path: str, device: str | None = None):
    """A sentence-transformers model by hub id or local folder, on ``device`` (default: the GPU when
    there is one: embedding the 130k textbook passages takes ~45 min on 2 CPU cores, a minute or
    two on a GPU), with an error that says what to fix."""
    from sentence_transformers import SentenceTransformer


    device = models.best_device(device or "auto")
    try:
        local = models.fetch(name_or_path, "rag.embedder", "MEDQA_EMBEDDER")  # a ModelScope id: its folder
    except models.ModelNotFoundError as e:
        raise EmbedderNotFoundError(str(e)) from None
    try:
        return SentenceTransformer(local, device=device)
    except Exception as e:  # hub unreachable, no such folder, not a sentence-transformers model
        where = f" from {models.hub_endpoint()}" if models.is_hub_id(local) else ""
        raise EmbedderNotFoundError(
            f"cannot load the embedder {name_or_path!r}{where} (setting rag.embedder): {type(e).__name__}: {e}. "
            f"It must be a sentence-transformers model. {models.how_to_get(str(name_or_path), 'MEDQA_EMBEDDER')}"
        ) from None


class Dense:
    """Passage embeddings (unit length, float32) and the encoder that made them; search is one
    matrix product of the query embeddings with all passages (exact, no approximate index)."""

    def __init__(self, encoder, embeddings, meta: dict):
        self.encoder, self.embeddings, self.meta = encoder, embeddings, meta

    def search(self, queries: list[str], k: int = 10, batch_size: int = 64) -> list[list[tuple[int, float]]]:
        q = self.encoder.encode(queries, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False).astype(np.float32)
        scores = q @ np.asarray(self.embeddings).T
        k = min(k, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        out = []
        for row, idx in zip(scores, top, strict=True):
            idx = idx[np.argsort(-row[idx], kind="stable")]
            out.append([(int(i), float(row[i])) for i in idx])
        return out


def _embedder_slug(name_or_path: str) -> str:
    return f"{Path(str(name_or_path)).name}-{hashlib.sha256(str(name_or_path).encode()).hexdigest()[:8]}"


def dense_folder(corpus: Corpus, embedder: str, cache_dir) -> Path:
    """Where :func:`dense_index` keeps the embeddings of ``corpus`` by ``embedder``."""
    return Path(cache_dir) / f"dense-{_embedder_slug(embedder)}-{corpus.fingerprint}"


def dense_index(corpus: Corpus, embedder: str, cache_dir, batch_size: int = 64, part_size: int = 4096,
                progress: bool = True, encoder=None) -> Dense:
    """Embeddings of every passage with ``embedder``, computed once per (corpus, embedder) and kept
    in ``cache_dir/dense-<embedder>-<corpus fingerprint>/`` (``embeddings.npy`` + ``meta.json``).

    Work is saved every ``part_size`` passages, so an interrupted build resumes where it stopped.
    Passages longer than the encoder's ``max_seq_length`` (in tokens) are truncated by the encoder;
    how many is counted and kept in ``meta["truncated"]``, never silent.
    """
    folder = dense_folder(corpus, embedder, cache_dir)
    encoder = encoder or load_embedder(embedder)
    meta_path, emb_path = folder / "meta.json", folder / "embeddings.npy"
    if meta_path.is_file() and emb_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["corpus"] == corpus.fingerprint and meta["passages"] == len(corpus):
            return Dense(encoder, np.load(emb_path, mmap_mode="r"), meta)
    parts = folder / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    texts = [p.text for p in corpus.passages]
    limit = encoder.max_seq_length
    truncated_path = parts / "truncated.json"
    truncated = json.loads(truncated_path.read_text()) if truncated_path.is_file() else {}
    with tqdm(total=len(texts), desc=f"embedding passages ({Path(str(embedder)).name})", unit="passage",
              disable=not progress, mininterval=2) as bar:
        for start in range(0, len(texts), part_size):
            part = parts / f"part-{start:08d}.npy"
            batch = texts[start: start + part_size]
            if not part.is_file():
                lengths = [len(ids) for ids in encoder.tokenizer(batch, add_special_tokens=True)["input_ids"]]
                vectors = encoder.encode(batch, batch_size=batch_size, normalize_embeddings=True,
                                         convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
                with files.replacing(part) as tmp, open(tmp, "wb") as f:
                    np.save(f, vectors)
                truncated[str(start)] = sum(n > limit for n in lengths)
                files.write_text(truncated_path, json.dumps(truncated))
            bar.update(len(batch))
    embeddings = np.concatenate([np.load(parts / f"part-{s:08d}.npy") for s in range(0, len(texts), part_size)])
    meta = {"corpus": corpus.fingerprint, "embedder": str(embedder), "passages": len(texts),
            "dim": int(embeddings.shape[1]), "max_seq_length": limit, "truncated": int(sum(truncated.values()))}
    with files.replacing(emb_path) as tmp, open(tmp, "wb") as f:
        np.save(f, embeddings)
    files.write_text(meta_path, json.dumps(meta, indent=1))
    shutil.rmtree(parts)
    return Dense(encoder, np.load(emb_path, mmap_mode="r"), meta)


# --------------------------------------------------------------------------- context for the prompt


def token_counter(tokenizer):
    """``count(text) -> tokens`` with ``tokenizer`` (no special tokens): how a passage's length is
    measured against ``rag.context_tokens``, in the tokens of the model that reads it."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return count


def fit_context(ranked: list[Passage], count_tokens, budget: int) -> list[Passage]:
    """The best passages, in rank order, while their formatted block (``prompts.format_context``)
    stays within ``budget`` tokens as ``count_tokens(text) -> int`` counts them (the served model's
    tokenizer). Stops at the first passage that does not fit, so rank order is kept; may be empty."""
    chosen = []
    for p in ranked:
        if count_tokens(prompts.format_context([(q.book, q.text) for q in chosen + [p]])) > budget:
            break
        chosen.append(p)
    return chosen


# --------------------------------------------------------------------------- everything a profile asks for


RETRIEVERS = ("bm25", "dense", "hybrid")  # hybrid: reciprocal rank fusion of the other two
FUSION_DEPTH = 50  # hybrid fuses this many of each retriever's best passages (k of each, when k is more)


def profile_retrievers(cfg, key: str) -> list[str]:
    """The retrievers a profile names under ``key`` (``rag.api_retrievers``, ``rag.rotation_retrievers``):
    each must be one of ``rag.retrievers``, the ones built. A name that is not is an error, never skipped."""
    built, wanted = list(cfg["rag.retrievers"]), list(cfg[key] or [])
    stray = [name for name in wanted if name not in built]
    if stray:
        raise ValueError(f"{key} names {', '.join(stray)}, which rag.retrievers ({', '.join(built) or 'none'}) does "
                         f"not build: add it to rag.retrievers or remove it from {key}")
    return wanted


class Retrieval:
    """The corpus and the retrievers of one profile's ``rag`` section, built or loaded from
    ``outputs/<profile>/rag/``: ``rank(queries, "bm25" | "dense" | "hybrid", k)``."""

    def __init__(self, corpus: Corpus, bm25: BM25 | None, dense: Dense | None, rrf_k: int = 60):
        self.corpus, self.bm25, self.dense, self.rrf_k = corpus, bm25, dense, rrf_k

    @classmethod
    def from_profile(cls, cfg, progress: bool = True) -> "Retrieval":
        corpus = build_corpus(cfg.textbooks_dir, cfg["rag.max_chars"], cfg["rag.overlap"], progress=progress)
        cache = cfg.out / "rag"
        passages_file = cache / f"passages-{corpus.fingerprint}.jsonl"
        if not passages_file.is_file():  # for readers and other tools; the indexes do not need it
            save_passages(corpus, passages_file)
        wanted = set(cfg["rag.retrievers"])
        unknown = wanted - set(RETRIEVERS)
        if unknown:
            raise ValueError(f"rag.retrievers: unknown {', '.join(sorted(unknown))} (choose from {', '.join(RETRIEVERS)})")
        bm25 = bm25_index(corpus, cache, cfg["rag.tokenizer"], progress) if wanted & {"bm25", "hybrid"} else None
        dense = dense_index(corpus, cfg.embedder, cache, progress=progress) if wanted & {"dense", "hybrid"} else None
        return cls(corpus, bm25, dense, cfg["rag.rrf_k"])

    def rank(self, queries: list[str], method: str, k: int = 10) -> list[list[int]]:
        """Passage indices, best first, ``k`` per query. Hybrid fuses the top :data:`FUSION_DEPTH` of each
        retriever (``k``, when more) with :func:`reciprocal_rank_fusion`, BM25's list first."""
        if method == "bm25":
            return [[i for i, _ in hits] for hits in self.bm25.search(queries, k)]
        if method == "dense":
            return [[i for i, _ in hits] for hits in self.dense.search(queries, k)]
        if method == "hybrid":
            depth = max(k, FUSION_DEPTH)
            pairs = zip(self.rank(queries, "bm25", depth), self.rank(queries, "dense", depth), strict=True)
            return [[i for i, _ in reciprocal_rank_fusion([b, d], self.rrf_k)[:k]] for b, d in pairs]
        raise ValueError(f"unknown retriever {method!r}: bm25, dense or hybrid")

    def tag(self, method: str, k: int, budget: int) -> str:
        """A name for one RAG condition's cached results that changes with anything its passages
        depend on: the corpus, the retriever and its model or terms, ``k`` and the token budget."""
        parts = [method, self.corpus.fingerprint, k, budget]
        if method in ("bm25", "hybrid"):
            parts.append(self.bm25.tokenizer)
        if method in ("dense", "hybrid"):
            parts.append(self.dense.meta["embedder"])
        if method == "hybrid":
            parts.append(self.rrf_k)
        return f"rag-{method}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:8]}"

    def passages(self, questions, methods, k: int, count_tokens, budget: int) -> dict[str, tuple[str, dict]]:
        """``{retriever: (tag, contexts)}`` for each of ``methods`` (:meth:`tag`, :meth:`contexts`): what
        ``results.in_process``, ``results.api_cached`` and ``results.replicate`` take as passages."""
        return {m: (self.tag(m, k, budget), self.contexts(questions, m, k, count_tokens, budget)) for m in methods}

    def contexts(self, questions, method: str, k: int, count_tokens, budget: int) -> dict[str, list[Passage]]:
        """Question id -> the passages for its prompt: the top ``k`` for question + options, cut to
        the token ``budget`` (:func:`fit_context`)."""
        ranked = self.rank([query_text(q.question, q.options) for q in questions], method, k)
        return {q.id: fit_context([self.corpus.passages[i] for i in r], count_tokens, budget)
                for q, r in zip(questions, ranked, strict=True)}


TOP_K_TABLE = "08_top_k.csv"  # top_k_table, as 08 writes it (tests/technique's script compares its own top k with it)


def top_k_table(retrieval: Retrieval, questions, k: int):
    """Each question's top ``k`` passages by BM25 and by dense retrieval (those ``retrieval`` built), best first,
    for the query :func:`query_text` makes: ``question`` (its id), ``retriever``, ``rank`` (from 1), ``passage``
    (its id) and ``score``."""
    queries = [query_text(q.question, q.options) for q in questions]
    rows = []
    for name, index in (("bm25", retrieval.bm25), ("dense", retrieval.dense)):
        if index is None:
            continue
        for q, hits in zip(questions, index.search(queries, k), strict=True):
            rows += [{"question": q.id, "retriever": name, "rank": rank, "passage": retrieval.corpus.passages[i].id,
                      "score": score} for rank, (i, score) in enumerate(hits, start=1)]
    return pd.DataFrame(rows, columns=["question", "retriever", "rank", "passage", "score"])
