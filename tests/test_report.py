"""medqa_zh.report: the run's results table (10) and reports/index.html (run_all.sh)."""
import html
import json
import math
import re
from types import SimpleNamespace

import matplotlib
import pandas as pd
import pytest

from medqa_zh import evaluate, files, planted, report

pytestmark = pytest.mark.timeout(900)  # a hang fails with its stack; at least 5x the longest such test measured with both cores busy

matplotlib.use("Agg")


def _rows(flags, prefix="q", pred_wrong="A"):
    return [{"id": f"{prefix}{i}", "gold": "B", "pred": "B" if ok else pred_wrong} for i, ok in enumerate(flags)]


def test_results_table_tests_against_base_and_against_no_rag():
    base = _rows([1, 0, 0, 0, 1, 0])
    merged = _rows([1, 1, 1, 1, 1, 0])
    merged_rag = _rows([1, 1, 0, 0, 0, 0])
    results = {("merged", "api+rag bm25"): merged_rag, ("merged", "api"): merged, ("base", "api"): base,
               ("base", "letter"): base}
    table = report.results_table(results)
    assert list(zip(table["model"], table["evaluation"], strict=True)) == [  # paths in series order, models in training order
        ("base", "letter"), ("base", "api"), ("merged", "api"), ("merged", "api+rag bm25")]
    row = table.set_index(["model", "evaluation"])
    assert row.loc[("merged", "api"), "p_vs_base"] == evaluate.mcnemar(base, merged)["p_value"]
    assert row.loc[("merged", "api+rag bm25"), "p_vs_no_rag"] == evaluate.mcnemar(merged, merged_rag)["p_value"]
    assert math.isnan(row.loc[("base", "api"), "p_vs_base"]) and math.isnan(row.loc[("merged", "api"), "p_vs_no_rag"])
    assert math.isnan(row.loc[("merged", "api+rag bm25"), "p_vs_base"])  # no base with bm25 to compare with
    assert row.loc[("merged", "api"), "accuracy"] == pytest.approx(5 / 6)
    assert row.loc[("merged", "api"), "ci_low"] < 5 / 6 < row.loc[("merged", "api"), "ci_high"]


def test_markdown_table():
    table = report.results_table({("base", "api"): _rows([1, 0])})
    md = report.markdown_table(table[["model", "n", "accuracy", "p_vs_base"]])
    assert md.splitlines() == ["| model | n | accuracy | p_vs_base |", "|---|---|---|---|", "| base | 2 | 0.500 |  |"]


def test_index_links_every_report_and_shows_results_and_figures(tmp_path):
    out = tmp_path / "outputs" / "smoke"
    (out / "reports").mkdir(parents=True)
    (out / "reports" / "01_data.html").write_text("<html></html>")
    (out / "figures").mkdir()
    fig = report.plot_accuracy(report.results_table({("base", "api"): _rows([1, 0, 1])}), "evaluation")
    report.save(fig, out / "figures" / "10_accuracy.png")
    (out / "tables").mkdir()
    report.results_table({("base", "api"): _rows([1, 0, 1])}).to_csv(out / "tables" / "10_results.csv", index=False)
    (out / "manifest.json").write_text(json.dumps({"profile": "smoke", "settings": {"smoke": True},
                                                   "git": {"commit": "abc123", "dirty": True}}))
    report.record_timing(out, "01_data", 12.34, "ok")
    report.record_timing(out, "02_lora_sft", 3, "failed")
    page = report.write_index(out, ["01_data", "02_lora_sft", "03_full_sft"]).read_text(encoding="utf-8")
    assert "SMOKE PROFILE" in page and "abc123 (uncommitted changes)" in page
    assert "<a href='01_data.html'>" in page and "02_lora_sft.html" not in page  # no link to a missing report
    assert "class='failed'>failed" in page and "<td>not run</td>" in page and "<td>12.3</td>" in page
    assert "<img src='../figures/10_accuracy.png'" in page
    # the results table as a reader wants it: percent with the interval, no raw column names; the CSV a click away
    assert "<th>accuracy [95% CI]</th>" in page and re.search(r"<td>66\.7 \[\d+\.\d, \d+\.\d\]</td>", page)
    assert not re.search(r"ci_low|diff_vs_base|p_adj|detectable_vs", page.split("10_results.csv")[0])
    assert "<a href='../tables/10_results.csv'>" in page and report.READING_NOTE.split(";")[0] in page
    # every heading in English and Chinese, the Chinese marked as such; the verdict first, then the results
    headings = re.findall(r"<h[12]>(.*?)</h[12]>", page)
    assert len(headings) == 5 and all("<span lang='zh-CN'>" in h for h in headings)
    assert [re.search(r"<span lang='zh-CN'>(.*?)</span>", h).group(1) for h in headings] == ["配置", "结论", "结果", "笔记本", "图"]
    assert "<h2>Verdict · <span lang='zh-CN'>结论</span></h2><p>No verdict yet: 10_report writes it." in page  # not run yet
    # the command line run_all.sh uses
    report.main([ "index", str(out), "--notebooks", str(tmp_path / "none"), "--timing", "10_report", "1.5", "ok"])
    assert json.loads((out / "reports" / "timings.json").read_text())["10_report"]["seconds"] == 1.5


