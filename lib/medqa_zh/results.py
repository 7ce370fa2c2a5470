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

import pandas as pd
from tqdm.auto import tqdm

from . import dashboards, data, debias, evaluate, export, files, models, rag, runs, serve, steps

LETTER, GENERATE, ROTATIONS, API = "letter", "generate", "rotations", "api"
CALIBRATION = "calibration"  # rotations of the first eval.calibration_questions *validation* questions: PriDe's prior
PRIDE = "pride"              # a reading, not a file: letter scores debiased with the calibration's prior (debias)
IN_PROCESS = (LETTER, GENERATE, ROTATIONS, CALIBRATION)
INDEX = "index.json"
ROLES = ("eval", "replication")  # the question sets a run reports on: the eval split, and the optional replication set
# what each primary reading (eval.primary_reading) needs scored in-process
NEEDS = {LETTER: (LETTER,), PRIDE: (LETTER, CALIBRATION), "debiased": (ROTATIONS,), GENERATE: (GENERATE,)}


def through(evaluation: str, backend: str) -> str:
    """The name of the API evaluation through another server than the profile's ``serve.backend``:
    ``api@llamacpp-q8_0`` (07 asks the GGUF through llama.cpp's server too)."""
    return f"{evaluation}@{backend}"


def with_passages(evaluation: str, retriever: str) -> str:
    """The name of ``evaluation`` (``api``, ``rotations``) run with ``retriever``'s passages: ``api+rag bm25``."""
    return f"{evaluation}+rag {retriever}"


# every evaluation a run can record, and the readings the report derives, in the order of the series
# (the report's row order)
ORDER = (LETTER, PRIDE, ROTATIONS, GENERATE, API, *(with_passages(API, r) for r in rag.RETRIEVERS),
         *(with_passages(e, r) for e in (LETTER, PRIDE, ROTATIONS) for r in rag.RETRIEVERS), CALIBRATION,
         *(with_passages(CALIBRATION, r) for r in rag.RETRIEVERS))


def questions_for(cfg, evaluation: str, questions):
    """The questions ``evaluation`` answers, given the eval questions of the run (``questions``, the
    first ``eval.max_questions``): the first ``eval.generate_questions`` of them for generated
    answers (06's generate, 07 and 08's API), the first ``eval.rotation_questions`` for every rotation,
    all of them for letter scores, and the first ``eval.calibration_questions`` of the *validation*
    split for PriDe's calibration (never eval questions)."""
    kind = evaluation.split("+")[0].split("@")[0]
    if kind == CALIBRATION:
        return data.load_split(cfg, "validation")[: cfg["eval.calibration_questions"]]
    if kind == ROTATIONS:
        return questions[: cfg["eval.rotation_questions"]]
    if kind in (GENERATE, API):
        return questions[: cfg["eval.generate_questions"]]
    return questions


def folder(cfg, role: str = "eval") -> Path:
    """Where a question set's answers and their ``index.json`` live: ``outputs/<profile>/eval/`` for the eval
    split, ``outputs/<profile>/eval/replication/`` for the replication set (``data.splits.replication``)."""
    if role not in ROLES:
        raise ValueError(f"unknown question set {role!r}: choose from {', '.join(ROLES)}")
    return cfg.out / "eval" if role == "eval" else cfg.out / "eval" / role


