"""Every evaluation's answers on disk: one jsonl per model and evaluation, resumable, and an index.

* :func:`path_for` names the file: ``outputs/<profile>/eval/<kind>/<model>-<evaluation>[-t<max_new_tokens>]-<fingerprint>.jsonl``
  (``kind``: ``direct`` for 06, ``api`` for 07, ``rag`` for 08; the fingerprint is
  :func:`models.answers_fingerprint`, so a retrained model is evaluated afresh);
* :func:`run_cached` appends each batch's rows as they come and, rerun, evaluates only what is
  missing; :func:`read` reads a file back (a line torn by a crash is redone); :func:`record` names
  the file in ``eval/index.json``, and :func:`collect` reads everything the index names (10);
* :func:`in_process` (06, 08) and :func:`api_cached` (07, 08) run a model's evaluations through them.

A result is one row per question: ``id``, ``gold`` (the correct letter), ``pred`` (the letter the
model chose, or None when its answer named no valid letter) and what the evaluation adds
(``logprobs``, ``text``, ``latency_s``, ``passages``, or an ``error`` for a request that failed).
The evaluation names below are the ones the index, the report and its tables use.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from . import debias, evaluate, files, models, rag, serve

LETTER, GENERATE, ROTATIONS, API = "letter", "generate", "rotations", "api"
IN_PROCESS = (LETTER, GENERATE, ROTATIONS)
INDEX = "index.json"


def with_passages(evaluation: str, retriever: str) -> str:
    """The name of ``evaluation`` (``api``, ``rotations``) run with ``retriever``'s passages: ``api+rag bm25``."""
    return f"{evaluation}+rag {retriever}"


# every evaluation a run can record, in the order of the series (the report's row order)
ORDER = (LETTER, ROTATIONS, GENERATE, API, *(with_passages(API, r) for r in rag.RETRIEVERS),
         *(with_passages(ROTATIONS, r) for r in rag.RETRIEVERS))


def path_for(cfg, name: str, evaluation: str, fingerprint: str, kind: str = "direct") -> Path:
    """``outputs/<profile>/eval/<kind>/<model>-<evaluation>[-t<max_new_tokens>]-<fingerprint>.jsonl``;
    generated answers carry ``eval.max_new_tokens`` in the name, since they depend on it."""
    settings = f"-t{cfg['eval.max_new_tokens']}" if evaluation == GENERATE or evaluation.startswith(API) else ""
    return cfg.out / "eval" / kind / f"{name}-{evaluation}{settings}-{fingerprint}.jsonl"


def read(path) -> list[dict]:
    """Rows of a results jsonl; a torn last line (a crash mid-write) is dropped and reported."""
    path = Path(path)
    if not path.is_file():
        return []
    # bytes, not text: a crash can cut the last line inside a multi-byte (Chinese) character
    rows, lines = [], path.read_bytes().splitlines()
    for i, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if i == len(lines):
                print(f"{path}:{i}: incomplete last line (a crash while writing); that question is redone")
                continue
            raise ValueError(f"{path}:{i}: not valid JSON; delete the file to evaluate again from scratch") from None
    return rows


def record(path, model: str, evaluation: str) -> Path:
    """Note in ``eval/index.json`` (beside the ``direct``/``api``/``rag`` folders) that the results
    file ``path`` holds ``model``'s answers for ``evaluation``. The report (10) reads what the index
    names; a later run of the same model and evaluation replaces the entry."""
    path = Path(path)
    index = path.parent.parent / INDEX
    entries = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
    entries[f"{model}|{evaluation}"] = {"model": model, "evaluation": evaluation,
                                        "file": path.relative_to(index.parent).as_posix()}
    return files.write_text(index, json.dumps(entries, ensure_ascii=False, indent=1))


