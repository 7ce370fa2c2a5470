"""rag: passages on Chinese sentence boundaries, nothing dropped, provenance, corpus errors."""
import random
from itertools import pairwise

import pytest

from medqa_zh import data, evaluate, rag

TEXT = "肺炎是常见病。病因包括细菌、病毒等！治疗？“抗生素。”然后；最后一句没有句号"


def test_sentences_end_at_chinese_marks_and_join_back():
    assert rag.split_sentences(TEXT) == ["肺炎是常见病。", "病因包括细菌、病毒等！", "治疗？", "“抗生素。”", "然后；",
                                         "最后一句没有句号"]
    assert rag.split_sentences("A cell. Another one") == ["A cell. Another one"]  # "." is no Chinese sentence end
    assert rag.split_sentences("") == []


def test_passages_end_on_sentence_boundaries_with_whole_sentence_overlap():
    chunks = rag.chunk_paragraph(TEXT, max_chars=12, overlap=6)
    assert [c for _, c in chunks] == ["肺炎是常见病。", "病因包括细菌、病毒等！", "治疗？“抗生素。”然后；", "然后；最后一句没有句号"]
    assert [s for s, _ in chunks] == [0, 7, 18, 27]
    assert rag.chunk_paragraph(TEXT, max_chars=100, overlap=10) == [(0, TEXT)]  # short: one passage, no overlap


def test_a_sentence_longer_than_the_limit_is_cut_not_dropped():
    long = "甲" * 25 + "。"
    chunks = rag.chunk_paragraph("短句。" + long, max_chars=10, overlap=0)
    assert [c for _, c in chunks] == ["短句。", "甲" * 10, "甲" * 10, "甲" * 5 + "。"]


@pytest.mark.parametrize("seed", range(30))
def test_random_paragraphs_are_covered_exactly_and_within_the_limit(seed):
    rng = random.Random(seed)
    alphabet = "心肝脾肺肾血气阴阳。！？；，、“”（）\n" + "a"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))
    max_chars = rng.randint(5, 80)
    overlap = rng.randint(0, max_chars - 1)
    passages = rag.paragraph_passages("书", 7, text, max_chars, overlap)
    rag.check_coverage(text, passages)  # every character in some passage, each passage a verbatim slice
    assert all(1 <= len(p.text) <= max_chars for p in passages)
    assert [p.chunk for p in passages] == list(range(len(passages)))
    assert all(b.start > a.start for a, b in pairwise(passages))  # always moving forward
    for a, b in pairwise(passages):
        shared = a.start + len(a.text) - b.start
        assert 0 <= shared <= overlap  # consecutive passages overlap by at most `overlap` characters


def test_coverage_check_catches_a_dropped_piece():
    passages = rag.paragraph_passages("书", 1, TEXT, 12, 0)
    with pytest.raises(AssertionError, match="in no passage"):
        rag.check_coverage(TEXT, passages[:1] + passages[2:])


def test_bad_chunk_settings_are_refused():
    with pytest.raises(ValueError, match="rag.overlap"):
        rag.chunk_paragraph(TEXT, 10, 10)
    with pytest.raises(ValueError, match="rag.max_chars"):
        rag.chunk_paragraph(TEXT, 0, 0)


def _books(tmp_path, **books):
    folder = tmp_path / "textbooks" / "zh_paragraph"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in books.items():
        (folder / f"{name}.txt").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return folder


def test_corpus_counts_add_up_and_ids_carry_provenance(tmp_path):
    folder = _books(tmp_path, 内科学=TEXT + "\n\n短段落。\n", 外科学="一。二。三。四。五。六。七。八。九。十。\n")
    corpus = rag.build_corpus(folder, max_chars=12, overlap=4, progress=False)
    stats = corpus.stats
    assert stats["paragraphs"] == 3 and stats["passages"] == len(corpus)
    assert stats["characters_in"] == len(TEXT) + len("短段落。") + len("一。二。三。四。五。六。七。八。九。十。")
    assert stats["characters_out"] >= stats["characters_in"]  # overlap only adds
    ids = [p.id for p in corpus.passages]
    assert ids[0] == "内科学:1:0" and "内科学:3:0" in ids and ids[-1].startswith("外科学:1:")  # line 2 was blank
    assert len(set(ids)) == len(ids)
    assert {r["book"]: r["passages"] for r in stats["books"]}["内科学"] == 5


