"""Permutation evaluation: rotations keep answers straight, the shared prefix changes no score, and
a planted letter bias moves plain accuracy but not the debiased one."""
import math

import pytest

from medqa_zh import data, debias, evaluate, models


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    questions, _ = data.read_questions(tiny_assets["medqa"] / "questions" / "Mainland" / "test.jsonl")
    model = models.load_model(str(tiny_assets["model"]), "float32")
    return model, models.load_tokenizer(str(tiny_assets["model"])), questions[:12]


def test_rotations_keep_the_answer_text_under_the_gold_letter(tiny):
    *_, questions = tiny
    q = questions[0]
    k = len(q.options)
    rotated = [debias.rotate(q, r) for r in range(k)]
    for r in rotated:
        assert r.options[r.answer_idx] == q.answer == q.options[q.answer_idx]
        assert sorted(r.options.values()) == sorted(q.options.values()) and r.question == q.question
    for letter in q.options:  # every content under every letter once
        assert sorted(r.options[letter] for r in rotated) == sorted(q.options.values())
    assert debias.rotate(q, k) == q and debias.rotate(q, 0) == q
    letters = sorted(q.options)
    assert [r.answer_idx for r in rotated] == [letters[(letters.index(q.answer_idx) + i) % k] for i in range(k)]