def test_the_index_opens_with_10s_verdict_in_words_rendered_from_its_markdown(tmp_path):
    checks, words = _verdict_case([1] * 30 + [0] * 10, replication_flags=[1] * 20)
    answers = {("base", "letter"): _rows([0] * 40), ("merged", "letter"): _rows([1] * 30 + [0] * 10)}
    table = report.results_table(answers, primary=report.primary_comparisons("letter", ["merged vs base"]))
    tables = tmp_path / "tables"
    files.write_table(table, tables / f"{report.RESULTS_TABLE}.csv")
    files.write_text(tables / f"{report.VERDICT_TEXT}.md", words + "\n\n<script>alert(1)</script>")  # as 10 writes it
    page = report.write_index(tmp_path, ["10_report"]).read_text(encoding="utf-8")
    body = page.split("</h1>", 1)[1]
    assert body.startswith("\n<section id='verdict'><h2>Verdict")  # the first thing under the title
    section = body.split("</section>")[0]
    assert body.index("</section>") < body.index("<table")  # the results table after it
    # rendered from markdown: bold and code as HTML, the list as a list; raw HTML escaped, never run
    assert "<strong>merged vs base</strong>" in section and "<code>eval.primary_reading</code>" in section
    assert section.count("<li>") == 3 and "**" not in section and "`" not in section  # in words, in Chinese, in full
    # the first sentence under the heading is the finding, in plain words (issue 52), not the method
    first = section.split("</h2>", 1)[1]
    assert first.startswith("<ul>\n<li><strong>Fine-tuning (merged against the base model)</strong>: a gain (+75.0 "
                            "points, 95% CI "), first[:200]
    assert "replicated).</li>" in first.split("</li>")[0] + "</li>"
    assert "<strong>微调（merged 对比基座模型）</strong>：提高（+75.0 个百分点" in section
    assert section.index("The numbers and the method") > section.index("微调")
    assert "&lt;script&gt;" in section and "<script>" not in page
    # the same words as the notebook's verdict, sentence by sentence
    shown = html.unescape(re.sub(r"<[^>]+>", "", section))
    for line in words.splitlines():
        assert line.removeprefix("- ").replace("**", "").replace("`", "") in shown, line
    assert "**replicated**" in words and "a significant gain, replicated on an independent set" in shown


def test_section_table_keeps_the_largest_sections_with_their_sizes():
    questions = [SimpleNamespace(id=f"q{i}", meta_info=s) for i, s in enumerate("内内内外外儿")]
    base = [{"id": f"q{i}", "gold": "B", "pred": p} for i, p in enumerate("BBABAB")]
    table = report.section_table({("base", "letter"): base, ("base", "api"): base[::-1]}, questions, top=2)
    assert list(table.index) == ["内 (n=3)", "外 (n=2)"] and list(table.columns) == ["base"]
    assert table.loc["内 (n=3)", "base"] == pytest.approx(2 / 3) and table.loc["外 (n=2)", "base"] == 0.5


def _q(i, gold, letters="ABCDE"):
    return SimpleNamespace(id=f"q{i}", answer_idx=gold, options={letter: letter.lower() for letter in letters})


def test_baselines_are_chance_and_the_most_common_training_letter():
    train = [_q(i, gold) for i, gold in enumerate("CCCAB")]
    questions = [_q(i, gold) for i, gold in enumerate("CABDECCAAB")]  # C is gold on 3 of 10
    table = evaluate.baselines(train, questions).set_index("model")
    assert list(table.index) == ["chance", "always C"]
    assert table.loc["chance", "accuracy"] == pytest.approx(0.2)
    assert table.loc["chance", "ci_low"] == 0.0 and 0.4 <= table.loc["chance", "ci_high"] <= 0.6  # binomial quantiles
    assert table.loc["always C", "accuracy"] == pytest.approx(0.3) and table.loc["always C", "correct"] == 3
    assert table.loc["always C", "ci_low"] < 0.3 < table.loc["always C", "ci_high"]
    four = [_q(i, "A", "ABCD") for i in range(4)]
    assert evaluate.baselines(train, four).set_index("model").loc["chance", "accuracy"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="baselines need"):
        evaluate.baselines([], questions)


def test_every_reading_has_a_family_and_the_figure_one_panel_each():
    readings = ["letter", "pride", "debiased", "generate", "api", "api@llamacpp-q8_0", "api+rag bm25",
                "letter+rag bm25", "pride+rag dense"]
    assert [report.reading_family(r) for r in readings] == [
        "letter", "debiased", "debiased", "generated", "API", "API", "with passages", "with passages", "with passages"]
    answers = {(model, r): _rows([1, 0, i % 2, 1], prefix="q") for model in ("base", "merged") for i, r in
               enumerate(readings)}
    lines = evaluate.baselines([_q(i, "C") for i in range(4)], [_q(i, "B") for i in range(4)])
    table = report.results_table(answers, lines)
    fig = report.plot_accuracy_panels(table[table["evaluation"] != "baseline"], lines)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == list(report.FAMILIES)  # five families: five panels, one hidden
    passages = shown[-1]
    labels = [t.get_text() for t in passages.get_legend().get_texts()]
    assert set(labels) == {"api+rag bm25", "letter+rag bm25", "pride+rag dense", "chance 20.0%", "always C 0.0%"}
    assert [t.get_text() for t in passages.get_yticklabels()] == ["base", "merged"]
    assert passages.get_xlabel() == "accuracy (95% interval)"  # the lowest panel of its column has the scale
    readable = report.readable_frame(table)
    assert list(readable.columns) == list(report.READABLE_COLUMNS) and len(readable) == len(table)
    assert readable.iloc[0]["accuracy [95% CI]"] == "50.0 [15.0, 85.0]"  # base, letter: 2 of 4, Wilson


def test_baselines_join_the_results_table_and_the_accuracy_figure():
    train = [_q(i, gold) for i, gold in enumerate("CCCAB")]
    questions = [_q(i, "B") for i in range(6)]
    lines = evaluate.baselines(train, questions)
    table = report.results_table({("base", "letter"): _rows([1, 0, 0, 0, 1, 0])}, lines)
    assert list(zip(table["model"], table["evaluation"], strict=True)) == [("base", "letter"), ("chance", "baseline"),
                                                              ("always C", "baseline")]
    fig = report.plot_accuracy(table[table["evaluation"] != "baseline"], "evaluation", baselines=lines)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert sorted(labels) == ["always C 0.0%", "chance 20.0%", "letter"]