def run_cached(path, questions, score_batch, batch_size: int = 8, progress: bool = True, desc: str = "evaluating",
               label: tuple[str, str] | None = None):
    """Evaluate ``questions`` with ``score_batch(list of questions) -> list of result rows``,
    appending each batch's rows to the jsonl ``path`` as soon as they exist. A rerun reads the file
    and only evaluates the questions not in it, so a crash loses at most one batch. A row with an
    ``error`` (an API request that failed) counts as wrong in this run and is tried again in the
    next. ``label`` (model, evaluation): :func:`record` the file for the report once every question
    has a row. Returns all rows, in the order of ``questions``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = read(path)
    done = {row["id"]: row for row in rows if not row.get("error")}
    if len(done) < len(rows):
        print(f"{path.name}: {len(rows) - len(done)} failed requests of an earlier run are tried again")
    wanted = {q.id for q in questions}
    stale = sorted(set(done) - wanted)
    if stale:
        raise ValueError(f"{path} holds results for {len(stale)} questions not in this evaluation (e.g. {stale[0]!r}); "
                         "it belongs to another split or run: delete it or use another path")
    todo = [q for q in questions if q.id not in done]
    if done:
        print(f"{path.name}: {len(done)} questions already evaluated, {len(todo)} to go")
    if len(done) < len(rows) or (path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")):
        files.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))  # never half of it
    with open(path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=desc, unit="q", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            rows = score_batch(todo[start: start + batch_size])
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[row["id"]] = row
            f.flush()
            bar.update(len(rows))
    if label is not None:
        record(path, *label)
    return [done[q.id] for q in questions]


def _complete(path, questions) -> bool:
    done = {row["id"] for row in read(path) if not row.get("error")}
    return all(q.id in done for q in questions)


def in_process(cfg, name: str, questions, evaluations=IN_PROCESS, passages: dict | None = None,
               progress: bool = True) -> dict[str, list[dict]]:
    """One model's in-process evaluations, each read from its cache and computed where questions
    are missing; the model is loaded once, only if something is missing, and freed at the end.

    ``evaluations``: any of ``letter`` and ``generate`` (06; ``eval.batch_size``,
    ``eval.max_new_tokens``) and ``rotations`` (06, section 5: the first ``eval.rotation_questions``).
    ``passages``: ``{retriever: (tag, contexts)}`` (:meth:`rag.Retrieval.tag`, ``contexts``): the
    rotations again with that retriever's passages in the prompt (08), evaluation
    ``rotations+rag <retriever>``. Returns evaluation name -> rows, in the order of the questions."""
    unknown = set(evaluations) - set(IN_PROCESS)
    if unknown:
        raise ValueError(f"unknown in-process evaluation {', '.join(sorted(unknown))} (choose from {', '.join(IN_PROCESS)})")
    batch_size, fp = cfg["eval.batch_size"], models.answers_fingerprint(cfg, name)
    rotated = questions[: cfg["eval.rotation_questions"]]
    loaded = []

    def model():
        if not loaded:
            loaded.append(models.load_for_eval(cfg, name))
        return loaded[0]

    def scorer(evaluation, contexts=None):
        def score(batch):
            m, tokenizer = model()
            if evaluation == LETTER:
                return evaluate.letter_scores(m, tokenizer, batch, batch_size, progress=False)
            if evaluation == GENERATE:
                return evaluate.generate_answers(m, tokenizer, batch, cfg["eval.max_new_tokens"], batch_size,
                                                 progress=False)
            return debias.rotation_scores(m, tokenizer, batch, progress=False, contexts=contexts)
        return score

    runs = {e: (path_for(cfg, name, e, fp), rotated if e == ROTATIONS else questions, scorer(e)) for e in evaluations}
    for retriever, (tag, contexts) in (passages or {}).items():
        runs[with_passages(ROTATIONS, retriever)] = (path_for(cfg, name, f"{ROTATIONS}-{tag}", fp, kind="rag"),
                                                     rotated, scorer(ROTATIONS, contexts))
    try:
        return {evaluation: run_cached(path, qs, score, batch_size=batch_size, progress=progress,
                                       desc=f"{name}: {evaluation}", label=(name, evaluation))
                for evaluation, (path, qs, score) in runs.items()}
    finally:
        loaded.clear()
        models.free_memory()  # before the next model loads (GPU memory too)


def api_cached(cfg, name: str, questions, passages: dict | None = None, progress: bool = True) -> dict[str, list[dict]]:
    """One model's answers through the HTTP API (07), and with each retriever's passages in the
    prompt (08; ``passages``: ``{retriever: (tag, contexts)}``). The model is served once, with the
    profile's ``serve`` settings, for whatever is not yet complete in its cache, and stopped; when
    everything is cached no server starts. Returns ``{"api": rows, "api+rag <retriever>": rows, ...}``."""
    backend = serve.pick_backend(cfg["serve.backend"])  # vLLM and transformers round differently: cached apart
    fp = models.answers_fingerprint(cfg, name)
    runs = {API: (path_for(cfg, name, f"{API}-{backend}", fp, kind="api"), None)}
    for retriever, (tag, contexts) in (passages or {}).items():
        runs[with_passages(API, retriever)] = (path_for(cfg, name, f"{API}-{backend}-{tag}", fp, kind="rag"), contexts)
    out = {evaluation: run_cached(path, questions, score_batch=lambda batch: [], progress=False, label=(name, evaluation))
           for evaluation, (path, _) in runs.items() if _complete(path, questions)}
    todo = [evaluation for evaluation in runs if evaluation not in out]
    if todo:
        concurrency = cfg["eval.concurrency"]
        with serve.from_profile(cfg, models.available(cfg)[name], served_name=name) as server:
            for evaluation in todo:
                path, contexts = runs[evaluation]
                score = evaluate.api_scorer(server.base_url, server.model, server.api_key,
                                            max_new_tokens=cfg["eval.max_new_tokens"], concurrency=concurrency,
                                            timeout=cfg["eval.request_timeout"], retries=cfg["eval.retries"],
                                            contexts=contexts)
                out[evaluation] = run_cached(path, questions, score, batch_size=4 * concurrency, progress=progress,
                                             desc=f"{name}: {evaluation}", label=(name, evaluation))
    return {evaluation: out[evaluation] for evaluation in runs}


def position(value: str, known: tuple) -> tuple:
    """A sort key: ``value``'s place in ``known``; values not in it come after, alphabetically."""
    return (known.index(value), value) if value in known else (len(known), value)