def test_corpus_fingerprint_follows_the_text_and_the_settings(tmp_path):
    folder = _books(tmp_path, 内科学=TEXT + "\n")
    first = rag.build_corpus(folder, 12, 4, progress=False).fingerprint
    assert rag.build_corpus(folder, 12, 4, progress=False).fingerprint == first
    assert rag.build_corpus(folder, 12, 2, progress=False).fingerprint != first
    _books(tmp_path, 内科学=TEXT + "改\n")
    assert rag.build_corpus(folder, 12, 4, progress=False).fingerprint != first


def test_corpus_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.txt textbooks"):
        rag.build_corpus(tmp_path / "nowhere", 100, 10, progress=False)
    folder = _books(tmp_path, 空=" \n\n")
    with pytest.raises(ValueError, match="空.txt: no text"):
        rag.build_corpus(folder, 100, 10, progress=False)
    folder = _books(tmp_path / "gbk", 内科学="肺炎。\n".encode("gb18030"))
    with pytest.raises(data.MedQAFormatError, match="内科学.txt:1: not UTF-8"):
        rag.build_corpus(folder, 100, 10, progress=False)


# --------------------------------------------------------------------------- BM25

DOCS = ["大叶性肺炎是纤维素性炎，病原体多为肺炎链球菌。", "急性心肌梗死的典型症状是胸骨后压榨性疼痛。",
        "糖尿病的诊断依据空腹血糖和糖化血红蛋白。", "肝硬化可引起门静脉高压和腹水。",
        "肺结核的主要症状为咳嗽、咯血、低热和盗汗。", "缺铁性贫血的治疗首选口服铁剂。",
        "高血压患者应限制钠盐摄入。", "急性胰腺炎常有血清淀粉酶升高。"]
QUERIES = ["肺炎链球菌引起的大叶性肺炎", "心肌梗死 胸痛", "空腹血糖 诊断", "咯血 盗汗", "淀粉酶", "门静脉高压 腹水"]


@pytest.fixture
def small_corpus(tmp_path):
    return rag.build_corpus(_books(tmp_path, 内科学="\n".join(DOCS) + "\n"), 200, 0, progress=False)


@pytest.mark.parametrize("tokenizer", rag.TOKENIZERS)
def test_bm25s_ranks_like_the_rank_bm25_reference(small_corpus, tokenizer):
    from rank_bm25 import BM25Okapi

    reference = BM25Okapi([rag.tokenize(d, tokenizer) for d in DOCS], k1=1.5, b=0.75)
    index = rag.BM25.build(small_corpus, tokenizer, k1=1.5, b=0.75, method="robertson", progress=False)
    for query, hits in zip(QUERIES, index.search(QUERIES, k=3), strict=True):
        scores = reference.get_scores(rag.tokenize(query, tokenizer))
        assert hits[0][0] == int(scores.argmax()), query
        # bm25s leaves out the constant factor (k1 + 1) of the term-frequency part: same ranking
        assert hits[0][1] * (1.5 + 1) == pytest.approx(float(scores.max()), rel=1e-4)


def test_bm25_finds_the_passage_and_survives_an_empty_query(small_corpus):
    index = rag.BM25.build(small_corpus, "bigram", progress=False)
    best = [hits[0][0] for hits in index.search(QUERIES, k=2)]
    assert [small_corpus.passages[i].line for i in best] == [1, 2, 3, 5, 8, 4]
    assert len(index.search(["，。！"], k=2)[0]) == 2  # no terms at all: an answer, not a crash


def test_bm25_index_is_cached_per_corpus_and_never_reused_for_another(tmp_path, small_corpus, monkeypatch):
    first = rag.bm25_index(small_corpus, tmp_path / "cache", "bigram", progress=False)
    monkeypatch.setattr(rag.BM25, "build", classmethod(lambda *a, **k: pytest.fail("rebuilt a cached index")))
    again = rag.bm25_index(small_corpus, tmp_path / "cache", "bigram", progress=False)
    assert again.search(QUERIES, 3) == first.search(QUERIES, 3)
    monkeypatch.undo()
    changed = rag.build_corpus(_books(tmp_path / "v2", 内科学="\n".join(DOCS[:4]) + "\n"), 200, 0, progress=False)
    assert changed.fingerprint != small_corpus.fingerprint
    rebuilt = rag.bm25_index(changed, tmp_path / "cache", "bigram", progress=False)
    assert all(i < 4 for hits in rebuilt.search(QUERIES, 3) for i, _ in hits)  # the new corpus, not the old index
    folder = next((tmp_path / "cache").glob(f"bm25-bigram-{small_corpus.fingerprint}"))
    with pytest.raises(ValueError, match="another corpus"):
        rag.BM25.load(folder, changed)