def path_for(cfg, name: str, evaluation: str, fingerprint: str, kind: str = "direct", role: str = "eval") -> Path:
    """``outputs/<profile>/eval/<kind>/<model>-<evaluation>[-t<max_new_tokens>]-<fingerprint>.jsonl``
    (under ``eval/replication/`` for the replication set); generated answers carry ``eval.max_new_tokens``
    in the name, since they depend on it."""
    settings = f"-t{cfg['eval.max_new_tokens']}" if evaluation == GENERATE or evaluation.startswith(API) else ""
    return folder(cfg, role) / kind / f"{name}-{evaluation}{settings}-{fingerprint}.jsonl"


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
               progress: bool = True, role: str = "eval") -> dict[str, list[dict]]:
    """One model's in-process evaluations, each read from its cache and computed where questions
    are missing; the model is loaded once, only if something is missing, and freed at the end.

    ``evaluations``: any of ``letter`` and ``generate`` (06; ``eval.batch_size``,
    ``eval.max_new_tokens``), ``rotations`` and ``calibration`` (06, section 5), each on the questions
    :func:`questions_for` gives it. ``passages``: ``{retriever: (tag, contexts)}``
    (:meth:`rag.Retrieval.tag`, ``contexts`` for the eval and the calibration questions): those of
    ``evaluations`` among letter scores, calibration and rotations again with that retriever's passages
    in the prompt (08), evaluations ``letter+rag <retriever>`` and so on. ``role``: ``replication`` when ``questions`` are
    the replication set (its files and index under :func:`folder`). Returns evaluation name -> rows, in
    the order of its questions."""
    unknown = set(evaluations) - set(IN_PROCESS)
    if unknown:
        raise ValueError(f"unknown in-process evaluation {', '.join(sorted(unknown))} (choose from {', '.join(IN_PROCESS)})")
    fp = models.answers_fingerprint(cfg, name)
    loaded = []

    def model():
        if not loaded:
            loaded.append(models.load_for_eval(cfg, name))
        return loaded[0]

    runs = {e: (path_for(cfg, name, e, fp, role=role), questions_for(cfg, e, questions), e, None) for e in evaluations}
    for retriever, (tag, contexts) in (passages or {}).items():
        for e in (LETTER, CALIBRATION, ROTATIONS):
            if e in evaluations:
                runs[with_passages(e, retriever)] = (path_for(cfg, name, f"{e}-{tag}", fp, kind="rag", role=role),
                                                     questions_for(cfg, e, questions), e, contexts)
    try:
        return {evaluation: run_cached(path, qs, scorer(cfg, model, kind, contexts), batch_size=cfg["eval.batch_size"],
                                       progress=progress, desc=f"{name}: {evaluation}", label=(name, evaluation))
                for evaluation, (path, qs, kind, contexts) in runs.items()}
    finally:
        loaded.clear()
        models.free_memory()  # before the next model loads (GPU memory too)


def replicate(cfg, names, reading: str, passages=None, progress: bool = True) -> tuple[dict, str | None]:
    """The models ``names`` scored on the replication set (``data.splits.replication``, 01's file) in the
    pre-registered ``reading`` (``eval.primary_reading``: what :data:`NEEDS` says it takes), cached apart from
    the eval split's answers (:func:`folder`). ``passages``: ``passages(name, questions) -> {retriever: (tag,
    contexts)}`` for the readings with passages (08). Returns ``({(model, evaluation): rows}, None)``, or
    ``({}, why)`` when there is nothing to score: no replication set, or a reading this profile does not make."""
    questions, why = data.replication_questions(cfg)
    if why:
        return {}, why
    if reading not in NEEDS:
        raise ValueError(f"eval.primary_reading: {reading!r} is none of {', '.join(NEEDS)}; fix it in the profile")
    for evaluation, name in ((ROTATIONS, "rotations"), (CALIBRATION, "rotations"), (GENERATE, "generate")):
        if evaluation in NEEDS[reading] and (why := steps.off(cfg, name)):
            return {}, f"{why}, so this run has no {reading} reading to replicate"
    got = {}
    for name in names:
        more = passages(name, questions) if passages else None
        for evaluation, rows in in_process(cfg, name, questions, NEEDS[reading], passages=more, progress=progress,
                                           role="replication").items():
            got[name, evaluation] = rows
    return got, None


