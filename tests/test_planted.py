"""planted: each effect of the smoke world measured from small synthetic answers (no model). Each check finds its
effect where the answers show it, and says "not found" where its lesson is broken (a merged model no better than
base, passages that add nothing, a base without a letter prior) and "not measured" where the answers are missing."""
import math

import pandas as pd
import pytest

from medqa_zh import debias, planted, results, tiny

LETTERS = "ABCDE"
UNIFORM = dict.fromkeys(LETTERS, 0.2)
SKEWED = {"A": 0.1, "B": 0.1, "C": 0.6, "D": 0.1, "E": 0.1}  # tiny.LETTER_SKEW's letter, in its share
RAG = results.with_passages(results.ROTATIONS, "bm25")


def _record(groups: dict[str, int]) -> dict:
    """A planted record (the keys planted reads) with ``groups[g]`` test questions of each group, in that order;
    the gold letters cycle A..E over all of them."""
    questions, line = {}, 0
    for group, n in groups.items():
        for _ in range(n):
            line += 1
            passage = None if group == "unknown" else {"book": "合成内科学", "sentence": f"事实{line}。"}
            questions[f"test:{line}"] = {"group": group, "kind": "drug", "disease": f"虚拟{line}病", "passage": passage}
    return {"letters": LETTERS, "chance": 0.2, "letter_skew": dict(tiny.LETTER_SKEW),
            "thresholds": dict(tiny.THRESHOLDS), "questions": questions}


def _gold(qid: str) -> str:
    return LETTERS[(int(qid.split(":")[1]) - 1) % 5]


def _rotation_row(qid: str, gold: str, pick: str, prior: dict, strength: float = 3.0) -> dict:
    """A model's scores under every rotation (debias's layout): a position prior (letter -> probability) plus
    ``strength`` for the content that sits under ``pick`` in rotation 0, so its debiased choice is ``pick``."""
    j_pick = LETTERS.index(pick)
    logprobs = []
    for r in range(5):  # rotation r puts content j under letter (j + r) % 5
        under = {LETTERS[(j + r) % 5]: j for j in range(5)}
        logprobs.append({letter: math.log(prior[letter]) + (strength if j == j_pick else 0.0)
                         for letter, j in sorted(under.items())})
    return {"id": qid, "gold": gold, "letters": LETTERS, "logprobs": logprobs}


def _model(record: dict, knows=(), prior=UNIFORM, sure: float = 3.0, unsure: float | None = None) -> list[dict]:
    """Rotation rows on the record's questions: right (debiased) on every question of the groups in ``knows``, with
    ``sure`` for the right content; at chance elsewhere (right on every fifth question, the next letter's content
    otherwise), with ``unsure`` (default ``sure``) for the content it guesses."""
    rows = []
    for i, (qid, q) in enumerate(record["questions"].items()):
        gold = _gold(qid)
        known = q["group"] in knows
        pick = gold if known or i % 5 == 0 else LETTERS[(LETTERS.index(gold) + 1) % 5]
        rows.append(_rotation_row(qid, gold, pick, prior, sure if known or unsure is None else unsure))
    return rows


def _letter_rows(rotations: list[dict]) -> list[dict]:
    """The plain letter scores of the same model: rotation 0."""
    return [{"id": r["id"], "gold": r["gold"], "pred": max(r["logprobs"][0], key=r["logprobs"][0].get),
             "logprobs": r["logprobs"][0]} for r in rotations]


def _calibration(prior: dict, n: int = 10) -> list[dict]:
    """Validation questions scored under every rotation by a model that knows nothing of them: its prior only."""
    return [_rotation_row(f"dev:{i + 1}", "A", "A", prior, strength=0.0) for i in range(n)]


def _verdicts(found: pd.DataFrame) -> dict:
    return dict(zip(found["effect"], found["found"], strict=True))


WORLD = {"trained": 20, "passage": 20, "unknown": 10}


def _answers(record=None, merged_knows=("trained",), rag_knows=("trained", "passage"), base_prior=SKEWED,
             calibration_prior=None, base_knows=()) -> dict:
    """Raw answers as results.collect gives them: base guessing with a letter prior (it knows the groups in
    ``base_knows``), merged (without and with passages) right on the groups it knows, and base's letter scores and
    calibration. None for merged_knows / rag_knows: no such answers."""
    record = record or _record(WORLD)
    base = _model(record, knows=base_knows, prior=base_prior, unsure=0.001)
    answers = {("base", results.ROTATIONS): base, ("base", results.LETTER): _letter_rows(base),
               ("base", results.CALIBRATION): _calibration(calibration_prior or base_prior)}
    if merged_knows is not None:
        answers["merged", results.ROTATIONS] = _model(record, knows=merged_knows)
    if rag_knows is not None:
        answers["merged", RAG] = _model(record, knows=rag_knows)
    return answers


