"""Metrics: intervals, invalid answers counted as wrong, paired tests, position bias, sections."""
import math

import pytest

from medqa_zh import evaluate


def _wilson_by_hand(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(0, 10), (8, 10), (10, 10), (113, 518), (1, 1)])
def test_wilson_matches_the_formula(k, n):
    low, high = evaluate.wilson(k, n)
    exp_low, exp_high = _wilson_by_hand(k, n)
    assert low == pytest.approx(max(exp_low, 0.0), abs=1e-9) and high == pytest.approx(min(exp_high, 1.0), abs=1e-9)
    assert low <= k / n <= high


def test_invalid_answers_count_as_wrong_and_are_reported():
    results = [{"id": "q1", "gold": "A", "pred": "A"}, {"id": "q2", "gold": "B", "pred": None},
               {"id": "q3", "gold": "C", "pred": "D"}, {"id": "q4", "gold": "D", "pred": "D"}]
    m = evaluate.accuracy(results)
    assert (m["n"], m["correct"], m["invalid"]) == (4, 2, 1)
    assert m["accuracy"] == 0.5 and m["invalid_rate"] == 0.25
    assert m["ci_low"] < 0.5 < m["ci_high"]


def test_results_must_be_one_row_per_question():
    with pytest.raises(ValueError, match="duplicate question ids"):
        evaluate.accuracy([{"id": "q1", "gold": "A", "pred": "A"}, {"id": "q1", "gold": "A", "pred": "B"}])
    with pytest.raises(ValueError, match="missing: pred"):
        evaluate.accuracy([{"id": "q1", "gold": "A"}])


def _results(correct_flags, prefix="q"):
    return [{"id": f"{prefix}{i}", "gold": "A", "pred": "A" if ok else "B"} for i, ok in enumerate(correct_flags)]


def test_mcnemar_uses_only_the_discordant_questions():
    # 5 questions only a gets right, none only b: two-sided exact p = 2 * 0.5**5
    a = _results([True] * 5 + [True] * 10 + [False] * 10)
    b = _results([False] * 5 + [True] * 10 + [False] * 10)
    r = evaluate.mcnemar(a, b)
    assert (r["n"], r["a_only"], r["b_only"]) == (25, 5, 0)
    assert r["p_value"] == pytest.approx(2 * 0.5**5)
    assert evaluate.mcnemar(a, a)["p_value"] == 1.0
    balanced = evaluate.mcnemar(_results([True, False] * 4), _results([False, True] * 4))
    assert (balanced["a_only"], balanced["b_only"]) == (4, 4) and balanced["p_value"] == pytest.approx(1.0)


def test_mcnemar_pairs_by_question_id_not_by_position():
    a = _results([True, False, True])
    b = list(reversed(_results([True, False, True])))
    assert evaluate.mcnemar(a, b)["a_only"] == 0


def test_mcnemar_refuses_different_questions():
    with pytest.raises(ValueError, match="same questions"):
        evaluate.mcnemar(_results([True, False]), _results([True, False], prefix="x"))


def test_pairwise_mcnemar_covers_every_pair():
    models = {name: _results([True, False, True, True]) for name in ("base", "lora", "merged")}
    table = evaluate.pairwise_mcnemar(models)
    assert list(zip(table["model_a"], table["model_b"], strict=True)) == [("base", "lora"), ("base", "merged"), ("lora", "merged")]
    assert {"difference", "diff_ci_low", "diff_ci_high", "p_value"} <= set(table.columns)


