# 08's cells against the series: the passages the cells cut against those the series saved (rag/passages-*.jsonl),
# and each eval query's top k per retriever against tables/08_top_k.csv (08 writes it from rag.Retrieval's rankings).
import csv


def chunked_with(path):  # a saved passages file's settings, from its stats beside it
    stats = json.loads(path.with_suffix(".stats.json").read_text(encoding="utf-8"))
    return stats["max_chars"], stats["overlap"]


# the passages: the series' chunking of these settings, the latest saved (the name holds the corpus's fingerprint)
saved = [p for p in (OUT / "rag").glob("passages-*.jsonl") if chunked_with(p) == (max_chars, overlap)]
assert saved, f"no rag/passages-*.jsonl of max_chars {max_chars}, overlap {overlap} under {OUT}: did 08 run?"
saved = max(saved, key=lambda p: p.stat().st_mtime)
with open(saved, encoding="utf-8") as f:
    theirs = [(row["id"], row["start"], row["text"]) for row in map(json.loads, f)]
assert len(theirs) == len(passages), f"the cells cut {len(passages):,} passages, the series {len(theirs):,} ({saved.name})"
first = next((n for n, (a, b) in enumerate(zip(passages, theirs, strict=True)) if a != b), None)
assert first is None, f"passage {first}: the cells cut {passages[first]}, the series {theirs[first]} ({saved.name})"

# the top k: the series' table, (retriever, question id) -> [(passage id, score)], best first
series = {}
with open(OUT / "tables" / "08_top_k.csv", encoding="utf-8", newline="") as f:
    for row in csv.DictReader(f):
        series.setdefault((row["retriever"], row["question"]), []).append((int(row["rank"]), row["passage"], float(row["score"])))
series = {key: [(p, s) for _, p, s in sorted(rows)] for key, rows in series.items()}
built = sorted({retriever for retriever, _ in series})
for retriever in built:
    asked = [q for r, q in series if r == retriever]
    assert asked == question_ids, f"{retriever}: the series ranked {len(asked)} questions, the cells {len(question_ids)}"
    assert all(len(series[retriever, q]) == k for q in asked), f"{retriever}: the series' lists are not {k} long"

said = []
if "bm25" in built:  # the same index over the same terms: the same passages, in the same order, with the same scores
    for n, q in enumerate(question_ids):
        ours = [(passage_ids[i], float(s)) for i, s in zip(bm25_top[n], bm25_scores[n], strict=True)]
        assert [p for p, _ in ours] == [p for p, _ in series["bm25", q]], \
            f"bm25, question {q}: the cells' top {k} {ours} != the series' {series['bm25', q]}"
        assert all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for (_, a), (_, b) in zip(ours, series["bm25", q], strict=True)), \
            f"bm25, question {q}: the cells' scores {ours} != the series' {series['bm25', q]}"
    said.append(f"bm25 top-{k} equal on {len(question_ids)} of {len(question_ids)} queries")

TIE = 1e-5  # cosine: embeddings recomputed in other batches may differ in the last float32 bits
if "dense" in built:  # rank by rank the same scores; where the passage differs, a tie: the two score the same
    assert encoder is not None, "the series built a dense retriever, the cells none"
    where = {p: i for i, p in enumerate(passage_ids)}
    same = 0
    for n, q in enumerate(question_ids):
        ours = [(passage_ids[i], float(scores[n, i])) for i in dense_top[n]]
        theirs = series["dense", q]
        assert all(abs(a - b) <= TIE for (_, a), (_, b) in zip(ours, theirs, strict=True)), \
            f"dense, question {q}: the cells' top {k} {ours} != the series' {theirs} (scores beyond {TIE})"
        assert all(abs(float(scores[n, where[p]]) - s) <= TIE for p, s in theirs), \
            f"dense, question {q}: the series' top {k} {theirs} score otherwise here: " \
            f"{[(p, float(scores[n, where[p]])) for p, _ in theirs]}"
        same += [p for p, _ in ours] == [p for p, _ in theirs]
    swapped = f" ({len(question_ids) - same} more the same scores, tied passages swapped, within {TIE})" \
        if same < len(question_ids) else ""
    said.append(f"dense top-{k} (passages embedded here) equal on {same} of {len(question_ids)} queries{swapped}")
assert said, "the series' 08_top_k.csv has no bm25 and no dense rows (rag.retrievers builds neither)"
print(f"08: {len(passages):,} passages equal to the series' {saved.name}; {'; '.join(said)} "
      f"({time.perf_counter() - started_08:.1f} s)", flush=True)