def _rotations(knows, prior, n=6):
    """Letter scores under every rotation: option content j adds ``knows[j]``, letter i ``prior[i]``."""
    letters, k = "ABCDE", 5
    rows = []
    for i in range(n):
        scores = [{letters[(j + r) % k]: prior[(j + r) % k] + knows[j] for j in range(k)} for r in range(k)]
        rows.append({"id": f"q{i}", "gold": "B", "letters": letters, "logprobs": scores})
    return rows


def test_rotations_become_debiased_rows_tested_against_the_base_models_debiased_answers():
    rotations = _rotations
    biased = rotations([0, 0, 0, 0, 0], [3.0, 0, 0, 0, 0])   # knows nothing, loves A
    knowing = rotations([0, 1.0, 0, 0, 0], [3.0, 0, 0, 0, 0])  # loves A, but knows the answer is B's content
    table = report.results_table({("base", "rotations"): biased, ("lora", "rotations"): knowing,
                                  ("base", "letter"): _rows([0] * 6)})
    assert list(zip(table["model"], table["evaluation"], strict=True)) == [("base", "letter"), ("base", "debiased"),
                                                              ("lora", "debiased")]
    row = table.set_index(["model", "evaluation"])
    assert row.loc[("lora", "debiased"), "accuracy"] == 1.0 and row.loc[("lora", "debiased"), "consistency"] == 0.0
    assert row.loc[("lora", "debiased"), "p_vs_base"] < 0.05  # 6 of 6 discordant questions
    assert math.isnan(row.loc[("base", "letter"), "consistency"])


def test_passages_with_rotations_are_tested_against_the_same_models_debiased_answers():
    no_rag = _rotations([0, 0, 0, 0, 0], [3.0, 0, 0, 0, 0])
    rag = _rotations([0, 1.0, 0, 0, 0], [0, 0, 3.0, 0, 0])  # passages taught the answer (and moved the prior)
    table = report.results_table({("merged", "rotations"): no_rag, ("merged", "rotations+rag bm25"): rag,
                                  ("base", "rotations"): no_rag})
    assert list(zip(table["model"], table["evaluation"], strict=True)) == [
        ("base", "debiased"), ("merged", "debiased"), ("merged", "debiased+rag bm25")]
    row = table.set_index(["model", "evaluation"]).loc[("merged", "debiased+rag bm25")]
    assert row["accuracy"] == 1.0 and row["p_vs_no_rag"] < 0.05 and math.isnan(row["p_vs_base"])
    assert row["consistency"] == 0.0  # under every rotation? never: the prior on C still wins 4 of 5


def test_significance_names_each_difference_below_alpha_and_only_those():
    base, better, same = _rows([0] * 12), _rows([1] * 12), _rows([0] * 11 + [1])
    table = report.results_table({("base", "letter"): base, ("lora", "letter"): better, ("full", "letter"): same})
    text = report.significance(table)
    assert text.startswith("1 of 2 paired differences have a Holm-adjusted p < 0.05 (1 unadjusted; each adjusted within "
                           "its family: 2 exploratory)")
    lines = {line.split("**")[1]: line for line in text.splitlines()[1:]}
    assert set(lines) == {"lora / letter", "full / letter"}  # every difference, said in words
    assert "a significant gain of +100.0 points [unadjusted 95% CI" in lines["lora / letter"]
    assert lines["lora / letter"].startswith("- exploratory: ")  # nothing was pre-registered here
    # not significant: how large a gain the data still allow, and what these questions could detect
    low, high = (100 * v for v in evaluate.paired_difference_ci(0, 1, 0, 11))
    assert f"no significant difference, +8.3 points [unadjusted 95% CI {low:+.1f}, {high:+.1f}], p = 1, adjusted p = 1" in lines[
        "full / letter"]
    detectable = 100 * evaluate.detectable_difference(12, 1)
    assert f"a gain larger than {high:.1f} points" in lines["full / letter"]
    assert "are ruled out by the unadjusted 95% interval" in lines["full / letter"]
    assert (f"these questions detect {detectable:.1f} points with 80% power, given the disagreement observed here"
            in lines["full / letter"])
    assert report.significance(report.results_table({("base", "letter"): base, ("full", "letter"): same})).startswith(
        "0 of 1 paired differences have a Holm-adjusted p")
    assert report.significance(report.results_table({("base", "letter"): base})).startswith("No paired test yet")


# --------------------------------------------------------------------------- Chinese in the figures

LABEL = "内科学 · 外科学 · 病理生理学：诊断与治疗"


@pytest.fixture
def fonts(monkeypatch):
    """matplotlib as on a fresh machine with no CJK font (default settings; the system's CJK fonts, and the
    packaged one an earlier test may have registered, left out); ``fonts.add(entry)`` adds one. Restored after."""
    from matplotlib import font_manager

    manager = font_manager.fontManager
    packaged = str(report.packaged_cjk_font())
    fresh = [f for f in manager.ttflist if f.name not in report.CJK_FONTS and f.fname != packaged]
    monkeypatch.setattr(manager, "ttflist", fresh)
    manager._findfont_cached.cache_clear()  # what matplotlib's own addfont does after changing the list
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        yield font_manager
    manager._findfont_cached.cache_clear()


def _draw(label):
    import io
    import warnings

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_title(label)
    ax.bar([label[:3], label[6:9]], [1, 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)
    return [str(w.message) for w in caught]


def _covers(font_manager, label) -> bool:
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties(family=["sans-serif"]), fallback_to_default=False)
    charmap = FT2Font(path).get_charmap()
    return all(ord(c) in charmap for c in label if not c.isspace())


def test_chinese_labels_draw_with_every_glyph(fonts):
    """What the figures of 01, 06 and 10 do: a font with every character of the label, no 'Glyph missing'."""
    name = report.use_cjk_font()
    assert name is not None
    assert not [m for m in _draw(LABEL) if "missing from font" in m]
    assert _covers(fonts, LABEL)