# --------------------------------------------------------------------------- groups and gains


def test_ids_and_only_keep_one_groups_questions():
    record = _record({"trained": 3, "passage": 2, "unknown": 1})
    assert planted.ids(record, "trained") == {"test:1", "test:2", "test:3"}
    assert planted.ids(record, "unknown") == {"test:6"} and planted.ids(record, "pretraining") == set()
    rows = [{"id": f"test:{i}", "gold": "A", "pred": "A"} for i in range(1, 7)]
    assert [r["id"] for r in planted.only(rows, planted.ids(record, "passage"))] == ["test:4", "test:5"]


def _read(answers: dict) -> dict:
    from medqa_zh import report

    return report.readings(answers)


def test_gain_finds_a_planted_difference_on_its_group_only():
    record = _record(WORLD)
    read = _read(_answers(record))
    sft = planted.gain(record, read, ("merged", "debiased"), ("base", "debiased"), "trained")
    # merged right on all 20 trained questions, base on every fifth: 16 discordant, all merged's
    assert (sft["n"], sft["b_only"], sft["a_only"]) == (20, 16, 0)
    assert sft["difference"] == pytest.approx(0.8) and sft["diff_ci_low"] > tiny.THRESHOLDS["sft_lower_bound"]
    assert sft["p_value"] < 0.001
    # merged is no better than base on the passage group: the trained group's gain does not leak in
    same = planted.gain(record, read, ("merged", "debiased"), ("base", "debiased"), "passage")
    assert (same["n"], same["b_only"], same["a_only"], same["difference"]) == (20, 0, 0, 0.0)
    assert same["diff_ci_low"] < 0 < same["diff_ci_high"]
    # the passages' gain is on the passage group, none on the trained one
    rag = planted.gain(record, read, ("merged", "debiased+rag bm25"), ("merged", "debiased"), "passage")
    assert rag["difference"] == pytest.approx(0.8)
    assert planted.gain(record, read, ("merged", "debiased+rag bm25"), ("merged", "debiased"),
                        "trained")["difference"] == 0.0


def test_gain_is_not_found_when_the_better_model_equals_the_worse_and_none_when_unmeasured():
    record = _record(WORLD)
    answers = _answers(record, merged_knows=())  # merged answers exactly as base does
    read = _read(answers)
    test = planted.gain(record, read, ("merged", "debiased"), ("base", "debiased"), "trained")
    assert test["difference"] == 0.0 and test["p_value"] == 1.0
    assert test["diff_ci_low"] < tiny.THRESHOLDS["sft_lower_bound"]
    assert planted.gain(record, read, ("grpo", "debiased"), ("base", "debiased"), "trained") is None
    assert planted.gain(record, read, ("merged", "debiased"), ("base", "debiased"), "pretraining") is None


# --------------------------------------------------------------------------- the letter skew


def test_letter_skew_reads_the_plain_and_debiased_shares_and_both_priors():
    """Base has a prior of 0.6 on C and is sure of the trained questions only: its plain letter scores answer C on
    every unknown question, its debiased answers follow the gold letters, and the prior is recovered both on the
    unknown group (every rotation) and by PriDe from the calibration."""
    record = _record({"trained": 10, "unknown": 10})
    skew = planted.letter_skew(record, _answers(record, merged_knows=None, rag_knows=None, base_knows=("trained",)))
    assert skew["letter"] == tiny.LETTER_SKEW["letter"] == "C"
    assert (skew["n"], skew["n_unknown"]) == (20, 10)
    assert skew["plain_share"] == pytest.approx(12 / 20)  # 2 trained questions whose gold is C, and the 10 unknown
    assert skew["gold_share"] == skew["debiased_share"] == skew["debiased_gold_share"] == pytest.approx(4 / 20)
    assert skew["true_prior"] == pytest.approx(0.6, abs=1e-3)
    assert skew["pride_prior"] == pytest.approx(0.6, abs=1e-9)