def test_the_paired_difference_interval_matches_the_textbook():
    """Newcombe's square-and-add interval for paired proportions, on the worked example of Fagerland,
    Lydersen & Laake, *Statistical Analysis of Contingency Tables* (2017), ch. 8 (Cavo et al. 2012,
    complete response before and after consolidation therapy: 59 / 6 / 16 / 80): -0.0621 (-0.1186 to -0.0046)."""
    low, high = evaluate.paired_difference_ci(both=59, b_only=6, a_only=16, neither=80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    # the same table as results of two models: the difference is b - a, with that interval
    flags = [(True, True)] * 59 + [(False, True)] * 6 + [(True, False)] * 16 + [(False, False)] * 80
    r = evaluate.mcnemar(_results([a for a, _ in flags]), _results([b for _, b in flags]))
    assert round(r["difference"], 4) == -0.0621 and (r["diff_ci_low"], r["diff_ci_high"]) == (low, high)
    assert r["diff_ci_low"] < r["difference"] < r["diff_ci_high"]
    assert r["p_value"] == pytest.approx(0.0525, abs=1e-4)  # exact, 6 of 22 discordant: just above 0.05 here


def test_the_paired_interval_is_symmetric_and_stays_within_bounds():
    low, high = evaluate.paired_difference_ci(30, 10, 20, 40)
    low2, high2 = evaluate.paired_difference_ci(30, 20, 10, 40)  # the two models swapped
    assert (low, high) == pytest.approx((-high2, -low2))
    assert evaluate.paired_difference_ci(0, 10, 0, 0) == pytest.approx((evaluate.paired_difference_ci(0, 10, 0, 0)[0], 1.0))
    agree = evaluate.paired_difference_ci(50, 0, 0, 50)
    assert agree[0] < 0 < agree[1]  # no discordant question: 0 inside, and not a point


def test_the_detectable_difference_is_what_the_exact_test_finds_80_percent_of_the_time():
    """Connor's formula, checked by simulation: with n paired questions, a share psi discordant and
    a true difference of the detectable size, the exact McNemar test rejects at 0.05 about 80% of
    the time (the exact test is a little conservative), and a difference half that size far less."""
    import numpy as np
    from scipy import stats

    n, psi = 525, 0.3
    d = evaluate.detectable_difference(n, round(psi * n))
    assert 0.04 < d < 0.1
    rng = np.random.default_rng(0)

    def power(diff, trials=2000):
        p_b_only, p_a_only = (psi + diff) / 2, (psi - diff) / 2
        counts = rng.multinomial(n, [p_b_only, p_a_only, 1 - psi], size=trials)
        hits = 0
        for b_only, a_only, _ in counts:
            hits += stats.binomtest(int(a_only), int(a_only + b_only), 0.5).pvalue < 0.05
        return hits / trials

    assert 0.74 < power(d) < 0.86
    assert power(d / 2) < 0.4
    assert math.isnan(evaluate.detectable_difference(525, 0))  # two models that never disagree: nothing to say
    assert evaluate.detectable_difference(2000, 600) < d  # more questions, smaller effects


def test_letter_distribution_shows_position_bias_and_invalid():
    results = [{"id": f"q{i}", "gold": "ABCDE"[i % 5], "pred": "C" if i < 8 else None} for i in range(10)]
    table = evaluate.letter_distribution(results)
    assert table.loc["C", "predicted"] == 0.8 and table.loc["invalid", "predicted"] == 0.2
    assert table["gold"].sum() == pytest.approx(1.0) and table["predicted"].sum() == pytest.approx(1.0)


def test_accuracy_by_section():
    results = ([{"id": f"a{i}", "gold": "A", "pred": "A", "meta_info": "内科"} for i in range(3)]
               + [{"id": f"b{i}", "gold": "A", "pred": "B", "meta_info": "外科"} for i in range(2)])
    table = evaluate.by_section(results)
    assert list(table["section"]) == ["内科", "外科"]
    assert list(table["accuracy"]) == [1.0, 0.0] and list(table["n"]) == [3, 2]
    assert evaluate.by_section(results, min_questions=3)["section"].tolist() == ["内科"]


# --------------------------------------------------------------------------- letter scoring on the tiny model


@pytest.fixture(scope="module")
def tiny_model(tiny_assets):
    from medqa_zh import data, models

    model = models.load_model(str(tiny_assets["model"]), "float32")
    tokenizer = models.load_tokenizer(str(tiny_assets["model"]))
    questions, _ = data.read_questions(tiny_assets["medqa"] / "questions" / "Mainland" / "test.jsonl")
    return model, tokenizer, questions[:10]


def test_letter_scores_are_the_same_alone_or_in_a_padded_batch(tiny_model):
    import torch

    model, tokenizer, questions = tiny_model
    lengths = {len(q.question) for q in questions}
    assert len(lengths) > 1  # different lengths, so the batch really is padded
    batched = evaluate.letter_scores(model, tokenizer, questions, batch_size=10, progress=False)
    alone = evaluate.letter_scores(model, tokenizer, questions, batch_size=1, progress=False)
    for b, a in zip(batched, alone, strict=True):
        assert b["id"] == a["id"] and b["pred"] == a["pred"]
        torch.testing.assert_close(torch.tensor(list(b["logprobs"].values())), torch.tensor(list(a["logprobs"].values())),
                                   rtol=1e-4, atol=1e-4)
    assert tokenizer.padding_side == "right"  # restored


def test_letter_scores_read_the_logits_right_after_the_answer_prefix(tiny_model):
    import torch

    from medqa_zh import prompts

    model, tokenizer, questions = tiny_model
    q = questions[0]
    ids = evaluate.letter_token_ids(tokenizer, "ABCDE")
    text = prompts.answer_prompt(tokenizer, q.question, q.options)
    with torch.inference_mode():
        logits = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)
    result = evaluate.letter_scores(model, tokenizer, [q], progress=False)[0]
    for letter, value in result["logprobs"].items():
        assert value == pytest.approx(float(expected[ids[letter]]), abs=1e-5)
    assert result["pred"] == max(result["logprobs"], key=result["logprobs"].get)
    assert result["gold"] == q.answer_idx


def test_generation_is_greedy_despite_sampling_defaults_and_batch_independent(tiny_model):
    import torch

    model, tokenizer, questions = tiny_model
    assert model.generation_config.do_sample  # the tiny model ships Qwen's sampling defaults on purpose
    torch.manual_seed(1)
    first = evaluate.generate_answers(model, tokenizer, questions[:6], max_new_tokens=6, batch_size=6, progress=False)
    torch.manual_seed(2)
    again = evaluate.generate_answers(model, tokenizer, questions[:6], max_new_tokens=6, batch_size=6, progress=False)
    alone = evaluate.generate_answers(model, tokenizer, questions[:6], max_new_tokens=6, batch_size=1, progress=False)
    assert [r["text"] for r in first] == [r["text"] for r in again] == [r["text"] for r in alone]
    assert all(r["text"] for r in first)
    assert [r["gold"] for r in first] == [q.answer_idx for q in questions[:6]]
    for r in first:  # the parse is answers.extract_letter's
        from medqa_zh.answers import extract_letter

        assert r["pred"] == extract_letter(r["text"])


def test_run_coroutine_runs_a_coroutine_also_inside_a_running_event_loop():
    import asyncio
    import threading

    async def where():
        await asyncio.sleep(0)
        return threading.current_thread().name

    here = threading.current_thread().name
    assert evaluate.run_coroutine(where()) == here  # no loop running: asyncio.run, in this thread

    async def in_a_kernel():  # a Jupyter cell runs inside the kernel's loop, where asyncio.run refuses
        return evaluate.run_coroutine(where())

    assert asyncio.run(in_a_kernel()) != here  # done, in a worker thread with a loop of its own