def test_a_machine_with_no_cjk_font_draws_chinese_with_the_packaged_one(fonts):
    assert [m for m in _draw(LABEL) if "missing from font" in m]  # what a fresh machine showed: boxes
    path = report.packaged_cjk_font()
    assert path is not None and path.name == "NotoSansCJKsc-Regular.otf"  # SIL OFL 1.1, from mplfonts
    assert report.use_cjk_font() == "Noto Sans CJK SC"
    assert fonts.findfont(fonts.FontProperties(family=["sans-serif"]), fallback_to_default=False) == str(path)
    assert not [m for m in _draw(LABEL) if "missing from font" in m] and _covers(fonts, LABEL)


def test_a_system_cjk_font_wins_over_the_packaged_one(fonts):
    system = next(f for f in fonts.fontManager.ttflist if f.name == "DejaVu Sans")
    stand_in = fonts.FontEntry(fname=system.fname, name="WenQuanYi Micro Hei")  # as if the system had it
    fonts.fontManager.ttflist.append(stand_in)
    assert report.use_cjk_font() == "WenQuanYi Micro Hei"
    assert not any(f.fname == str(report.packaged_cjk_font()) for f in fonts.fontManager.ttflist)


# --------------------------------------------------------------------------- pre-registration and multiplicity

NULL_READINGS = ("letter", "generate", "api", "api@llamacpp-f16", "api@llamacpp-q8_0", "api@llamacpp-Q4_K_M")


def _null_family(rng, n=120, accuracy=0.3):
    """Two models with the same accuracy, answering independently, read six ways: no real difference anywhere."""
    def answers(tag):
        return [{"id": f"q{i}", "gold": "B", "pred": "B" if rng.random() < accuracy else "A"} for i in range(n)]
    return {(model, reading): answers(model + reading) for reading in NULL_READINGS for model in ("base", "merged")}


def test_holm_adjusts_a_family_and_leaves_nan_out():
    adjusted = evaluate.holm([0.01, float("nan"), 0.04, 0.03])
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1, kept monotone: 0.03, 0.06, 0.06
    assert adjusted[0] == pytest.approx(0.03) and math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.06) and adjusted[3] == pytest.approx(0.06)
    assert evaluate.holm([]) == []


@pytest.mark.slow  # 300 simulated families: about a minute
def test_a_null_pair_read_six_ways_is_significant_somewhere_unless_adjusted():
    """No real difference, six readings: the smallest unadjusted p falls below 0.05 far more often than 5% of
    the time, while the smallest Holm-adjusted p does so at most about 5%; and the results table shows such a
    family as it is: unadjusted p below 0.05 in some row, adjusted p above it in every row."""
    import random

    rng = random.Random(0)
    raw_hits = adjusted_hits = 0
    runs, planted = 300, None
    for _ in range(runs):
        family = _null_family(rng)
        p = [evaluate.mcnemar(family["base", r], family["merged", r])["p_value"] for r in NULL_READINGS]
        adjusted = evaluate.holm(p)
        assert all(q >= x for q, x in zip(adjusted, p, strict=True))
        raw_hits += min(p) < 0.05
        adjusted_hits += min(adjusted) < 0.05
        if planted is None and min(p) < 0.05 <= min(adjusted):
            planted = family
    assert raw_hits / runs > 0.12  # about one family in five looks like a finding, unadjusted
    assert adjusted_hits / runs <= 0.06  # Holm keeps the family-wise error at 5%, here below it
    assert raw_hits >= 2 * adjusted_hits
    table = report.results_table(planted)
    tested = table[table["p_vs_base"].notna()]
    assert len(tested) == len(NULL_READINGS)
    assert tested["p_vs_base"].min() < 0.05 <= tested["p_adj_vs_base"].min()
    assert report.significance(table).startswith("0 of 6 paired differences have a Holm-adjusted p < 0.05")


def test_the_verdict_names_only_the_preregistered_comparison():
    base, better = _rows([0] * 40), _rows([1] * 40)
    same = _rows([0] * 38 + [1] * 2)
    answers = {("base", "letter"): base, ("merged", "letter"): better,  # exploratory: a big gain
               ("base", "generate"): base, ("merged", "generate"): same}  # pre-registered: nothing
    comparisons = report.primary_comparisons("generate", ["merged vs base"])
    table = report.results_table(answers, primary=comparisons)
    assert list(table["primary"]) == ["", "", "", "merged vs base"]
    text = report.verdict(table, report.primary_checks(comparisons, {"eval": (answers, None)}), comparisons, "generate")
    assert "**generate**" in text and "merged vs base" in text
    assert "letter" not in text  # the significant exploratory difference is not the verdict
    assert "no significant difference" in text and "not replicated" in text
    words = report.significance(table)
    assert "exploratory: **merged / letter**" in words and "primary: **merged / generate**" in words


PRE_REGISTERED = ["merged vs base", "merged+rag bm25 vs merged"]


def _two_families():
    """The pre-registered comparisons measured in the letter reading (merged vs base: p = 2 / 2**10; with passages:
    4 discordant, p = 0.125), and exploratory steps beside them: generated answers, and the API with passages."""
    primary = {("base", "letter"): _rows([0] * 40), ("merged", "letter"): _rows([1] * 10 + [0] * 30),
               ("merged", "letter+rag bm25"): _rows([1] * 14 + [0] * 26), ("full", "letter"): _rows([1] * 6 + [0] * 34)}
    exploratory = {("base", "generate"): _rows([0] * 40), ("merged", "generate"): _rows([1] * 7 + [0] * 33),
                   ("merged", "api"): _rows([0] * 40), ("merged", "api+rag bm25"): _rows([1] * 8 + [0] * 32)}
    return primary, exploratory, report.primary_comparisons("letter", PRE_REGISTERED)


def _adjusted(table, model, evaluation, suffix):
    return table.set_index(["model", "evaluation"]).loc[(model, evaluation), f"p_adj_{suffix}"]


