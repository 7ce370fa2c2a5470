"""run_all.sh: runs the notebooks in order, stops at the first failure and says where it is."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from helpers import REPO

pytestmark = pytest.mark.slow


def _notebook(path: Path, *cells: str) -> None:
    first = nbformat.v4.new_code_cell('profile = "unset"')
    first.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[first, *(nbformat.v4.new_code_cell(c) for c in cells)])
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    nbformat.write(nb, path)


@pytest.fixture
def fake_project(tmp_path):
    """A copy of run_all.sh over three small notebooks, using this test run's environment as it is."""
    if not (Path(sys.prefix) / "share" / "jupyter" / "kernels" / "medqa-zh").is_dir():
        pytest.skip("needs the environment that ./run_all.sh set up (run the tests with ./run_all.sh test)")
    root = tmp_path / "proj"
    (root / "notebooks").mkdir(parents=True)
    for name in ("run_all.sh", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "profiles", root / "profiles")
    (root / ".venv").symlink_to(sys.prefix)
    _notebook(root / "notebooks" / "01_ok.ipynb", "print('first ran with', profile)")
    _notebook(root / "notebooks" / "02_fail.ipynb", "x = 1", "raise RuntimeError('boom in 02')")
    _notebook(root / "notebooks" / "03_after.ipynb", "open('ran_03', 'w').close()")
    return root


def test_stops_at_the_first_failing_notebook_and_names_it(fake_project):
    env = {**os.environ, "MEDQA_USE_VENV": "1", "MEDQA_SKIP_SETUP": "1"}
    proc = subprocess.run(["./run_all.sh"], cwd=fake_project, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "SMOKE PROFILE" in log
    assert "02_fail failed" in log and "outputs/smoke/runs/02_fail.ipynb" in log
    runs, reports = fake_project / "outputs" / "smoke" / "runs", fake_project / "outputs" / "smoke" / "reports"
    assert (runs / "01_ok.ipynb").is_file() and (reports / "01_ok.html").is_file()
    assert "boom in 02" in (runs / "02_fail.ipynb").read_text(encoding="utf-8")
    assert not (runs / "03_after.ipynb").exists() and not (fake_project / "notebooks" / "ran_03").exists()
    # the profile reached the notebook as a papermill parameter
    assert "first ran with smoke" in (runs / "01_ok.ipynb").read_text(encoding="utf-8")


def test_a_notebook_that_cannot_start_is_reported_without_a_copy(fake_project):
    (fake_project / "notebooks" / "02_fail.ipynb").write_text("{not a notebook", encoding="utf-8")
    env = {**os.environ, "MEDQA_USE_VENV": "1", "MEDQA_SKIP_SETUP": "1"}
    proc = subprocess.run(["./run_all.sh"], cwd=fake_project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "02_fail failed before any cell ran" in proc.stderr
    assert not (fake_project / "outputs" / "smoke" / "runs" / "03_after.ipynb").exists()


def test_unknown_profile_and_argument_are_refused(fake_project):
    env = {**os.environ, "MEDQA_USE_VENV": "1", "MEDQA_SKIP_SETUP": "1"}
    proc = subprocess.run(["./run_all.sh", "--profile", "nope"], cwd=fake_project, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "no profile 'nope'" in proc.stderr
    proc = subprocess.run(["./run_all.sh", "--bogus"], cwd=fake_project, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown argument '--bogus'" in proc.stderr