def test_letter_skew_of_a_base_without_a_prior_and_of_a_wrong_calibration():
    record = _record({"trained": 10, "unknown": 10})
    flat = planted.letter_skew(record, _answers(record, merged_knows=None, rag_knows=None, base_prior=UNIFORM,
                                                base_knows=("trained",)))
    assert flat["plain_share"] == flat["gold_share"] == pytest.approx(0.2)
    assert flat["true_prior"] == pytest.approx(0.2, abs=1e-3) and flat["pride_prior"] == pytest.approx(0.2)
    wrong = planted.letter_skew(record, _answers(record, merged_knows=None, rag_knows=None, calibration_prior=UNIFORM,
                                                 base_knows=("trained",)))
    assert wrong["true_prior"] == pytest.approx(0.6, abs=1e-3) and wrong["pride_prior"] == pytest.approx(0.2)


def test_letter_skew_is_none_without_each_of_its_three_evaluations():
    record = _record({"trained": 10, "unknown": 10})
    answers = _answers(record)
    for evaluation in (results.LETTER, results.ROTATIONS, results.CALIBRATION):
        assert planted.letter_skew(record, {k: v for k, v in answers.items() if k != ("base", evaluation)}) is None
    assert planted.letter_skew(record, answers, model="merged") is None  # merged has no letter scores here


# --------------------------------------------------------------------------- the table


SFT, RAG_EFFECT = "SFT teaches facts", "passages supply facts"
SKEW_ROWS = ("letter skew, plain reading", "letter skew removed, debiased reading", "PriDe estimates the prior")


def test_table_finds_every_planted_effect_where_the_answers_show_it():
    record = _record(WORLD)
    answers = _answers(record)
    found = planted.table(record, answers, replication=answers)
    assert list(found.columns) == planted.COLUMNS
    assert _verdicts(found) == {f"{SFT} (eval)": "found", f"{RAG_EFFECT} (eval)": "found",
                                f"{SFT} (replication)": "found", f"{RAG_EFFECT} (replication)": "found",
                                **dict.fromkeys(SKEW_ROWS, "found")}
    row = found.set_index("effect").loc[f"{SFT} (eval)"]
    assert (row["measured"], row["n"], row["kind"]) == (pytest.approx(0.8), 20, "difference")
    assert row["ci_low"] >= tiny.THRESHOLDS["sft_lower_bound"] and row["ci_high"] <= 1
    plain = found.set_index("effect").loc["letter skew, plain reading"]
    # base knows nothing: its plain letter scores answer C on all 50 questions, C is gold for 10
    assert (plain["measured"], plain["n"], plain["kind"]) == (1.0, 50, "share")
    assert plain["ci_low"] < 1.0 <= plain["ci_high"]
    debiased = found.set_index("effect").loc["letter skew removed, debiased reading"]
    assert debiased["measured"] == pytest.approx(0.2)


def test_table_says_not_found_where_a_lesson_is_broken():
    record = _record(WORLD)
    # merged identical to base; passages replaced by nothing (merged+rag answers as merged); base without a prior
    broken = _answers(record, merged_knows=(), rag_knows=(), base_prior=UNIFORM)
    verdicts = _verdicts(planted.table(record, broken, replication=broken))
    assert verdicts[f"{SFT} (eval)"] == verdicts[f"{SFT} (replication)"] == "not found"
    assert verdicts[f"{RAG_EFFECT} (eval)"] == verdicts[f"{RAG_EFFECT} (replication)"] == "not found"
    assert verdicts["letter skew, plain reading"] == "not found"
    # with no prior there is nothing to remove or estimate: those two still hold
    assert verdicts["letter skew removed, debiased reading"] == verdicts["PriDe estimates the prior"] == "found"
    # the passages help, but merged without them is already right: no gain to find
    no_gain = _verdicts(planted.table(record, _answers(record, merged_knows=("trained", "passage"))))
    assert no_gain[f"{RAG_EFFECT} (eval)"] == "not found" and no_gain[f"{SFT} (eval)"] == "found"