def gguf_cached(cfg, name: str, quantization: str, questions, progress: bool = True) -> dict[str, list[dict]]:
    """A model's GGUF (04's export, ``quantization``) scored through llama.cpp in this process: letter scores on
    the eval questions and PriDe's calibration on the validation ones (:func:`questions_for`), cached and resumed
    as :func:`in_process` caches a model's (``eval/gguf/<model>-<quantization>-<evaluation>-<fingerprint>.jsonl``,
    the fingerprint the model's own). The file is loaded only if something is missing. Returns
    ``{"letter": rows, "calibration": rows}``."""
    fp = models.answers_fingerprint(cfg, name)
    file = export.gguf_path(export.folder(cfg), name, quantization)
    loaded = []

    def score_with(kind):
        def score(batch):
            if not loaded:
                loaded.append((export.load(file, cfg["gguf.n_ctx"], cfg["gguf.extra_buffers"]),
                               models.load_tokenizer(models.available(cfg)[name], setting=name)))
            llm, tokenizer = loaded[0]
            return (export.letter_scores if kind == LETTER else export.rotation_scores)(llm, tokenizer, batch,
                                                                                      progress=False)
        return score

    try:
        return {e: run_cached(path_for(cfg, f"{name}-{quantization}", e, fp, kind="gguf"), questions_for(cfg, e, questions),
                              score_with(e), batch_size=cfg["eval.batch_size"], progress=progress,
                              desc=f"{name} {quantization}: {e}")
                for e in (LETTER, CALIBRATION)}
    finally:
        loaded.clear()


def scorer(cfg, model, evaluation: str, contexts: dict | None = None):
    """``score(batch) -> rows`` for one in-process evaluation (``letter``, ``generate``, ``rotations``
    or ``calibration``) of ``model()`` (called when a batch needs it: ``(model, tokenizer)``)."""
    batch_size = cfg["eval.batch_size"]

    def score(batch):
        m, tokenizer = model()
        if evaluation == LETTER:
            return evaluate.letter_scores(m, tokenizer, batch, batch_size, progress=False, contexts=contexts)
        if evaluation == GENERATE:
            return evaluate.generate_answers(m, tokenizer, batch, cfg["eval.max_new_tokens"], batch_size, progress=False)
        return debias.rotation_scores(m, tokenizer, batch, progress=False, contexts=contexts)
    return score


def checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, folder) of each LoRA checkpoint a run kept (``checkpoints/checkpoint-N`` with its
    adapter weights), by step."""
    found = []
    for folder in (Path(run_dir) / "checkpoints").glob("checkpoint-*"):
        if folder.name[11:].isdigit() and (folder / models.WEIGHTS["lora"]).is_file():
            found.append((int(folder.name[11:]), folder))
    return sorted(found)


CURVE_TABLE = "02_learning_curve.csv"  # learning_curve's table, as 02 writes it (10 reads it back)


def learning_curve(cfg, progress: bool = True) -> pd.DataFrame:
    """Debiased accuracy on the validation split at the start of LoRA training (the base model,
    step 0), at each checkpoint the run kept, and at its end: does accuracy still rise at the last
    step? Per point: PriDe's prior from the rotations of the first ``eval.calibration_questions``
    validation questions, then the single-pass debiased reading of the first ``train.curve_questions``
    (their letter scores; a calibration question's is its rotation 0). Validation, not eval: a curve
    is read to choose how long to train. Cached per point under ``eval/curve/`` (resumable), keyed
    by the checkpoint's weights. One row per point: step, n, plain and PriDe accuracy with intervals, and
    PriDe's paired difference from step 0 with its 95% interval and exact McNemar p (``pride_diff_vs_base``,
    ``_low``, ``_high``, ``pride_p_vs_base``): the run's validation evidence that 10's verdict reads."""
    run_dir = models.folder(cfg, "lora")
    wanted = cfg["train.curve_questions"]
    if not wanted:
        return pd.DataFrame()
    validation = data.load_split(cfg, "validation")[:wanted]
    calibration = questions_for(cfg, CALIBRATION, validation)
    points = [(0, None)] + checkpoints(run_dir)
    if "lora" in models.available(cfg):  # the finished adapter, unless a checkpoint holds its last step
        last = runs.read_run(run_dir)["optimizer_steps"]
        if last not in {step for step, _ in points}:
            points.append((last, run_dir))
    dtype, device, origin = models.eval_dtype(cfg), models.eval_device(cfg), models.setting_origin(cfg)
    rows = []
    for step, folder in points:
        name = "base" if folder is None else "lora"
        fp = models.answers_fingerprint(cfg, name, folder)
        loaded = []

        def model(folder=folder, loaded=loaded):
            if not loaded:  # merged in memory: the same function as base + adapter (04), half the time on a CPU
                m = models.load_model(cfg.base_model, dtype, setting=origin, device=device)
                if folder is not None:
                    m = models.load_adapter(m, folder, cfg.base_model).merge_and_unload()
                loaded.append((m, models.load_tokenizer(cfg.base_model, setting=origin)))
            return loaded[0]

        where = lambda e, fp=fp, step=step: cfg.out / "eval" / "curve" / f"lora-step{step}-{e}-{fp}.jsonl"  # noqa: E731
        try:
            rotated = run_cached(where(CALIBRATION), calibration, scorer(cfg, model, CALIBRATION),
                                 batch_size=cfg["eval.batch_size"], progress=progress, desc=f"step {step}: calibration")
            done = {r["id"] for r in rotated}
            letters = run_cached(where(LETTER), [q for q in validation if q.id not in done], scorer(cfg, model, LETTER),
                                 batch_size=cfg["eval.batch_size"], progress=progress, desc=f"step {step}: letter")
        finally:
            loaded.clear()
            models.free_memory()
        first = {r["id"]: {"id": r["id"], "gold": r["gold"], "logprobs": r["logprobs"][0]} for r in rotated}
        by_id = {r["id"]: r for r in letters}
        scored = [first.get(q.id) or by_id[q.id] for q in validation]  # one plain pass per question
        plain = evaluate.accuracy([{"id": r["id"], "gold": r["gold"], "pred": max(r["logprobs"], key=r["logprobs"].get)}
                                   for r in scored])
        chosen = debias.pride_results(scored, debias.estimate_prior(rotated))
        if folder is None:  # the first point: the base model, which every later point is paired with
            base_chosen = chosen
        pride = evaluate.accuracy(chosen)
        against = evaluate.mcnemar(base_chosen, chosen)  # paired, on the same validation questions (step 0: itself)
        rows.append({"step": step, "checkpoint": "base" if folder is None else ("final" if folder == run_dir else folder.name), "n": pride["n"],
                     "calibration_n": len(rotated), "plain": plain["accuracy"], "plain_ci_low": plain["ci_low"],
                     "plain_ci_high": plain["ci_high"], "pride": pride["accuracy"], "pride_ci_low": pride["ci_low"],
                     "pride_ci_high": pride["ci_high"], "pride_diff_vs_base": against["difference"],
                     "pride_diff_vs_base_low": against["diff_ci_low"], "pride_diff_vs_base_high": against["diff_ci_high"],
                     "pride_p_vs_base": against["p_value"]})
    curve = pd.DataFrame(rows)
    key = runs.read_run_key(run_dir)
    if key:  # train.report_to's dashboards show the curve beside the run's losses
        dashboards.watch(cfg, run_dir).curve(key, curve)
    return curve


def api_cached(cfg, name: str, questions, passages: dict | None = None, progress: bool = True,
               backend: str | None = None) -> dict[str, list[dict]]:
    """One model's answers through the HTTP API (07), and with each retriever's passages in the
    prompt (08; ``passages``: ``{retriever: (tag, contexts)}``). The model is served once, with the
    profile's ``serve`` settings, for whatever is not yet complete in its cache, and stopped; when
    everything is cached no server starts. ``backend``: another server than ``serve.backend``
    (``llamacpp``: the model's ``gguf.serve`` file); its evaluation is then named :func:`through` it.
    Returns ``{"api": rows, "api+rag <retriever>": rows, ...}``."""
    tag = serve.backend_tag(cfg, backend)  # vLLM, transformers and each GGUF answer a little differently: cached apart
    api = API if backend is None else through(API, tag)
    fp = models.answers_fingerprint(cfg, name)
    runs = {api: (path_for(cfg, name, f"{API}-{tag}", fp, kind="api"), None)}
    for retriever, (rtag, contexts) in (passages or {}).items():
        runs[with_passages(api, retriever)] = (path_for(cfg, name, f"{API}-{tag}-{rtag}", fp, kind="rag"), contexts)
    questions = questions_for(cfg, API, questions)  # generated answers: the first eval.generate_questions
    out = {evaluation: run_cached(path, questions, score_batch=lambda batch: [], progress=False, label=(name, evaluation))
           for evaluation, (path, _) in runs.items() if _complete(path, questions)}
    todo = [evaluation for evaluation in runs if evaluation not in out]
    if todo:
        concurrency = cfg["eval.concurrency"]
        with serve.from_profile(cfg, models.available(cfg)[name], served_name=name,
                                **({"backend": backend} if backend else {})) as server:
            for evaluation in todo:
                path, contexts = runs[evaluation]
                score = evaluate.api_scorer(server.base_url, server.model, server.api_key,
                                            max_new_tokens=cfg["eval.max_new_tokens"], concurrency=concurrency,
                                            timeout=cfg["eval.request_timeout"], retries=cfg["eval.retries"],
                                            contexts=contexts)
                out[evaluation] = run_cached(path, questions, score, batch_size=4 * concurrency, progress=progress,
                                             desc=f"{name}: {evaluation}", label=(name, evaluation))
    return {evaluation.replace(api, API, 1): out[evaluation] for evaluation in runs}


def position(value: str, known: tuple) -> tuple:
    """A sort key: ``value``'s place in ``known``; values not in it come after, alphabetically."""
    return (known.index(value), value) if value in known else (len(known), value)


def collect(cfg, questions, role: str = "eval") -> tuple[dict, list[dict]]:
    """Every evaluation the run recorded (``eval/index.json``, written by 06-08), as
    ``{(model, evaluation): rows}`` in series and model order, and the entries left out with the
    reason: a missing file, a model gone or whose step the profile turns off (``grpo.max_steps: 0``), a model
    trained again since (its weights no longer match the file's fingerprint), an evaluation the profile turns off
    (:func:`steps.evaluation_off`), or answers to other questions than :func:`questions_for` gives the evaluation
    (``questions``: the eval split at this profile's ``eval.max_questions``; with ``role``
    ``replication``, the replication set, whose answers 06 and 08 keep apart)."""
    index = folder(cfg, role) / INDEX
    entries = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
    found = models.available(cfg)
    fingerprints, got, skipped, wanted_ids = {}, {}, [], {}
    for entry in sorted(entries.values(), key=lambda e: (position(e["evaluation"], ORDER), position(e["model"], models.NAMES))):
        path, model = index.parent / entry["file"], entry["model"]
        why = steps.evaluation_off(cfg, entry["evaluation"])
        if why:
            why = f"an earlier run's answers: this profile turns the evaluation off ({why})"
        elif not path.is_file():
            why = f"{entry['file']} is missing"
        elif model not in found:  # a model whose step is off (grpo.max_steps: 0) may still be there: not this run's
            why = (f"an earlier run's {model} model: this profile turns its step off ({off})"
                   if model in steps.STEPS and (off := steps.off(cfg, model)) else
                   f"the {model} model is gone from {cfg.out / 'models'}")
        else:
            if model not in fingerprints:
                fingerprints[model] = models.answers_fingerprint(cfg, model)
            if not path.stem.endswith("-" + fingerprints[model]):
                why = f"the {model} model was trained again after {entry['file']} was written: rerun its evaluation"
        if entry["evaluation"] not in wanted_ids:
            wanted_ids[entry["evaluation"]] = [q.id for q in questions_for(cfg, entry["evaluation"], questions)]
        wanted = wanted_ids[entry["evaluation"]]
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
