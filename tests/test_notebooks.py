"""Notebooks run top to bottom in a fresh kernel under papermill, as run_all.sh runs them."""
import csv
import json

import pytest
from helpers import REPO

from medqa_zh import tiny

pytestmark = pytest.mark.slow


def _kernel():
    from jupyter_client.kernelspec import KernelSpecManager

    return "medqa-zh" if "medqa-zh" in KernelSpecManager().find_kernel_specs() else "python3"


def _outputs_text(nb, cell_index):
    parts = []
    for out in nb["cells"][cell_index].get("outputs", []):
        parts.append("".join(out.get("text", "")))
        parts.extend("".join(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


def test_01_data_runs_on_the_smoke_profile(project, tmp_path):
    import papermill

    out = tmp_path / "01_data.ipynb"
    papermill.execute_notebook(
        REPO / "notebooks" / "01_data.ipynb", out, parameters={"profile": "smoke"},
        kernel_name=_kernel(), cwd=REPO / "notebooks", progress_bar=False,
    )
    nb = json.loads(out.read_text(encoding="utf-8"))
    assert "parameters" in nb["cells"][0]["metadata"]["tags"]
    # the smoke warning is the first thing the report shows (cell 1 is papermill's injected parameters)
    assert "SMOKE PROFILE" in _outputs_text(nb, 2)

    run = project / "outputs" / "smoke"
    with open(run / "tables" / "01_splits.csv", encoding="utf-8") as f:
        table = {r["role"]: r for r in csv.DictReader(f)}
    assert int(table["train"]["duplicates_removed"]) == tiny.PLANTED["train_duplicates"]
    assert int(table["eval"]["overlap_with_train_removed"]) == tiny.PLANTED["test_in_train"]
    for role in ("train", "eval"):
        n = sum(1 for _ in open(run / "data" / "sft" / f"{role}.jsonl", encoding="utf-8"))
        assert n == int(table[role]["questions"])
    assert (run / "data" / "llamafactory" / "dataset_info.json").is_file()
    for fig in ("01_answer_letters", "01_question_lengths", "01_top_sections", "01_textbook_sizes"):
        assert (run / "figures" / f"{fig}.png").stat().st_size > 1000
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    assert "01_data" in manifest["notebooks"]


def test_notebooks_are_committed_without_outputs():
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        assert "parameters" in nb["cells"][0]["metadata"].get("tags", []), f"{path.name}: first cell must be the parameters cell"
        for cell in nb["cells"]:
            assert not cell.get("outputs") and not cell.get("execution_count"), f"{path.name} has outputs"