def test_table_says_not_found_where_debiasing_or_pride_misses_the_prior():
    record = _record(WORLD)
    answers = _answers(record, calibration_prior=UNIFORM)
    # a base whose debiased answers still favour the letter: it picks C's content on every known question
    unknown = planted.ids(record, "unknown")
    answers["base", results.ROTATIONS] = [r if r["id"] in unknown else _rotation_row(r["id"], r["gold"], "C", SKEWED)
                                          for r in answers["base", results.ROTATIONS]]
    skew = planted.letter_skew(record, answers)
    assert skew["debiased_share"] == pytest.approx(42 / 50) and skew["true_prior"] == pytest.approx(0.6, abs=1e-3)
    verdicts = _verdicts(planted.table(record, answers))
    assert verdicts["letter skew removed, debiased reading"] == "not found"
    assert verdicts["PriDe estimates the prior"] == "not found"  # calibrated at 0.2, true prior 0.6


def test_table_says_not_measured_where_answers_are_missing():
    record = _record(WORLD)
    answers = {k: v for k, v in _answers(record).items() if k[0] != "merged" and k[1] != results.CALIBRATION}
    found = planted.table(record, answers)  # no merged answers, no calibration, no replication
    verdicts = _verdicts(found)
    assert set(verdicts.values()) == {"not measured"}
    assert verdicts.keys() == {f"{SFT} (eval)", f"{RAG_EFFECT} (eval)", f"{SFT} (replication)",
                               f"{RAG_EFFECT} (replication)", "letter skew"}
    assert found["measured"].isna().all()


RECALL = pd.DataFrame([("bm25", 1, 0.55, 0.45, 0.65, 40), ("bm25", 3, 0.9, 0.77, 0.96, 40),
                       ("dense", 3, 0.1, 0.04, 0.23, 40)], columns=["retriever", "k", "recall", "ci_low", "ci_high", "n"])


@pytest.mark.parametrize(("top_k", "retriever", "verdict"), [(3, "bm25", "found"), (1, "bm25", "not found"),
                                                             (3, "dense", "not found"), (5, "bm25", "not measured")])
def test_table_reads_retrieval_recall_at_the_runs_top_k(top_k, retriever, verdict):
    record = _record(WORLD)
    found = planted.table(record, _answers(record), retrieval=RECALL, top_k=top_k, retriever=retriever)
    row = found.set_index("effect").loc["retrieval finds the gold passage"]
    assert row["found"] == verdict
    if verdict != "not measured":
        hit = RECALL[(RECALL["retriever"] == retriever) & (RECALL["k"] == top_k)].iloc[0]
        assert (row["measured"], row["ci_low"], row["ci_high"], row["n"]) == (hit["recall"], hit["ci_low"],
                                                                             hit["ci_high"], 40)
    # without a recall table (or a top k) there is no retrieval row at all
    assert "retrieval finds the gold passage" not in set(planted.table(record, _answers(record), top_k=3)["effect"])


def test_grpo_reward_reads_the_log_and_the_spread():
    log = [{"loss": 1.0, "step": 1}, {"reward": 0.25, "step": 1}, {"loss": 0.9}, {"reward": 0.5, "step": 2},
           {"reward": 0.75, "step": 3}]
    spread = pd.DataFrame({"prompt": range(4), "spread": [0.5, 0.0, 0.25, 0.5]})
    assert planted.grpo_reward(log, spread) == {"reward_first": 0.25, "reward_last": 0.75, "spread_share": 0.75,
                                                "steps": 3}
    assert math.isnan(planted.grpo_reward(log, None)["spread_share"])
    assert planted.grpo_reward([{"loss": 1.0}], spread) is None and planted.grpo_reward([], None) is None


@pytest.mark.parametrize(("rewards", "spread", "verdict"), [((0.25, 0.5, 0.75), [0.5, 0.0, 0.25, 0.5], "found"),
                                                            ((0.5, 0.4, 0.5), [0.5, 0.0, 0.25, 0.5], "not found"),
                                                            ((0.25, 0.5, 0.75), [0.5, 0.0, 0.0, 0.0], "not found")])
def test_table_reads_the_grpo_rise(rewards, spread, verdict):
    record = _record(WORLD)
    grpo = planted.grpo_reward([{"reward": r} for r in rewards], pd.DataFrame({"spread": spread}))
    found = planted.table(record, _answers(record), grpo=grpo)
    row = found.set_index("effect").loc["GRPO raises the reward"]
    assert row["found"] == verdict
    assert row["measured"] == pytest.approx(rewards[-1] - rewards[0]) and row["kind"] == "difference"
    assert "GRPO raises the reward" not in set(planted.table(record, _answers(record))["effect"])


# --------------------------------------------------------------------------- readable