def test_reciprocal_rank_fusion_rewards_agreement():
    fused = rag.reciprocal_rank_fusion([[1, 2, 3], [2, 3, 4]], k=60)
    assert [item for item, _ in fused] == [2, 3, 1, 4]  # 2 and 3 are in both lists; 1 outranks 4 (rank 1 vs 3)
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert rag.reciprocal_rank_fusion([[5, 6]]) == [(5, 1 / 61), (6, 1 / 62)]


class _Ranking:
    """A stand-in retriever: the same ranking for every query, cut at ``k``."""

    def __init__(self, order):
        self.order = order

    def search(self, queries, k=10):
        return [[(i, 0.0) for i in self.order[:k]] for _ in queries]


def test_hybrid_fuses_the_top_fusion_depth_of_each_list_bm25_first_on_a_tie():
    depth = rag.FUSION_DEPTH
    bm25 = list(range(depth)) + [999]   # 999 is just below BM25's top FUSION_DEPTH ...
    dense = [999] + list(range(1000, 1000 + depth))  # ... and dense's best
    retrieval = rag.Retrieval(None, _Ranking(bm25), _Ranking(dense), rrf_k=60)
    # 999 fused from dense alone: 1/61, the same as BM25's best, which BM25's list puts first
    assert retrieval.rank(["q", "q"], "hybrid", 3) == [[0, 999, 1]] * 2
    assert retrieval.rank(["q"], "hybrid", depth + 1)[0][:2] == [999, 0]  # k beyond the depth: k of each list


def test_the_top_k_table_holds_each_built_retrievers_top_k_by_passage_id(small_corpus):
    from types import SimpleNamespace as NS

    questions = [NS(id=f"q{i}", question=q, options={"A": "，"}) for i, q in enumerate(QUERIES)]  # no option terms
    bm25 = rag.BM25.build(small_corpus, "bigram", progress=False)
    table = rag.top_k_table(rag.Retrieval(small_corpus, bm25, _Ranking([3, 1, 0])), questions, 2)
    assert list(table.columns) == ["question", "retriever", "rank", "passage", "score"]
    assert len(table) == 2 * 2 * len(QUERIES) and table["rank"].tolist() == [1, 2] * 2 * len(QUERIES)
    best = table[(table["retriever"] == "bm25") & (table["rank"] == 1)]
    assert best["passage"].tolist() == [f"内科学:{line}:0" for line in (1, 2, 3, 5, 8, 4)]  # as BM25 finds them
    assert best["score"].tolist() == [hits[0][1] for hits in bm25.search(QUERIES, 1)]
    dense = table[table["retriever"] == "dense"]
    assert dense["question"].tolist() == [q.id for q in questions for _ in (1, 2)]
    assert set(dense["passage"]) == {"内科学:4:0", "内科学:2:0"}
    assert rag.top_k_table(rag.Retrieval(small_corpus, None, None), questions, 2).empty  # nothing built


# --------------------------------------------------------------------------- retrieval quality


def test_query_has_the_question_and_every_option():
    assert rag.query_text(" 哪项正确？ ", {"B": "乙药", "A": "甲药"}) == "哪项正确？\n甲药\n乙药"


def test_option_hits_normalize_and_ignore_empty_options():
    options = {"A": "纤维素性炎", "B": "化脓性 炎", "C": "（  ）", "D": "Ｘ线"}
    assert rag.option_hits("大叶性肺炎是纤维素性炎。", options, "A") == {"correct": True, "wrong": False,
                                                                       "wrong_per_option": 0.0}
    assert rag.option_hits("大叶性肺炎是纤维素性炎。", options, "B") == {"correct": False, "wrong": True,
                                                                       "wrong_per_option": 1 / 3}
    assert rag.option_hits("小叶性肺炎为化脓性炎！", options, "B")["correct"]  # the space and ！ do not matter
    assert rag.option_hits("胸部x线检查", options, "D")["correct"]  # full-width Ｘ, any case
    assert not rag.option_hits("（）", options, "C")["correct"]  # all punctuation: never counts


