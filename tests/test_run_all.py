"""run_all.sh: runs the notebooks in order, stops at the first failure and says where it is,
resumes (--from) or runs one (--only), and keeps reports/index.html up to date."""
import json
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
    (root / "lib" / "medqa_zh").mkdir(parents=True)
    shutil.copy(REPO / "lib" / "medqa_zh" / "report.html.j2", root / "lib" / "medqa_zh")
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
    assert "./run_all.sh --profile smoke --from 02" in log  # how to resume
    runs, reports = fake_project / "outputs" / "smoke" / "runs", fake_project / "outputs" / "smoke" / "reports"
    assert (runs / "01_ok.ipynb").is_file() and (reports / "01_ok.html").is_file()
    assert "boom in 02" in (runs / "02_fail.ipynb").read_text(encoding="utf-8")
    assert not (runs / "03_after.ipynb").exists() and not (fake_project / "notebooks" / "ran_03").exists()
    # the profile reached the notebook as a papermill parameter
    assert "first ran with smoke" in (runs / "01_ok.ipynb").read_text(encoding="utf-8")
    # the index knows what ran, how long it took and what failed
    timings = json.loads((reports / "timings.json").read_text())
    assert timings["01_ok"]["status"] == "ok" and timings["02_fail"]["status"] == "failed"
    page = (reports / "index.html").read_text(encoding="utf-8")
    assert "<a href='01_ok.html'>" in page and "<td>03_after</td><td>not run</td>" in page


def test_from_resumes_and_only_runs_one(fake_project):
    env = {**os.environ, "MEDQA_USE_VENV": "1", "MEDQA_SKIP_SETUP": "1"}
    proc = subprocess.run(["./run_all.sh", "--from", "3"], cwd=fake_project, env=env, capture_output=True,
                          text=True, timeout=300)
    runs = fake_project / "outputs" / "smoke" / "runs"
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in runs.iterdir()] == ["03_after.ipynb"] and (fake_project / "notebooks" / "ran_03").exists()
    assert "1 notebook(s) ran in" in proc.stdout and "reports/index.html" in proc.stdout
    proc = subprocess.run(["./run_all.sh", "--only", "01"], cwd=fake_project, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["01_ok.ipynb", "03_after.ipynb"]
    timings = json.loads((fake_project / "outputs" / "smoke" / "reports" / "timings.json").read_text())
    assert set(timings) == {"01_ok", "03_after"}
    for args, message in ((["--only", "07"], "no notebook matches --only 07"), (["--from", "x"], "needs a notebook number"),
                          (["--from", "1", "--only", "2"], "do not go together")):
        proc = subprocess.run(["./run_all.sh", *args], cwd=fake_project, env=env, capture_output=True, text=True)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)


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
    choices = proc.stderr.split("choose one of ")[1].split()
    assert sorted(choices) == ["cpu", "gpu", "gpu-multi", "smoke"]
    # not base.yaml (not runnable) nor profiles/accelerate/ (accelerate's configs)
    proc = subprocess.run(["./run_all.sh", "--bogus"], cwd=fake_project, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown argument '--bogus'" in proc.stderr


def test_a_gpu_that_pytorch_cannot_see_stops_the_run(fake_project, tmp_path):
    """nvidia-smi answers (old driver) but this CPU build of torch sees no GPU: stop and say why."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$1" in\n  -L) echo "GPU 0: Tesla T4 (UUID: GPU-0)" ;;\n'
                   '  --query-gpu=*) echo "535.183.01" ;;\nesac\n')
    smi.chmod(0o755)
    env = {**os.environ, "MEDQA_USE_VENV": "1", "MEDQA_SKIP_SETUP": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["./run_all.sh", "--only", "01"], cwd=fake_project, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "PyTorch does not" in proc.stderr and "Tesla T4" in proc.stderr and "driver 535.183.01" in proc.stderr
    assert ">= 580" in proc.stderr and "MEDQA_ALLOW_CPU=1" in proc.stderr
    assert not (fake_project / "outputs" / "smoke" / "runs").exists()  # nothing ran on the CPU
    proc = subprocess.run(["./run_all.sh", "--only", "01"], cwd=fake_project, env={**env, "MEDQA_ALLOW_CPU": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_setup_leaves_pips_own_configuration_alone(tmp_path):
    """Behind a mirror (PIP_INDEX_URL, pip.conf) run_all.sh's installs go where pip is told: the script never
    names an index itself, and it still pins the CPU build of torch. A fake interpreter records each call."""
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("run_all.sh", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "profiles", root / "profiles")
    bin_dir, env_bin = tmp_path / "bin", root / ".venv" / "bin"
    bin_dir.mkdir()
    env_bin.mkdir(parents=True)
    calls = tmp_path / "calls.log"
    (env_bin / "python").write_text(
        '#!/bin/sh\necho "$* | index=${PIP_INDEX_URL:-} config=${PIP_CONFIG_FILE:-}" >> "$CALLS"\n')
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 1\n")  # no GPU here, whatever the test machine has
    (bin_dir / "chromium").write_text("#!/bin/sh\nexit 0\n")  # the browser test's check, not an apt-get install
    for f in (env_bin / "python", bin_dir / "nvidia-smi", bin_dir / "chromium"):
        f.chmod(0o755)
    mirror, conf = "https://mirrors.example.cn/pypi/simple", str(tmp_path / "pip.conf")
    env = {**os.environ, "MEDQA_USE_VENV": "1", "CALLS": str(calls), "PIP_INDEX_URL": mirror, "PIP_CONFIG_FILE": conf,
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("MEDQA_SKIP_SETUP", None)
    proc = subprocess.run(["./run_all.sh", "test", "-q"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    pip = [line for line in lines if line.startswith("-m pip ")]
    assert [line.split(" | ")[0] for line in pip] == [
        "-m pip install --quiet --upgrade pip", "-m pip install --quiet torch==2.13.0", "-m pip install --quiet -e .[dev,gguf,watch]"]
    assert "-m medqa_zh.export install-tools" in [line.split(" | ")[0] for line in lines]  # through pip too, same index
    assert all(line.endswith(f"| index={mirror} config={conf}") for line in pip)  # pip's own settings, unchanged
    assert not [line for line in pip if any(flag in line.split(" | ")[0].split() for flag in
                                            ("-i", "--index-url", "--extra-index-url", "--trusted-host"))]
    assert lines[-1].startswith("-m pytest -q")  # then the tests ran