def test_turning_an_exploratory_step_off_leaves_the_primary_verdicts_adjusted_p_unchanged():
    primary, exploratory, comparisons = _two_families()
    with_all = report.results_table({**primary, **exploratory}, primary=comparisons)
    without = report.results_table(primary, primary=comparisons)  # 06's generated answers and 07/08's API off
    for c in comparisons:
        assert _adjusted(with_all, c.model, c.evaluation, c.suffix) == _adjusted(without, c.model, c.evaluation, c.suffix)
    # the primary family is the two pre-registered comparisons, adjusted among themselves
    p = 2 / 2**10
    assert _adjusted(with_all, "merged", "letter", "vs_base") == pytest.approx(2 * p)
    assert _adjusted(with_all, "merged", "letter+rag bm25", "vs_no_rag") == pytest.approx(0.125)
    # and the verdict says the same adjusted p, whatever else the report shows
    words = [report.verdict(t, report.primary_checks(comparisons, {"eval": (answers, None)}), comparisons, "letter")
             for t, answers in ((with_all, {**primary, **exploratory}), (without, primary))]
    said = [re.search(r"\*\*merged vs base\*\*.*?adjusted p = ([\d.e-]+)", w).group(1) for w in words]
    assert said[0] == said[1] == f"{2 * p:.2g}"
    assert "adjusted among the 2 pre-registered comparisons alone" in words[0] and "other 3 paired differences" in words[0]
    assert "other 1 paired differences" in words[1]  # full vs base: exploratory in both


def test_a_pre_registered_comparison_not_measured_still_counts_in_the_primary_family():
    primary, _, comparisons = _two_families()
    del primary["merged", "letter+rag bm25"], primary["full", "letter"]  # 08 off: the passages comparison not measured
    table = report.results_table(primary, primary=comparisons)
    p = 2 / 2**10
    assert _adjusted(table, "merged", "letter", "vs_base") == pytest.approx(2 * p)  # m = 2 all the same (p = 1 for it)
    assert "not measured in this run" in report.verdict(table, report.primary_checks(comparisons, {}), comparisons, "letter")


def test_exploratory_differences_are_adjusted_within_their_own_family_and_the_table_says_which():
    primary, exploratory, comparisons = _two_families()
    table = report.results_table({**primary, **exploratory}, primary=comparisons)
    tested = [(i, s) for s in report.SUFFIXES for i in table.index if table.at[i, f"p_{s}"] == table.at[i, f"p_{s}"]]
    family = {(table.at[i, "model"], table.at[i, "evaluation"], s): table.at[i, f"family_{s}"] for i, s in tested}
    assert family == {("merged", "letter", "vs_base"): "primary", ("merged", "letter+rag bm25", "vs_no_rag"): "primary",
                      ("full", "letter", "vs_base"): "exploratory", ("merged", "generate", "vs_base"): "exploratory",
                      ("merged", "api+rag bm25", "vs_no_rag"): "exploratory"}
    for name in ("primary", "exploratory"):
        members = [(i, s) for i, s in tested if table.at[i, f"family_{s}"] == name]
        assert [table.at[i, f"p_adj_{s}"] for i, s in members] == evaluate.holm([table.at[i, f"p_{s}"] for i, s in members])
    # no test, no family: the base rows, and vs_no_rag of a row without passages
    assert set(table.loc[table["p_vs_base"].isna(), "family_vs_base"]) == {""}
    assert set(table.loc[table["p_vs_no_rag"].isna(), "family_vs_no_rag"]) == {""}
    # nothing pre-registered: every difference is exploratory, one family (06's and 08's tables)
    alone = report.results_table({**primary, **exploratory})
    p = alone["p_vs_base"].dropna().tolist() + alone["p_vs_no_rag"].dropna().tolist()
    got = alone["p_adj_vs_base"].dropna().tolist() + alone["p_adj_vs_no_rag"].dropna().tolist()
    assert got == evaluate.holm(p) and set(alone["family_vs_base"]) | set(alone["family_vs_no_rag"]) == {"", "exploratory"}


def test_intervals_beside_adjusted_decisions_say_unadjusted_and_the_detectable_difference_says_observed(tmp_path):
    primary, exploratory, comparisons = _two_families()
    answers = {**primary, **exploratory}
    table = report.results_table(answers, primary=comparisons)
    readable = report.readable_frame(table).set_index(["model", "reading"])
    assert "Δ vs base [unadjusted 95% CI], p, Holm-adjusted p (family)" in readable.columns
    assert "detectable Δ (80% power, from the observed disagreement)" in readable.columns
    cell = readable.loc[("merged", "letter"), "Δ vs base [unadjusted 95% CI], p, Holm-adjusted p (family)"]
    assert cell.endswith(f"adjusted {2 * 2 / 2**10:.2g} (primary)"), cell
    assert readable.loc[("full", "letter"), "Δ vs base [unadjusted 95% CI], p, Holm-adjusted p (family)"].endswith(
        "(exploratory)")
    assert "unadjusted 95% interval" in report.READING_NOTE and "observed disagreement" in report.READING_NOTE
    checks = report.primary_checks(comparisons, {"eval": (answers, None)})
    text = report.verdict(table, checks, comparisons, "letter")
    assert "+25.0 points [unadjusted 95% CI" in text and "The 95% intervals are unadjusted" in text
    assert "ruled out by the unadjusted 95% interval" in text  # the passages comparison: not significant
    assert "[95% CI" not in text and "ruled out at 95%" not in text
    assert "| Δ [unadjusted 95% CI] | p (unadjusted) |" in report.readable_checks(checks)
    # the index shows the family in words beside each adjusted p
    files.write_table(table, tmp_path / "tables" / f"{report.RESULTS_TABLE}.csv")
    page = report.write_index(tmp_path, ["10_report"]).read_text(encoding="utf-8")
    assert "<th>Δ vs base [unadjusted 95% CI], p, Holm-adjusted p (family)</th>" in page
    assert page.count(" (primary)</td>") == 2 and page.count(" (exploratory)</td>") == 3