def collect(cfg, questions) -> tuple[dict, list[dict]]:
    """Every evaluation the run recorded (``eval/index.json``, written by 06-08), as
    ``{(model, evaluation): rows}`` in series and model order, and the entries left out with the
    reason: a missing file, a model trained again since (its weights no longer match the file's
    fingerprint), or answers to other questions than ``questions`` (the eval split at this
    profile's ``eval.max_questions``; for the rotations, the first ``eval.rotation_questions``)."""
    index = cfg.out / "eval" / INDEX
    entries = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
    found = models.available(cfg)
    fingerprints, got, skipped = {}, {}, []
    everything = [q.id for q in questions]
    for entry in sorted(entries.values(), key=lambda e: (position(e["evaluation"], ORDER), position(e["model"], models.NAMES))):
        path, model = index.parent / entry["file"], entry["model"]
        why = None
        if not path.is_file():
            why = f"{entry['file']} is missing"
        elif model not in found:
            why = f"the {model} model is gone from {cfg.out / 'models'}"
        else:
            if model not in fingerprints:
                fingerprints[model] = models.answers_fingerprint(cfg, model)
            if not path.stem.endswith("-" + fingerprints[model]):
                why = f"the {model} model was trained again after {entry['file']} was written: rerun its evaluation"
        rotated = entry["evaluation"].startswith(ROTATIONS)
        wanted = everything[: cfg.get("eval.rotation_questions")] if rotated else everything
        if why is None:
            rows = read(path)
            if sorted(r["id"] for r in rows) != sorted(wanted):
                why = (f"{entry['file']} answers {len(rows)} questions, not the {len(wanted)} of this evaluation: "
                       "rerun its notebook")
            else:
                order = {qid: i for i, qid in enumerate(wanted)}
                got[model, entry["evaluation"]] = sorted(rows, key=lambda r: order[r["id"]])
        if why:
            skipped.append({"model": model, "evaluation": entry["evaluation"], "reason": why})
    return got, skipped