def test_the_shared_prefix_changes_no_score(tiny):
    model, tokenizer, questions = tiny
    assert debias._split_prompt(tokenizer, questions[0]) is not None  # the prefix really is shared here
    shared = debias.rotation_scores(model, tokenizer, questions, share_prefix=True, progress=False)
    whole = debias.rotation_scores(model, tokenizer, questions, share_prefix=False, progress=False)
    plain = evaluate.letter_scores(model, tokenizer, questions, batch_size=5, progress=False)
    for s, w, p in zip(shared, whole, plain, strict=True):
        assert s["id"] == w["id"] == p["id"] and s["gold"] == p["gold"] and len(s["logprobs"]) == len(s["letters"])
        for a, b in zip(s["logprobs"], w["logprobs"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)
        assert s["logprobs"][0] == pytest.approx(p["logprobs"], abs=1e-4)  # rotation 0 is today's letter scoring


def test_passages_join_the_shared_prefix_and_change_no_score_there(tiny):
    """08's debiased view with passages: the same scores whole or with the prefix shared, the
    passages in every rotation's prompt, and recorded by id."""
    from types import SimpleNamespace

    from medqa_zh import prompts

    model, tokenizer, questions = tiny
    qs = questions[:4]
    passage = lambda i: SimpleNamespace(id=f"内科学:{i}:0", book="内科学", text=f"第{i}段：甲状腺功能亢进症的表现。")  # noqa: E731
    contexts = {q.id: [passage(i), passage(i + 1)] for i, q in enumerate(qs)}
    prefix, _ = debias._split_prompt(tokenizer, qs[0], evaluate.context_of(contexts, qs[0].id))
    assert "甲状腺功能亢进症" in tokenizer.decode(prefix)  # the passages run once, before the options
    shared = debias.rotation_scores(model, tokenizer, qs, progress=False, contexts=contexts)
    whole = debias.rotation_scores(model, tokenizer, qs, share_prefix=False, progress=False, contexts=contexts)
    without = debias.rotation_scores(model, tokenizer, qs, progress=False)
    plain = evaluate.letter_scores(model, tokenizer, qs, progress=False, contexts=contexts)
    for s, w, n, p, q in zip(shared, whole, without, plain, qs, strict=True):
        assert s["passages"] == w["passages"] == [x.id for x in contexts[q.id]] and "passages" not in n
        for a, b in zip(s["logprobs"], w["logprobs"], strict=True):
            assert a == pytest.approx(b, abs=1e-4)
        assert s["logprobs"][0] == pytest.approx(p["logprobs"], abs=1e-4)
    assert any(s["logprobs"][0] != pytest.approx(n["logprobs"][0], abs=1e-3) for s, n in zip(shared, without, strict=True))
    text = prompts.answer_prompt(tokenizer, qs[0].question, qs[0].options, evaluate.context_of(contexts, qs[0].id))
    assert text.index("甲状腺功能亢进症") < text.index(prompts.format_options(qs[0].options))


def test_each_reading_can_be_tested_against_its_own_reference(tiny):
    model, tokenizer, questions = tiny
    got = debias.rotation_scores(model, tokenizer, questions, progress=False)
    flipped = [{**r, "logprobs": r["logprobs"][::-1]} for r in got]
    t = debias.table({"a · no RAG": got, "a · bm25": flipped, "b · no RAG": got}, {"a · bm25": "a · no RAG"})
    p = dict(zip(t["model"], t["debiased_p_vs_base"], strict=True))
    assert math.isnan(p["a · no RAG"]) and math.isnan(p["b · no RAG"]) and 0 <= p["a · bm25"] <= 1
    t = debias.table({"base": got, "other": flipped})  # the default: everything against "base"
    assert math.isnan(t["debiased_p_vs_base"][0]) and 0 <= t["debiased_p_vs_base"][1] <= 1


def test_a_planted_letter_bias_moves_plain_accuracy_but_not_the_debiased_one(tiny):
    model, tokenizer, questions = tiny
    before = debias.rotation_scores(model, tokenizer, questions, progress=False)
    plain_before = [r["pred"] for r in debias.results(before, "plain")]
    favoured = "C" if plain_before.count("C") < len(questions) else "D"
    token = evaluate.letter_token_ids(tokenizer, favoured)[favoured]

    def bias(module, args, output):
        output[..., token] += 8.0  # the model now loves one letter, whatever the question
        return output

    hook = model.get_output_embeddings().register_forward_hook(bias)
    try:
        after = debias.rotation_scores(model, tokenizer, questions, progress=False)
    finally:
        hook.remove()
    plain_after = [r["pred"] for r in debias.results(after, "plain")]
    assert plain_after == [favoured] * len(questions) != plain_before
    assert [r["pred"] for r in debias.results(after, "debiased")] == [r["pred"] for r in debias.results(before, "debiased")]
    assert debias.letter_prior(after)[favoured] > 0.9 > debias.letter_prior(before)[favoured]


def _row(prior, knowledge, gold="B"):
    """Scores of a model whose log-probability is a position prior plus what it knows of each content."""
    letters = "ABCDE"
    k = len(letters)
    rows = []
    for r in range(k):  # content j sits under letter (j + r) % k
        rows.append({letters[(j + r) % k]: prior[(j + r) % k] + knowledge[j] for j in range(k)})
    return {"id": "q", "gold": gold, "letters": letters, "logprobs": rows}


def test_summary_separates_prior_from_knowledge():
    prior = [3.0, 0.0, 0.0, 0.0, 0.0]           # loves A
    knows = [0.0, 1.0, 0.0, 0.0, 0.0]           # but knows the answer is the content in B
    rows = [{**_row(prior, knows), "id": f"q{i}"} for i in range(4)]
    s = debias.summary(rows)
    assert s["plain"] == 0.0 and s["debiased"] == 1.0  # A wins every plain reading; knowledge wins debiased
    assert s["rotation_max"] == 1.0 and s["rotation_min"] == 0.0  # right only when B's content sits under A
    assert s["consistency"] == 0.0 and s["n"] == 4 and s["rotations"] == 5
    assert s["debiased_ci_low"] < 1.0 and s["plain_ci_high"] > 0.0
    prior_by_letter = debias.letter_prior(rows)
    assert prior_by_letter.idxmax() == "A" and math.isclose(prior_by_letter.sum(), 1.0)
    knows_only = [{**_row([0.0] * 5, knows), "id": f"q{i}"} for i in range(3)]
    assert debias.summary(knows_only)["consistency"] == 1.0


def test_results_feed_the_usual_metrics_and_refuse_a_bad_method():
    rows = [{**_row([0.0] * 5, [0.0, 2.0, 0.0, 0.0, 0.0]), "id": f"q{i}"} for i in range(3)]
    assert evaluate.accuracy(debias.results(rows, "debiased"))["correct"] == 3
    with pytest.raises(ValueError, match="plain or debiased"):
        debias.results(rows, "median")
    with pytest.raises(ValueError, match="no questions"):
        debias.summary([])


def test_the_per_model_table_tests_debiased_answers_against_base_and_the_figure_draws_both():
    import matplotlib

    from medqa_zh import report

    matplotlib.use("Agg")
    biased = [{**_row([3.0, 0, 0, 0, 0], [0.0, 1.0, 0, 0, 0]), "id": f"q{i}"} for i in range(6)]
    knows = [{**_row([0.0] * 5, [0.0, 1.0, 0, 0, 0]), "id": f"q{i}"} for i in range(6)]
    table = debias.table({"base": biased, "lora": knows})
    assert list(table["model"]) == ["base", "lora"] and math.isnan(table.loc[0, "debiased_p_vs_base"])
    assert table.loc[1, "debiased_p_vs_base"] == 1.0  # both debias to the right answer: no discordant pair
    assert table.loc[0, "plain"] == 0.0 and table.loc[1, "plain"] == 1.0
    priors = debias.prior_table({"base": biased, "lora": knows})
    assert list(priors.index) == list("ABCDE") and priors.loc["B", "gold"] == 1.0
    assert priors.loc["A", "base prior"] > 0.5 and priors.loc["A", "base predicted"] == 1.0
    assert priors.loc["A", "lora prior"] == pytest.approx(0.2)  # no preference: every letter 1/5
    fig = report.plot_debiased(table, priors)
    assert [ax.get_title() for ax in fig.axes] == ["plain vs debiased accuracy", "letter prior (all rotations)"]


# --------------------------------------------------------------------------- PriDe: the prior from a sample, one pass for the rest


def _letter_row(row: dict) -> dict:
    """The single plain pass of a rotation row (its rotation 0), as evaluate.letter_scores writes it."""
    scores = row["logprobs"][0]
    return {"id": row["id"], "gold": row["gold"], "pred": max(scores, key=scores.get), "logprobs": scores}


def _knowledge(rng, k=5):
    return [rng.gauss(0.0, 1.5) for _ in range(k)]


def test_the_prior_estimate_recovers_a_planted_letter_prior():
    """A model whose scores are a position prior plus what it knows of each content: the estimate
    is the planted prior, whatever the contents, and needs no gold answers."""
    import random

    rng = random.Random(0)
    planted = [0.40, 0.25, 0.15, 0.12, 0.08]
    log_prior = [math.log(p) for p in planted]
    rows = [{**_row(log_prior, _knowledge(rng), gold="ABCDE"[i % 5]), "id": f"q{i}"} for i in range(30)]
    estimate = debias.estimate_prior(rows)
    assert list(estimate) == list("ABCDE") and math.isclose(sum(estimate.values()), 1.0)
    assert [estimate[letter] for letter in "ABCDE"] == pytest.approx(planted, abs=1e-9)
    wrong_gold = [{**r, "gold": "A"} for r in rows]
    assert debias.estimate_prior(wrong_gold) == estimate  # the labels play no part


def test_the_prior_estimate_recovers_a_pure_position_bias_of_a_real_model(tiny):
    """The tiny model made to see only letters: every letter token's logit overwritten with a planted
    log-prior, whatever the question. Its rotations give back exactly that prior."""
    model, tokenizer, questions = tiny
    planted = {"A": 0.05, "B": 0.10, "C": 0.45, "D": 0.30, "E": 0.10}
    ids = evaluate.letter_token_ids(tokenizer, "ABCDE")

    def position_only(module, args, output):
        for letter, p in planted.items():
            output[..., ids[letter]] = math.log(p) + 20.0  # far above every other token, in this proportion
        return output

    hook = model.get_output_embeddings().register_forward_hook(position_only)
    try:
        rows = debias.rotation_scores(model, tokenizer, questions[:6], progress=False)
    finally:
        hook.remove()
    estimate = debias.estimate_prior(rows)
    assert [estimate[letter] for letter in "ABCDE"] == pytest.approx([planted[x] for x in "ABCDE"], abs=1e-4)


def test_without_a_letter_prior_single_pass_debiasing_changes_nothing():
    import random

    rng = random.Random(1)
    rows = [{**_row([0.0] * 5, _knowledge(rng)), "id": f"q{i}"} for i in range(40)]
    prior = debias.estimate_prior(rows)
    assert list(prior.values()) == pytest.approx([0.2] * 5)
    plain = [_letter_row(r) for r in rows]
    assert [r["pred"] for r in debias.pride_results(plain, prior)] == [r["pred"] for r in plain]
    assert len({r["pred"] for r in plain}) > 1  # the plain answers do vary: the check can fail


def test_single_pass_and_full_cyclic_agree_when_the_bias_is_a_pure_letter_prior():
    """Calibrated on some questions, PriDe debiases the others from one pass each, and picks what
    averaging every rotation picks; the plain reading, pulled by the prior, does not."""
    import random

    rng = random.Random(2)
    log_prior = [math.log(p) for p in (0.55, 0.2, 0.1, 0.1, 0.05)]
    rows = [{**_row(log_prior, _knowledge(rng), gold="ABCDE"[i % 5]), "id": f"q{i}"} for i in range(60)]
    calibration, rest = rows[:15], rows[15:]
    prior = debias.estimate_prior(calibration)
    single = debias.pride_results([_letter_row(r) for r in rest], prior)
    assert [r["pred"] for r in single] == [r["pred"] for r in debias.results(rest, "debiased")]
    assert [r["pred"] for r in single] != [r["pred"] for r in debias.results(rest, "plain")]
    compared = debias.compare_debiasing(rest, prior)
    assert compared["same_choice"] == 1.0 and compared["pride"] == compared["debiased"] and compared["n"] == 45
    assert debias.pride_results(rest, prior) == single  # rotation rows are read at their rotation 0


def test_the_debiased_scores_are_what_the_model_knows_of_each_content_with_the_prior_taken_out():
    """Scores that are a letter prior plus knowledge: both readings' scores differ between letters exactly as
    the knowledge of the contents does (the prior gone), and each choice is its scores' best letter."""
    import random

    rng = random.Random(4)  # a question where the prior pulls the plain reading off the best content
    planted = [0.55, 0.2, 0.1, 0.1, 0.05]
    knows = _knowledge(rng)
    row, prior = _row([math.log(p) for p in planted], knows), dict(zip("ABCDE", planted, strict=True))
    for scores in (debias.debiased_scores(row), debias.pride_scores(row["logprobs"][0], prior)):
        assert list(scores) == list("ABCDE")
        assert [scores[x] - scores["A"] for x in "ABCDE"] == pytest.approx([k - knows[0] for k in knows], abs=1e-9)
    best = "ABCDE"[knows.index(max(knows))]
    assert debias.debiased_choice(row) == debias.pride_choice(row["logprobs"][0], prior) == best
    assert max(row["logprobs"][0], key=row["logprobs"][0].get) != best  # the plain reading, pulled by the prior, differs


def test_a_prior_without_a_letter_of_the_question_is_an_error():
    with pytest.raises(ValueError, match="no estimate for letter.*E"):
        debias.pride_choice({"A": -1.0, "E": -2.0}, {"A": 0.5, "B": 0.5})
    with pytest.raises(ValueError, match="eval.calibration_questions"):
        debias.estimate_prior([])
