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
    assert list(zip(table["model_a"], table["model_b"])) == [("base", "lora"), ("base", "merged"), ("lora", "merged")]


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