def test_primary_comparisons_parse_the_two_kinds_and_refuse_others():
    fine, rag = report.primary_comparisons("debiased", ["merged vs base", "merged+rag bm25 vs merged"])
    assert (fine.model, fine.evaluation, fine.suffix, fine.other) == ("merged", "debiased", "vs_base", ("base", "debiased"))
    assert (rag.model, rag.evaluation, rag.suffix, rag.other) == ("merged", "debiased+rag bm25", "vs_no_rag",
                                                                  ("merged", "debiased"))
    with pytest.raises(ValueError, match="eval.primary_comparisons: 'full vs merged' is neither"):
        report.primary_comparisons("debiased", ["full vs merged"])
    with pytest.raises(ValueError, match="'merged against base' is not 'A vs B'"):
        report.primary_comparisons("debiased", ["merged against base"])
    with pytest.raises(ValueError, match="eval.primary_reading: 'plain' is none of letter, pride, debiased, generate"):
        report.primary_comparisons("plain", [])


def _verdict_case(eval_flags, replication_flags=None, validation=None):
    """merged vs base, letter reading: base right on none, merged on ``eval_flags``; the same on a replication set."""
    answers = {("base", "letter"): _rows([0] * len(eval_flags)), ("merged", "letter"): _rows(eval_flags)}
    comparisons = report.primary_comparisons("letter", ["merged vs base"])
    table = report.results_table(answers, primary=comparisons)
    ids = [f"q{i}" for i in range(len(eval_flags))]
    sets = {"eval": (answers, None), "eval, half 1": (answers, ids[0::2]), "eval, half 2": (answers, ids[1::2])}
    if replication_flags is not None:
        sets["replication"] = ({("base", "letter"): _rows([0] * len(replication_flags), "r"),
                                ("merged", "letter"): _rows(replication_flags, "r")}, None)
    checks = report.primary_checks(comparisons, sets)
    return checks, report.verdict(table, checks, comparisons, "letter", validation, "data.splits.replication is null")


def test_the_verdict_opens_with_one_plain_sentence_per_comparison_in_english_and_chinese():
    first = lambda text: text.splitlines()[0]  # noqa: E731
    checks, text = _verdict_case([1] * 30 + [0] * 10, replication_flags=[1] * 20)
    e = checks[checks["set"] == "eval"].iloc[0]  # the interval the sentence must give: the eval split's
    ci = f"95% CI {100 * e['diff_low']:+.1f} to {100 * e['diff_high']:+.1f}"
    assert first(text) == f"- **Fine-tuning (merged against the base model)**: a gain (+75.0 points, {ci}; replicated)."
    _, text = _verdict_case([1] * 30 + [0] * 10, replication_flags=[0] * 20)
    assert first(text).endswith(f"a gain on eval, unconfirmed (+75.0 points, {ci}; not replicated).")
    _, text = _verdict_case([1] * 2 + [0] * 38)  # no difference, and no replication set
    assert first(text).startswith("- **Fine-tuning (merged against the base model)**: no change shown (+5.0 points, 95% CI ")
    assert first(text).endswith("; no replication set).")
    zh = text.split("**中文**", 1)[1].strip().splitlines()[0]
    assert zh.startswith("- **微调（merged 对比基座模型）**：未显示差异（+5.0 个百分点，95% 区间 ") and zh.endswith("；无复现集）。")
    assert text.index("**The numbers and the method.**") > text.index("**中文**")


def test_the_verdict_says_replicated_only_when_the_independent_set_agrees():
    checks, text = _verdict_case([1] * 30 + [0] * 10, replication_flags=[1] * 20)
    assert list(checks["set"]) == ["eval", "eval, half 1", "eval, half 2", "replication"]
    assert list(checks["n"]) == [40, 20, 20, 20]
    assert "a significant gain" in text and "**replicated**" in text and "unconfirmed" not in text
    _, text = _verdict_case([1] * 30 + [0] * 10, replication_flags=[0] * 20)
    assert "**unconfirmed**: the independent replication set does not show it" in text and "not replicated" in text
    _, text = _verdict_case([1] * 30 + [0] * 10)
    assert "not yet replicated" in text and "no replication set (data.splits.replication is null)" in text


def test_the_verdict_calls_an_eval_gain_unconfirmed_when_validation_disagrees():
    flat = {"step": 24, "n": 100, "diff": -0.02, "diff_low": -0.09, "diff_high": 0.05, "p": 0.6}
    _, text = _verdict_case([1] * 30 + [0] * 10, replication_flags=[1] * 20, validation=flat)
    assert "**unconfirmed**: validation and eval disagree: validation shows no significant difference, eval a gain" in text
    assert "validation (02's learning curve, PriDe on 100 validation questions, step 24 against the base): -2.0 points" in text
    rising = dict(flat, diff=0.2, diff_low=0.1, diff_high=0.3, p=0.001)
    _, text = _verdict_case([1] * 30 + [0] * 10, replication_flags=[1] * 20, validation=rising)
    assert "unconfirmed" not in text and "**replicated**" in text


def test_the_halves_are_each_half_of_the_ids():
    checks, text = _verdict_case([1, 0] * 20)
    halves = checks[checks["set"].str.startswith("eval, half")]
    assert list(halves["diff"]) == [1.0, 0.0]  # the even questions were all right, the odd ones all wrong
    assert "+100.0 [" in text and "+0.0 [" in text
    assert "**unconfirmed**: one half of the eval split does not point the same way" in text


