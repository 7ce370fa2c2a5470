# What 08's technique cells read, from the run's files alone: the settings, every paragraph of every book, the
# eval questions' queries and the embedder. The cells chunk the paragraphs themselves; nothing here chunks or ranks.
import json
import time

started_08 = time.perf_counter()
manifest = json.loads((OUT / "manifest.json").read_text(encoding="utf-8"))
settings, root = manifest["settings"], OUT.parents[1]  # OUT is <project>/outputs/<profile>


def project_path(value):  # a path setting: relative ones are relative to the project
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else root / path


rag_settings = settings["rag"]
max_chars, overlap = rag_settings["max_chars"], rag_settings["overlap"]
k, tokenizer_name = rag_settings["top_k"], rag_settings["tokenizer"]

# the textbooks: one paragraph per line of each *.txt (sorted by name), blank lines left out, line numbers from 1
books = sorted((project_path(settings["data"]["medqa_dir"]) / settings["data"]["textbooks_dir"]).glob("*.txt"))
assert books, f"no textbooks under {settings['data']['medqa_dir']}/{settings['data']['textbooks_dir']}"
paragraphs = []  # (book, line, text)
for path in books:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines  # a final newline starts no line
    paragraphs += [(path.stem, n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]

# the eval questions 08 ranks passages for (the first eval.max_questions), each queried as its question and options
with open(OUT / "data" / "questions" / "eval.jsonl", encoding="utf-8") as f:
    eval_rows = [json.loads(line) for line in f][: settings["eval"]["max_questions"]]
question_ids = [row["id"] for row in eval_rows]
queries = [row["question"].strip() + "\n" + "\n".join(row["options"][x] for x in sorted(row["options"])) for row in eval_rows]

# the embedder: rag.embedder, a local folder (relative to the project) or a hub id; None when no dense retriever is built
encoder = passage_vectors = None  # passage_vectors None: the technique cell embeds every passage itself
if {"dense", "hybrid"} & set(rag_settings["retrievers"]):
    from sentence_transformers import SentenceTransformer

    embedder = str(rag_settings["embedder"])
    assert not embedder.startswith("modelscope:"), f"rag.embedder {embedder}: give this script its local folder"
    encoder = SentenceTransformer(str(project_path(embedder)) if project_path(embedder).exists() else embedder)
print(f"read {len(paragraphs):,} paragraphs of {len(books)} books and {len(queries)} eval queries; top k = {k}, "
      f"{tokenizer_name} terms, embedder {rag_settings['embedder'] if encoder else 'none'}", flush=True)