def test_readable_signs_differences_and_not_shares():
    record = _record(WORLD)
    answers = _answers(record)
    found = planted.table(record, answers, grpo={"reward_first": 0.5, "reward_last": 0.25, "spread_share": 1.0})
    shown = planted.readable(found).set_index("effect")
    assert list(shown.columns) == ["planted", "threshold", "measured [95% CI]", "n", "found"]
    sft = found.set_index("effect").loc[f"{SFT} (eval)"]
    assert shown.loc[f"{SFT} (eval)", "measured [95% CI]"] == f"+0.80 [{sft['ci_low']:.2f}, {sft['ci_high']:.2f}]"
    assert shown.loc[f"{SFT} (replication)", "measured [95% CI]"] == "—"  # not measured
    plain = found.set_index("effect").loc["letter skew, plain reading"]
    assert shown.loc["letter skew, plain reading", "measured [95% CI]"] == \
        f"1.00 [{plain['ci_low']:.2f}, 1.00]"
    assert shown.loc["PriDe estimates the prior", "measured [95% CI]"] == "0.60"  # a share with no interval
    assert shown.loc["GRPO raises the reward", "measured [95% CI]"] == "-0.25"  # a difference, no interval
    assert shown.loc["GRPO raises the reward", "found"] == "not found"


def test_the_synthetic_rows_read_as_debias_reads_them():
    """The rows these tests build are what they claim: the debiased choice is the picked content, the prior is the
    given one (so a broken helper cannot make the tests above pass for the wrong reason)."""
    row = _rotation_row("test:1", "B", "D", SKEWED)
    assert debias.debiased_choice(row) == "D"
    assert debias.per_rotation(row)[0][0] == "D"  # sure enough (+3) to beat the prior in rotation 0
    unsure = _rotation_row("test:1", "B", "D", SKEWED, strength=0.001)
    assert debias.debiased_choice(unsure) == "D" and debias.per_rotation(unsure)[0][0] == "C"
    assert debias.letter_prior([_rotation_row("test:1", "B", "D", SKEWED, 0.0)])["C"] == pytest.approx(0.6)
    assert debias.estimate_prior(_calibration(SKEWED))["C"] == pytest.approx(0.6)


# --------------------------------------------------------------------------- three worlds, not one


EFFECTS_THE_TINY_MODEL_SHOWS = ("letter skew, plain reading", "letter skew removed, debiased reading",
                                "PriDe estimates the prior", "retrieval finds the gold passage")


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_world_the_asset_build_makes_shows_its_planted_letter_skew_and_gold_passages(seed, project):
    """Not tuned to one world: the smoke world built on three asset seeds, the base model scored as 06 scores it (letter
    scores, every rotation, PriDe's calibration) and BM25 ranked as 08 ranks it, and each effect the tiny model shows
    is found on each world with the thresholds the world fixed before (``planted.json``). What the tiny model does not
    learn (the trained facts, reading the passages) is not among them: 10's table reports it as not found."""
    from medqa_zh import config, data, evaluate, models, rag

    cfg = config.setup("smoke", {"seed": seed})  # builds this seed's assets in the throwaway project
    data.ensure_splits(cfg)
    world = planted.read(cfg)
    assert world["seed"] == seed
    questions = data.eval_questions(cfg)
    model, tokenizer = models.load_for_eval(cfg, "base")
    calibration = data.load_split(cfg, "validation")[: cfg["eval.calibration_questions"]]
    answers = {("base", results.LETTER): evaluate.letter_scores(model, tokenizer, questions, progress=False),
               ("base", results.ROTATIONS): debias.rotation_scores(model, tokenizer, questions, progress=False),
               ("base", results.CALIBRATION): debias.rotation_scores(model, tokenizer, calibration, progress=False)}
    retrieval = rag.Retrieval.from_profile(cfg, progress=False)
    top_k = cfg["rag.top_k"]
    ranked = [[i for i, _ in hits] for hits in retrieval.bm25.search([rag.query_text(q.question, q.options)
                                                                      for q in questions], top_k)]
    gold = {qid: q["passage"]["sentence"] for qid, q in world["questions"].items() if q["passage"]}
    recall = rag.gold_recall(questions, {"bm25": ranked}, retrieval.corpus.passages, gold, ks=(top_k,))
    found = planted.table(world, answers, retrieval=recall, top_k=top_k).set_index("effect")
    for effect in EFFECTS_THE_TINY_MODEL_SHOWS:
        assert found.at[effect, "found"] == "found", (seed, effect, found.loc[effect].to_dict())
