"""Compare lm-evaluation-harness's answers (``--log_samples``) with notebook 07's API results for the
same questions: same raw text, same letter, and both accuracies.

    .venv/bin/python bench/lm_eval/compare.py outputs/cpu/lm_eval outputs/cpu/eval/api/merged-api-transformers-t16-<fingerprint>.jsonl
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lib"))

from medqa_zh import answers  # noqa: E402


def samples(folder: Path) -> dict:
    """id -> (raw text, letter) from the newest ``samples_medqa_zh_*.jsonl`` under ``folder``."""
    files = sorted(Path(folder).rglob("samples_medqa_zh_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        sys.exit(f"error: no samples_medqa_zh_*.jsonl under {folder}; run lm_eval with --log_samples --output_path {folder}")
    out = {}
    for line in files[-1].read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        text = s["resps"][0][0]
        out[s["doc"]["id"]] = (text, answers.extract_letter(text, "".join(sorted(json.loads(s["doc"]["options"])))))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lm_eval_output", type=Path, help="lm_eval's --output_path")
    p.add_argument("results", type=Path, help="the project's API results jsonl for the same questions (07)")
    a = p.parse_args(argv)
    harness = samples(a.lm_eval_output)
    ours = {r["id"]: r for r in map(json.loads, a.results.read_text(encoding="utf-8").splitlines())}
    ids = [i for i in harness if i in ours]
    if not ids:
        sys.exit("error: the two files share no question id")
    same_text = sum(harness[i][0].strip() == (ours[i]["text"] or "").strip() for i in ids)
    same_letter = sum(harness[i][1] == ours[i]["pred"] for i in ids)
    acc = lambda pred: sum(pred(i) == ours[i]["gold"] for i in ids) / len(ids)  # noqa: E731
    print(f"questions in both: {len(ids)}\nsame raw text: {same_text}/{len(ids)}\nsame letter: {same_letter}/{len(ids)}\n"
          f"accuracy, lm-evaluation-harness: {acc(lambda i: harness[i][1]):.3f}\n"
          f"accuracy, this project (07):     {acc(lambda i: ours[i]['pred']):.3f}")
    for i in [i for i in ids if harness[i][0].strip() != (ours[i]["text"] or "").strip()][:5]:
        print(f"  differs: {i}: harness {harness[i][0]!r} / 07 {ours[i]['text']!r}")


if __name__ == "__main__":
    main()
