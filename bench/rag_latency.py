"""What retrieval over the textbooks costs: index builds, cache loads, query latency, side by side.

    python bench/rag_latency.py TEXTBOOKS_DIR QUESTIONS_JSONL --embedder DIR_OR_HUB_ID
        [--queries 200] [--max-chars 300] [--overlap 50] [--reference-passages 20000]
        [--dense-passages N] [--cache DIR]

In one run, on the same queries (question + options of the first ``--queries`` questions):

- chunking the books; building the BM25 index (bm25s) with character bigrams and with jieba;
  saving and loading it (the cache); query latency, one query at a time, p50 and p95;
- rank-bm25 (``BM25Okapi.get_scores``) against bm25s on the first ``--reference-passages``
  passages (rank-bm25 loops over every document in Python, so the whole corpus would take hours),
  same terms, same queries: latency and the ratio;
- dense: the embedding rate on the first ``--dense-passages`` passages (on 2 CPU cores the
  m3e-small stand-in does ~50 passages/s, so the whole corpus takes ~45 min), the whole corpus's
  embeddings (loaded from ``--cache`` when they are there, built otherwise), the cache load, and
  query latency over all passages (embedding the query + one matrix product);
- hybrid (reciprocal rank fusion of the two) query latency.

Memory is the peak resident size during each build, above what the process held before it.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path


def percentiles(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 2)}


def per_query(fn, queries) -> dict:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    return percentiles(times)


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measured(fn):
    """(result, seconds, peak resident MiB during ``fn`` above the resident size before it); Linux."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    except OSError:
        pass
    before = status_mib("VmRSS")
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    return result, seconds, round(status_mib("VmHWM") - before, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("textbooks")
    p.add_argument("questions")
    p.add_argument("--embedder", required=True)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--start", type=int, default=2900, help="first question used as a query")
    p.add_argument("--max-chars", type=int, default=300)
    p.add_argument("--overlap", type=int, default=50)
    p.add_argument("--dense-passages", type=int, default=None,
                   help="also time embedding the first N passages (the build rate, without waiting for a whole build)")
    p.add_argument("--cache", default=None, help="folder of cached embeddings to load the whole corpus's from "
                   "(e.g. outputs/cpu/rag); without it, or when they are not there, they are built (and kept there)")
    p.add_argument("--reference-passages", type=int, default=20000)
    a = p.parse_args()

    import numpy as np
    from rank_bm25 import BM25Okapi

    from medqa_zh import data, rag

    questions, _ = data.read_questions(a.questions)
    questions = questions[a.start: a.start + a.queries]
    queries = [rag.query_text(q.question, q.options) for q in questions]
    rows = []
    corpus, seconds, mem = measured(lambda: rag.build_corpus(a.textbooks, a.max_chars, a.overlap, progress=False))
    rows.append({"step": "chunk the books", "seconds": round(seconds, 2), "peak_mib": mem,
                 "note": f"{corpus.stats['paragraphs']:,} paragraphs -> {len(corpus):,} passages"})
    cache = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    indexes = {}
    for tokenizer in rag.TOKENIZERS:
        index, seconds, mem = measured(partial(rag.BM25.build, corpus, tokenizer, progress=False))
        indexes[tokenizer] = index
        rows.append({"step": f"bm25-{tokenizer}: build", "seconds": round(seconds, 2), "peak_mib": mem})
        folder = index.save(cache / f"bm25-{tokenizer}")
        _, seconds, _ = measured(partial(rag.BM25.load, folder, corpus))
        rows.append({"step": f"bm25-{tokenizer}: load from cache", "seconds": round(seconds, 3)})
        rows.append({"step": f"bm25-{tokenizer}: query", **per_query(lambda q, index=index: index.search([q], 10), queries)})

    # reference: rank-bm25 vs bm25s on the same sub-corpus, same terms, same queries
    n_ref = min(a.reference_passages, len(corpus))
    sub = rag.Corpus(corpus.passages[:n_ref], {}, corpus.fingerprint + "-sub")
    terms = [rag.tokenize(p.text, "bigram") for p in sub.passages]
    reference = BM25Okapi(terms, k1=1.5, b=0.75)
    small = rag.BM25.build(sub, "bigram", method="robertson", progress=False)
    ref_q = queries[: max(1, len(queries) // 10)]  # rank-bm25 is slow: a tenth of the queries
    ref = per_query(lambda q: reference.get_scores(rag.tokenize(q, "bigram")), ref_q)
    fast = per_query(lambda q: small.search([q], 10), ref_q)
    same_top = sum(int(np.argmax(reference.get_scores(rag.tokenize(q, "bigram")))) == small.search([q], 1)[0][0][0]
                   for q in ref_q)
    rows.append({"step": f"rank-bm25 on {n_ref:,} passages: query", **ref, "note": f"{len(ref_q)} queries"})
    rows.append({"step": f"bm25s on the same {n_ref:,}: query", **fast,
                 "note": f"{ref['p50_ms'] / fast['p50_ms']:.0f}x faster (p50); same top passage {same_top}/{len(ref_q)}"})

    # dense: the build rate (on a sample, if asked), then the whole corpus, from --cache when it is there
    encoder = rag.load_embedder(a.embedder)
    if a.dense_passages:
        sample = rag.Corpus(corpus.passages[: a.dense_passages], corpus.stats,
                            corpus.fingerprint + f"-first{a.dense_passages}")
        dense, seconds, mem = measured(lambda: rag.dense_index(sample, a.embedder, cache, progress=True,
                                                               encoder=encoder))
        rate = len(sample) / seconds
        rows.append({"step": f"dense: embed the first {len(sample):,} passages", "seconds": round(seconds, 1),
                     "peak_mib": mem, "note": f"{rate:.0f} passages/s; all {len(corpus):,}: "
                                              f"~{len(corpus) / rate / 60:.0f} min; {dense.meta['truncated']} truncated"})
    dense_cache = Path(a.cache) if a.cache else cache
    cached = (rag.dense_folder(corpus, a.embedder, dense_cache) / "meta.json").is_file()
    dense, seconds, mem = measured(lambda: rag.dense_index(corpus, a.embedder, dense_cache, progress=True,
                                                           encoder=encoder))
    if not cached:
        rows.append({"step": f"dense: embed all {len(corpus):,} passages", "seconds": round(seconds, 1),
                     "peak_mib": mem, "note": f"{len(corpus) / seconds:.0f} passages/s; "
                                              f"{dense.meta['truncated']} truncated"})
    dense, seconds, _ = measured(lambda: rag.dense_index(corpus, a.embedder, dense_cache, progress=False,
                                                         encoder=encoder))
    shape = "x".join(map(str, dense.embeddings.shape))
    rows.append({"step": "dense: load from cache", "seconds": round(seconds, 3),
                 "note": f"{shape} float32, memory-mapped; {dense.meta['truncated']} truncated when built"})
    _, seconds, _ = measured(lambda: dense.search(queries[:1], 10))
    rows.append({"step": "dense: first query after the load", "seconds": round(seconds, 3),
                 "note": "reads the embeddings from disk (or the page cache)"})
    rows.append({"step": "dense: query (embed + search)", **per_query(lambda q: dense.search([q], 10), queries)})
    hybrid = rag.Retrieval(corpus, indexes["bigram"], dense)
    rows.append({"step": "hybrid: query", **per_query(lambda q: hybrid.rank([q], "hybrid", 10), queries)})

    header = ["step", "seconds", "peak_mib", "p50_ms", "p95_ms", "note"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in header) + " |")
    by_step = {row["step"]: row for row in rows}
    print(f"\nover all {len(corpus):,} passages, {len(queries)} queries one at a time:")
    for step, goal in ((f"bm25-{rag.TOKENIZERS[0]}: query", 5), ("dense: query (embed + search)", 50)):
        p50 = by_step[step]["p50_ms"]
        print(f"  {step}: p50 {p50} ms (goal <= {goal} ms: {'met' if p50 <= goal else 'NOT met'})")
    import shutil

    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