def test_retrieval_quality_on_a_hand_made_example():
    from types import SimpleNamespace as NS

    passages = [NS(text="大叶性肺炎是纤维素性炎。"), NS(text="小叶性肺炎是化脓性炎。"), NS(text="无关的段落。")]
    questions = [NS(options={"A": "纤维素性炎", "B": "化脓性炎"}, answer_idx="A"),
                 NS(options={"A": "纤维素性炎", "B": "化脓性炎"}, answer_idx="B")]
    rankings = {"good": [[0, 2], [1, 2]], "topic only": [[1, 0], [0, 1]], "lost": [[2, 0], [2, 0]]}
    table = rag.retrieval_quality(questions, rankings, passages, ks=(1, 2)).set_index(["retriever", "k"])
    assert table.loc[("good", 1), ["contains_correct", "contains_wrong"]].tolist() == [1.0, 0.0]
    assert table.loc[("good", 2), ["contains_correct", "contains_wrong"]].tolist() == [1.0, 0.0]
    assert table.loc[("topic only", 1), ["contains_correct", "contains_wrong"]].tolist() == [0.0, 1.0]
    assert table.loc[("topic only", 2), "difference"] == 0.0  # both options in view: no signal
    assert table.loc[("good", 1), "lift"] == 1.0 and table.loc[("topic only", 1), "lift"] == -1.0
    assert table.loc[("lost", 1), "contains_correct"] == 0.0 and table.loc[("lost", 2), "contains_correct"] == 0.5
    with pytest.raises(ValueError, match="1 rankings for 2 questions"):
        rag.retrieval_quality(questions, {"short": [[0]]}, passages, ks=(1,))



def test_gold_recall_counts_the_gold_sentence_whole_in_one_of_the_top_k():
    from types import SimpleNamespace as NS

    passages = [NS(text="示例药07号是虚拟甲一综合征的首选治疗药物。其他。"), NS(text="无关的段落。"),
                NS(text="另一段。虚拟乙二病变最常"), NS(text="累及肝。"), NS(text="又一段无关。")]
    gold = {"test:1": "示例药07号是虚拟甲一综合征的首选治疗药物。",
            "test:2": "虚拟乙二病变最常累及肝。",  # cut across passages 2 and 3: in no passage whole
            "test:3": None, "dev:9": "不在这些问题里。"}  # test:3 and test:4 have no gold sentence
    questions = [NS(id="test:1"), NS(id="test:2"), NS(id="test:3"), NS(id="test:4")]
    rankings = {"first": [[0, 1, 4], [2, 3, 1], [1, 0, 4], [0, 1, 4]],
                "third": [[1, 4, 0], [2, 3, 1], [0, 1, 4], [0, 1, 4]]}
    table = rag.gold_recall(questions, rankings, passages, gold, ks=(1, 2, 3)).set_index(["retriever", "k"])
    assert list(table.reset_index().columns[:6]) == ["retriever", "k", "recall", "ci_low", "ci_high", "found"]
    assert (table["n"] == 2).all() and (table["without_gold"] == 2).all()  # only test:1 and test:2 are scored
    assert table["found"].to_dict() == {("first", 1): 1, ("first", 2): 1, ("first", 3): 1,
                                        ("third", 1): 0, ("third", 2): 0, ("third", 3): 1}
    assert table.loc[("first", 1), "recall"] == 0.5 and table.loc[("third", 3), "recall"] == 0.5
    assert table.loc[("third", 1), "recall"] == 0.0  # the cut sentence never counts, even with both halves in view
    low, high = table.loc[("first", 1), ["ci_low", "ci_high"]]
    assert (low, high) == pytest.approx(evaluate.wilson(1, 2)) and low < 0.5 < high


def test_gold_recall_without_any_gold_sentence_is_nan_not_an_error():
    from types import SimpleNamespace as NS

    table = rag.gold_recall([NS(id="a")], {"bm25": [[0]]}, [NS(text="x")], {}, ks=(1,))
    assert table["n"].tolist() == [0] and table["without_gold"].tolist() == [1]
    assert table[["recall", "ci_low", "ci_high"]].isna().all(axis=None)


def test_gold_recall_refuses_rankings_that_do_not_match_the_questions():
    from types import SimpleNamespace as NS

    questions = [NS(id="a"), NS(id="b")]
    with pytest.raises(ValueError, match="short: 1 rankings for 2 questions"):
        rag.gold_recall(questions, {"short": [[0]]}, [NS(text="x")], {"a": "x"}, ks=(1,))