def test_the_markdown_command_prints_the_results_and_checks_as_a_reader_wants_them(tmp_path, capsys):
    answers = {("base", "letter"): _rows([0] * 30), ("merged", "letter"): _rows([1] * 20 + [0] * 10)}
    comparisons = report.primary_comparisons("letter", ["merged vs base"])
    table = report.results_table(answers, primary=comparisons)
    tables = tmp_path / "tables"
    tables.mkdir()
    table.to_csv(tables / f"{report.RESULTS_TABLE}.csv", index=False)
    report.primary_checks(comparisons, {"eval": (answers, None)}).to_csv(tables / f"{report.PRIMARY_TABLE}.csv", index=False)
    report.main(["markdown", str(tmp_path)])
    text = capsys.readouterr().out
    merged = next(line for line in text.splitlines() if line.startswith("| merged | letter |"))
    low, high = (100 * v for v in evaluate.paired_difference_ci(0, 20, 0, 10))
    assert "| 30 | 66.7 [" in merged and f"+66.7 [{low:+.1f}, {high:+.1f}], p = " in merged
    assert ", adjusted " in merged and merged.endswith("| merged vs base |")
    assert "| merged vs base | eval | 30 | +66.7 [" in text
    assert "ci_low" not in text and "p_adj" not in text  # no raw column names
    (tables / f"{report.PRIMARY_TABLE}.csv").unlink()
    with pytest.raises(SystemExit, match="10_primary.csv is missing: run notebook 10"):
        report.main(["markdown", str(tmp_path)])


def test_a_half_with_none_of_a_readings_questions_is_no_row():
    answers = {("base", "generate"): _rows([0, 1]), ("merged", "generate"): _rows([1, 1])}  # the first 2 questions only
    comparisons = report.primary_comparisons("generate", ["merged vs base"])
    checks = report.primary_checks(comparisons, {"eval": (answers, None), "eval, half 1": (answers, ["q0", "q5"]),
                                                 "eval, half 2": (answers, ["q7", "q9"])})
    assert list(checks["set"]) == ["eval", "eval, half 1"] and list(checks["n"]) == [2, 1]


def test_the_verdict_says_so_when_only_validation_or_the_replication_set_shows_a_difference():
    rising = {"step": 24, "n": 100, "diff": 0.2, "diff_low": 0.1, "diff_high": 0.3, "p": 0.001}
    _, text = _verdict_case([1] * 2 + [0] * 38, replication_flags=[1] * 20, validation=rising)
    assert "no significant difference" in text
    assert "the independent replication set shows a difference that eval does not" in text
    assert "a gain there that eval does not show" in text
    assert "validation and eval disagree: validation shows a gain, eval none" in text


# GRPO's comparison with the model it was trained from (vs_start): ten questions, by hand
#   base   right on none;  merged on q0-q2;  grpo on q0, q1, q3-q7
#   grpo vs merged: both right 2 (q0, q1), merged only 1 (q2), grpo only 5 (q3-q7), neither 2 (q8, q9)
#   exact McNemar: 1 of 6 discordant, two-sided 2 * P(X <= 1 | 6, 1/2) = 2 * 7/64 = 14/64; difference +4/10
#   merged vs base: 3 of 3 discordant one way, p = 2/8; grpo vs base: 7 of 7, p = 2/128
#   Holm over the two pre-registered ones: 14/64 * 2 = 0.4375, then max(0.4375, 2/8 * 1): both 0.4375
GRPO_CASE = {("base", "letter"): _rows([0] * 10), ("merged", "letter"): _rows([1, 1, 1] + [0] * 7),
             ("grpo", "letter"): _rows([1, 1, 0, 1, 1, 1, 1, 1, 0, 0])}


def test_grpo_vs_merged_parses_as_the_comparison_with_the_model_it_started_from():
    plain, passages = report.primary_comparisons("debiased", ["grpo vs merged", "grpo+rag bm25 vs merged+rag bm25"])
    assert (plain.model, plain.evaluation, plain.suffix, plain.other) == ("grpo", "debiased", "vs_start",
                                                                          ("merged", "debiased"))
    assert (passages.suffix, passages.evaluation, passages.other) == ("vs_start", "debiased+rag bm25",
                                                                      ("merged", "debiased+rag bm25"))
    for wrong in ("merged vs grpo", "full vs merged", "grpo vs full", "grpo+rag bm25 vs merged"):
        with pytest.raises(ValueError, match=f"'{re.escape(wrong)}' is neither .*'grpo vs merged'"):
            report.primary_comparisons("debiased", [wrong])


def test_the_start_models_are_what_grpo_starts_from():
    from medqa_zh import grpo

    assert report.START_MODELS == {grpo.NAME: grpo.START}


def test_results_table_compares_grpo_with_merged_on_the_same_questions_in_the_primary_family():
    comparisons = report.primary_comparisons("letter", ["merged vs base", "grpo vs merged"])
    table = report.results_table(GRPO_CASE, primary=comparisons)
    row = table.set_index(["model", "evaluation"])
    grpo = row.loc[("grpo", "letter")]
    assert grpo["p_vs_start"] == pytest.approx(14 / 64) and grpo["diff_vs_start"] == pytest.approx(0.4)
    assert (grpo["diff_vs_start_low"], grpo["diff_vs_start_high"]) == evaluate.paired_difference_ci(2, 5, 1, 2)
    assert grpo["detectable_vs_start"] == evaluate.detectable_difference(10, 6)
    assert grpo["p_adj_vs_start"] == pytest.approx(0.4375) and grpo["family_vs_start"] == "primary"
    assert row.loc[("merged", "letter"), "p_adj_vs_base"] == pytest.approx(0.4375)
    # grpo against the base: measured, exploratory (a family of one)
    assert grpo["p_vs_base"] == pytest.approx(2 / 128) == grpo["p_adj_vs_base"]
    assert grpo["family_vs_base"] == "exploratory"
    assert grpo["primary"] == "grpo vs merged"
    # only a model trained from another has the comparison
    assert row[["p_vs_start"]].drop(("grpo", "letter")).isna().all().all()
    assert set(row.drop(("grpo", "letter"))["family_vs_start"]) == {""}
    # the families are those of holm_families, over all three suffixes
    families = report.holm_families(table, comparisons)
    grpo_index = list(table.index[(table["model"] == "grpo")])[0]
    assert ((grpo_index, "vs_start"), pytest.approx(0.4375)) in families["primary"]