# --------------------------------------------------------------------------- dense


@pytest.fixture(scope="module")
def encoder(tiny_assets):
    return rag.load_embedder(tiny_assets["encoder"])


def test_dense_search_is_exact_cosine_and_finds_a_passage_by_its_own_text(tmp_path, small_corpus, encoder):
    import numpy as np

    index = rag.dense_index(small_corpus, "tiny", tmp_path, part_size=3, progress=False, encoder=encoder)
    emb = np.asarray(index.embeddings)
    assert emb.shape == (len(DOCS), 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    hits = index.search(DOCS[:3], k=4)
    assert [h[0][0] for h in hits] == [0, 1, 2] and all(h[0][1] == pytest.approx(1, abs=1e-5) for h in hits)
    q = encoder.encode(["咯血 盗汗"], normalize_embeddings=True)[0]
    brute = np.argsort(-(emb @ q), kind="stable")[:4]
    assert [i for i, _ in index.search(["咯血 盗汗"], k=4)[0]] == brute.tolist()


def test_dense_embeddings_are_cached_and_an_interrupted_build_resumes(tmp_path, small_corpus, encoder, monkeypatch):
    calls = []
    encode = encoder.encode

    def crash_on_second_part(texts, **kwargs):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(texts, **kwargs)

    monkeypatch.setattr(encoder, "encode", crash_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        rag.dense_index(small_corpus, "tiny", tmp_path, part_size=3, progress=False, encoder=encoder)
    calls.clear()
    monkeypatch.setattr(encoder, "encode", lambda texts, **kw: calls.append(len(texts)) or encode(texts, **kw))
    first = rag.dense_index(small_corpus, "tiny", tmp_path, part_size=3, progress=False, encoder=encoder)
    assert calls == [3, 2]  # parts 2 and 3 only: part 1 survived the crash
    calls.clear()
    again = rag.dense_index(small_corpus, "tiny", tmp_path, part_size=3, progress=False, encoder=encoder)
    assert not calls and (again.embeddings == first.embeddings).all()  # loaded, not recomputed
    changed = rag.build_corpus(_books(tmp_path / "v2", 内科学="\n".join(DOCS[:2]) + "\n"), 200, 0, progress=False)
    assert len(rag.dense_index(changed, "tiny", tmp_path, progress=False, encoder=encoder).embeddings) == 2


def test_dense_counts_passages_the_encoder_truncates(tmp_path, encoder):
    corpus = rag.build_corpus(_books(tmp_path, 书="短。\n" + "长" * 300 + "\n"), 1000, 0, progress=False)
    index = rag.dense_index(corpus, "tiny", tmp_path / "cache", progress=False, encoder=encoder)
    assert index.meta["truncated"] == 1 and index.meta["max_seq_length"] == 128


def test_an_embedder_that_cannot_load_is_named(tmp_path):
    with pytest.raises(rag.EmbedderNotFoundError, match="rag.embedder"):
        rag.load_embedder(tmp_path / "no-such-embedder")


def test_context_keeps_rank_order_within_the_token_budget():
    from medqa_zh import prompts

    ps = [rag.Passage("内科学", 1, 0, 0, "甲" * 10), rag.Passage("外科学", 2, 0, 0, "乙" * 30),
          rag.Passage("儿科学", 3, 0, 0, "丙" * 5)]
    overhead = len(prompts.format_context([("内科学", "")]))
    assert rag.fit_context(ps, len, budget=overhead + 10) == ps[:1]  # the 2nd does not fit: stop, keep order
    assert rag.fit_context(ps, len, budget=10_000) == ps
    assert rag.fit_context(ps, len, budget=5) == []


def test_the_retrievers_a_profile_evaluates_must_be_built(project):
    from medqa_zh import config

    cfg = config.load("smoke", {"rag.retrievers": ["bm25"], "rag.api_retrievers": ["bm25"],
                                "rag.rotation_retrievers": []})
    assert rag.profile_retrievers(cfg, "rag.api_retrievers") == ["bm25"]
    assert rag.profile_retrievers(cfg, "rag.rotation_retrievers") == []
    cfg = config.load("smoke", {"rag.retrievers": ["bm25"], "rag.api_retrievers": ["bm25", "hybrid"]})
    with pytest.raises(ValueError, match=r"rag.api_retrievers names hybrid, which rag.retrievers \(bm25\) does not build"):
        rag.profile_retrievers(cfg, "rag.api_retrievers")