def test_the_verdict_speaks_of_grpo_vs_merged_and_says_it_has_no_validation_evidence():
    comparisons = report.primary_comparisons("letter", ["merged vs base", "grpo vs merged"])
    table = report.results_table(GRPO_CASE, primary=comparisons)
    rising = {"step": 24, "n": 100, "diff": 0.2, "diff_low": 0.1, "diff_high": 0.3, "p": 0.001}
    text = report.verdict(table, report.primary_checks(comparisons, {"eval": (GRPO_CASE, None)}), comparisons, "letter",
                          rising)
    line = next(s for s in text.splitlines() if s.startswith("- **grpo vs merged**"))
    assert line.startswith("- **grpo vs merged** (letter): no significant difference")
    assert "eval, n = 10: +40.0 points [unadjusted 95% CI" in line and "p = 0.22, adjusted p = 0.44" in line
    assert "no validation evidence (grpo was trained on train-split prompts" in line
    assert "02's learning curve" not in line  # that curve is merged's SFT run, not GRPO's
    merged = next(s for s in text.splitlines() if s.startswith("- **merged vs base**"))
    assert "validation (02's learning curve" in merged and "no validation evidence" not in merged
    assert "adjusted among the 2 pre-registered comparisons alone" in text and "other 1 paired differences" in text
    words = report.significance(table)
    assert "primary: **grpo / letter** against the model it was trained from, merged (n = 10)" in words
    assert "exploratory: **grpo / letter** against the base model" in words


def test_the_readable_table_and_the_index_show_the_difference_with_the_start_model(tmp_path):
    comparisons = report.primary_comparisons("letter", ["merged vs base", "grpo vs merged"])
    table = report.results_table(GRPO_CASE, primary=comparisons)
    readable = report.readable_frame(table).set_index(["model", "reading"])
    column = "Δ vs start model [unadjusted 95% CI], p, Holm-adjusted p (family)"
    low, high = evaluate.paired_difference_ci(2, 5, 1, 2)
    assert readable.loc[("grpo", "letter"), column] == \
        f"+40.0 [{100 * low:+.1f}, {100 * high:+.1f}], p = 0.22, adjusted 0.44 (primary)"
    assert readable.loc[("merged", "letter"), column] == "—"
    # the detectable difference of grpo's row is its comparison with merged (the nearer one), not with the base
    assert readable.loc[("grpo", "letter"), "detectable Δ (80% power, from the observed disagreement)"] == \
        f"{100 * evaluate.detectable_difference(10, 6):.1f}"
    # a grpo that answers as merged does: no question discordant, so no detectable difference, not the base's instead
    same = {**GRPO_CASE, ("grpo", "letter"): GRPO_CASE["merged", "letter"]}
    same_row = report.readable_frame(report.results_table(same)).set_index(["model", "reading"]).loc[("grpo", "letter")]
    assert same_row["detectable Δ (80% power, from the observed disagreement)"] == ""
    assert same_row[column].startswith("+0.0 [") and same_row[column].endswith("p = 1, adjusted 1 (exploratory)")
    files.write_table(table, tmp_path / "tables" / f"{report.RESULTS_TABLE}.csv")
    page = report.write_index(tmp_path, ["10_report"]).read_text(encoding="utf-8")
    assert f"<th>{column}</th>" in page and "(grpo: merged)" in page


def test_the_index_lists_a_notebook_between_two_in_series_order(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for name in ("10_report", "04b_grpo", "05_serve", "04_merge", "README"):
        (notebooks / f"{name}.ipynb").write_text("{}")
    out = tmp_path / "outputs" / "smoke"
    report.main(["index", str(out), "--notebooks", str(notebooks)])
    page = (out / "reports" / "index.html").read_text(encoding="utf-8")
    assert re.findall(r"<tr><td>(\w+)</td>", page) == ["04_merge", "04b_grpo", "05_serve", "10_report"]


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu", "gpu-multi"])
def test_every_profiles_pre_registration_parses_and_the_gpu_runs_name_grpo_vs_merged(project, profile):
    from medqa_zh import config

    cfg = config.load(profile)
    reading, comparisons = report.primary(cfg)
    named = {c.name: c.suffix for c in comparisons}
    if profile == "cpu":  # GRPO off there (grpo.max_steps: 0): nothing about it is pre-registered
        assert "grpo vs merged" not in named
    else:
        assert named["grpo vs merged"] == "vs_start" and "grpo" in cfg["eval.direct_models"]


def test_the_index_shows_the_planted_effects_after_the_verdict_where_10_wrote_them(tmp_path):
    """smoke: 10's table of planted effects (planted.TABLE) follows the verdict on the index, as a reader wants it;
    a run without one (real data) shows no such section."""
    tables = tmp_path / "tables"
    files.write_text(tables / f"{report.VERDICT_TEXT}.md", "- **merged vs base** (debiased): no difference.")
    page = report.write_index(tmp_path, ["10_report"]).read_text(encoding="utf-8")
    assert "What was planted" not in page
    found = pd.DataFrame([
        {"effect": "SFT teaches facts (eval)", "planted": "trained-fact questions", "measured": 0.35, "ci_low": 0.22,
         "ci_high": 0.47, "n": 60, "kind": "difference", "threshold": "95% low end >= +0.20", "found": "found",
         "how": "merged vs base"},
        {"effect": "letter skew, plain reading", "planted": "C in 60%", "measured": 0.97, "ci_low": 0.93,
         "ci_high": 0.99, "n": 150, "kind": "share", "threshold": ">= 0.40", "found": "found", "how": "share"}])
    files.write_table(found, tables / planted.TABLE)
    page = report.write_index(tmp_path, ["10_report"]).read_text(encoding="utf-8")
    body = page.split("</h1>", 1)[1]
    assert body.index("</section>") < body.index("What was planted, and what this run found")
    assert "<td>+0.35 [0.22, 0.47]</td>" in body and "<td>0.97 [0.93, 0.99]</td>" in body
