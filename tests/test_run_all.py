"""run_all.sh: runs the notebooks in order, stops at the first failure and says where it is,
resumes (--from) or runs one (--only), and keeps reports/index.html up to date."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a hang fails with its stack; at least 5x the longest such test measured with both cores busy


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


def test_a_notebook_between_two_runs_between_them_and_is_named_by_its_number(fake_project):
    """04b_grpo runs after 04 and before 05 whatever the locale's collation, and --only / --from take its number."""
    (fake_project / "notebooks" / "02_fail.ipynb").unlink()
    _notebook(fake_project / "notebooks" / "01b_between.ipynb", "open('ran_01b', 'w').close()")
    env = {**os.environ, "MEDQA_USE_VENV": "1", "MEDQA_SKIP_SETUP": "1", "LC_ALL": "en_US.UTF-8"}
    proc = subprocess.run(["./run_all.sh"], cwd=fake_project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    order = [line.split(": running")[0].split()[-1] for line in proc.stdout.splitlines() if ": running" in line]
    assert order == ["01_ok", "01b_between", "03_after"]
    runs = fake_project / "outputs" / "smoke" / "runs"
    for args, ran in ((["--only", "1b"], ["01b_between"]), (["--from", "01b"], ["01b_between", "03_after"])):
        shutil.rmtree(runs)
        proc = subprocess.run(["./run_all.sh", *args], cwd=fake_project, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and sorted(p.stem for p in runs.iterdir()) == ran, (args, proc.stderr)
    page = (fake_project / "outputs" / "smoke" / "reports" / "index.html").read_text(encoding="utf-8")
    assert page.index("01_ok") < page.index("01b_between") < page.index("03_after")


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


RUN_ALL = (REPO / "run_all.sh").read_text(encoding="utf-8")
TORCH = re.search(r"^TORCH_VERSION=(\S+)$", RUN_ALL, re.M).group(1)
CPU_INDEX = re.search(r"^TORCH_CPU_INDEX=(\S+)$", RUN_ALL, re.M).group(1)


def _environment_yml() -> tuple[list[str], list[str], list[str]]:
    """environment.yml's channels, conda packages and pip lines."""
    yml = yaml.safe_load((REPO / "environment.yml").read_text(encoding="utf-8"))
    deps = yml["dependencies"]
    return yml["channels"], [d for d in deps if isinstance(d, str)], next(d["pip"] for d in deps if isinstance(d, dict))


def _fake_setup(tmp_path: Path, env_dir: str = ".venv") -> tuple[Path, Path, dict]:
    """A copy of run_all.sh whose environment's python is a fake that records each call (args | pip's index
    settings | CONDA_PREFIX). Its probe of PyTorch's CPU index succeeds when $CPU_INDEX_UP=1, and its install of
    torch==...+cpu when $CPU_WHEEL=1; a fake c++ stands for a compiler and nvidia-smi finds no GPU."""
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("run_all.sh", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "profiles", root / "profiles")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    python = ('#!/bin/sh\necho "$* | index=${PIP_INDEX_URL:-} config=${PIP_CONFIG_FILE:-} conda=${CONDA_PREFIX:-}"'
              ' >> "$CALLS"\ncase "$*" in\n  *urlopen*) [ "$CPU_INDEX_UP" = 1 ] ;;\n'
              '  *+cpu*) [ "$CPU_WHEEL" = 1 ] ;;\nesac\n')
    fakes = {tmp_path / "fake-python": python,
             bin_dir / "nvidia-smi": "#!/bin/sh\nexit 1\n",  # no GPU here, whatever the test machine has
             bin_dir / "chromium": "#!/bin/sh\nexit 0\n",    # the browser test's check, not an apt-get install
             bin_dir / "c++": "#!/bin/sh\nexit 0\n"}         # a compiler, whatever the test machine has
    for f, text in fakes.items():
        f.write_text(text)
        f.chmod(0o755)
    if env_dir == ".venv":
        (root / ".venv" / "bin").mkdir(parents=True)
        shutil.copy(tmp_path / "fake-python", root / ".venv" / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("MEDQA_SKIP_SETUP", "MEDQA_USE_VENV", "CONDA_PREFIX")}
    env.update(CALLS=str(calls), FAKE_PYTHON=str(tmp_path / "fake-python"), CPU_INDEX_UP="1", CPU_WHEEL="1",
               PATH=f"{bin_dir}:{os.environ['PATH']}")
    if env_dir == ".venv":
        env["MEDQA_USE_VENV"] = "1"
    return root, calls, env


@pytest.mark.skipif(sys.platform != "linux", reason="PyTorch's CPU index is used on Linux")
@pytest.mark.parametrize("case", ["cpu index", "cpu index unreachable", "cpu index without the wheel"])
def test_setup_takes_cpu_torch_from_pytorchs_index_else_from_pips_own_configuration(tmp_path, case):
    """Without CUDA, torch (the tested release) comes from PyTorch's CPU index as +cpu where that index answers;
    else (an offline mirror) from pip's configured index, and one line says which. Every other install goes where
    pip is told (PIP_INDEX_URL, pip.conf): the script names no other index."""
    root, calls, env = _fake_setup(tmp_path)
    env.update(CPU_INDEX_UP=str(int(case != "cpu index unreachable")), CPU_WHEEL=str(int(case == "cpu index")))
    mirror, conf = "https://mirrors.example.cn/pypi/simple", str(tmp_path / "pip.conf")
    env.update(PIP_INDEX_URL=mirror, PIP_CONFIG_FILE=conf)
    proc = subprocess.run(["./run_all.sh", "test", "-q"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    probes = [line for line in lines if "urlopen" in line]
    assert len(probes) == 1 and f"{CPU_INDEX}/torch/ |" in probes[0] and "timeout=5" in probes[0]
    pip = [line.split(" | ")[0] for line in lines if line.startswith("-m pip ")]
    cpu_try = f"-m pip install --quiet torch=={TORCH}+cpu --index-url {CPU_INDEX}"
    fallback = f"-m pip install --quiet torch=={TORCH}"
    torch = {"cpu index": [cpu_try], "cpu index unreachable": [fallback],
             "cpu index without the wheel": [cpu_try, fallback]}[case]
    _, _, pip_lines = _environment_yml()
    extras = next(line for line in pip_lines if line.startswith("-e "))[len("-e "):]
    assert pip == ["-m pip install --quiet --upgrade pip", *torch, f"-m pip install --quiet -e {extras}"]
    assert "-m medqa_zh.export install-tools" in [line.split(" | ")[0] for line in lines]  # through pip too, same index
    said = [line for line in proc.stdout.splitlines() if "torch==" in line]
    if case == "cpu index":
        assert len(said) == 1 and f"torch=={TORCH}+cpu from PyTorch's CPU index ({CPU_INDEX})" in said[0]
    elif case == "cpu index unreachable":
        assert len(said) == 1 and f"torch=={TORCH} from pip's configured index: PyTorch's CPU index" in said[0]
        assert "cannot be reached" in said[0]
    else:
        assert len(said) == 2 and "that failed" in said[1] and "pip's configured index" in said[1]
    pip_calls = [line for line in lines if line.startswith("-m pip ")]
    assert all(line.endswith(f"| index={mirror} config={conf} conda=") for line in pip_calls)  # pip's own settings
    named = [line.split(" | ")[0] for line in pip_calls if any(flag in line.split(" | ")[0].split() for flag in
                                                               ("-i", "--index-url", "--extra-index-url", "--trusted-host"))]
    assert named == ([cpu_try] if case != "cpu index unreachable" else [])  # only torch's CPU build names an index
    assert lines[-1].startswith("-m pytest -q")  # then the tests ran


def _path_without_a_compiler(folder: Path) -> str:
    """A PATH folder with every program on this PATH but the C++ compilers (c++, g++, clang++, g++-12,
    x86_64-linux-gnu-g++, ...): a machine where ./run_all.sh finds none."""
    import re

    folder.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            if (re.fullmatch(r"(.*-)?(c\+\+|g\+\+|clang\+\+)(-[\d.]+)?", entry.name) or entry.is_dir()
                    or os.path.lexists(folder / entry.name) or not os.access(entry.path, os.X_OK)):
                continue
            (folder / entry.name).symlink_to(entry.path)
    return str(folder)


def test_without_a_compiler_setup_leaves_out_the_gguf_extra_says_so_and_adds_it_once_there_is_one(tmp_path):
    """No C++ compiler: everything but the gguf extra (which builds llama.cpp) is installed, one line says what that
    turns off and how to get it, and the stamp records it, so a later run with a compiler installs it. A fake
    interpreter records each call."""
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("run_all.sh", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "profiles", root / "profiles")
    bin_dir, env_bin = tmp_path / "bin", root / ".venv" / "bin"
    bin_dir.mkdir()
    env_bin.mkdir(parents=True)
    calls = tmp_path / "calls.log"
    fakes = {env_bin / "python": '#!/bin/sh\necho "$*" >> "$CALLS"\n',
             bin_dir / "nvidia-smi": "#!/bin/sh\nexit 1\n",  # no GPU here, whatever the test machine has
             bin_dir / "chromium": "#!/bin/sh\nexit 0\n"}   # the browser test's check, not an apt-get install
    for f, text in fakes.items():
        f.write_text(text)
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "MEDQA_SKIP_SETUP")}
    env.update(MEDQA_USE_VENV="1", CALLS=str(calls), PATH=f"{bin_dir}:{_path_without_a_compiler(tmp_path / 'no-cxx')}")
    stamp = root / ".venv" / ".medqa-installed"

    def setup_and_test():
        calls.unlink(missing_ok=True)
        proc = subprocess.run(["./run_all.sh", "test", "-q"], cwd=root, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = calls.read_text().splitlines()
        assert lines[-1] == "-m pytest -q"  # then the tests ran
        return proc.stdout, lines

    out, lines = setup_and_test()
    said = [line for line in out.splitlines() if "no C++ compiler" in line]
    assert len(said) == 1, out
    for part in ("without the gguf extra", "04's GGUF export and its proofs", "07's llama.cpp evaluation",
                 "serve.backend llamacpp", "sudo apt install g++;", "conda install -c conda-forge cxx-compiler",
                 "then ./run_all.sh again"):
        assert part in said[0], part
    assert [line for line in lines if line.startswith("-m pip install --quiet -e ")] == ["-m pip install --quiet -e .[dev,watch]"]
    assert not [line for line in lines if "install-tools" in line]  # it needs llama-cpp-python's sdist
    assert stamp.read_text().split()[-1] == "extras=dev,watch"
    # a compiler now: the stamp's extras differ, so the gguf extra and llama.cpp's converter are installed
    (bin_dir / "c++").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "c++").chmod(0o755)
    out, lines = setup_and_test()
    assert "no C++ compiler" not in out
    assert [line for line in lines if line.startswith("-m pip install --quiet -e ")] == ["-m pip install --quiet -e .[dev,gguf,watch]"]
    assert "-m medqa_zh.export install-tools" in lines and stamp.read_text().split()[-1] == "extras=dev,gguf,watch"
    # and then nothing more to install
    out, lines = setup_and_test()
    assert not [line for line in lines if line.startswith("-m pip")]


@pytest.mark.skipif(sys.platform != "linux", reason="PyTorch's CPU index is used on Linux")
def test_conda_setup_makes_environment_yml_s_environment_and_exec_runs_in_it_activated(tmp_path):
    """Where conda is on PATH, ./.conda gets environment.yml's conda packages from its channel (cxx-compiler
    included), is activated as `conda activate` does (its compiler's CXX), and gets environment.yml's extras and
    torch; `exec` then runs in it, activated. A fake conda records its calls (conda is not installed here)."""
    root, calls, env = _fake_setup(tmp_path, env_dir=".conda")
    conda = tmp_path / "bin" / "conda"
    conda.write_text('#!/bin/sh\necho "conda $*" >> "$CALLS"\ncase "$1" in\n'
                     '  create) while [ $# -gt 0 ]; do [ "$1" = --prefix ] && prefix=$2; shift; done\n'
                     '          mkdir -p "$prefix/bin" && cp "$FAKE_PYTHON" "$prefix/bin/python" ;;\n'
                     '  shell.bash) [ "$2" = activate ] && echo "export CONDA_PREFIX=\'$3\' PATH=\'$3/bin\':\\"\\$PATH\\"" ;;\n'
                     'esac\n')
    conda.chmod(0o755)
    proc = subprocess.run(["./run_all.sh", "test", "-q"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prefix = str(root / ".conda")
    lines = calls.read_text().splitlines()
    creates = [line.split() for line in lines if line.startswith("conda create")]
    assert len(creates) == 1, lines
    args = creates[0][2:]
    assert args[:4] == ["--quiet", "--yes", "--prefix", prefix], args
    channels = [args[i + 1] for i, a in enumerate(args) if a == "-c"]
    packages = [a for i, a in enumerate(args[4:], 4) if not a.startswith("-") and args[i - 1] != "-c"]
    yml_channels, yml_packages, yml_pip = _environment_yml()
    assert channels == yml_channels and packages == yml_packages and "cxx-compiler" in packages
    assert f"conda shell.bash activate {prefix}" in lines
    pip = [line for line in lines if line.startswith("-m pip ")]
    assert all(line.endswith(f"conda={prefix}") for line in pip)  # every install ran in the activated environment
    installs = [line.split(" | ")[0] for line in pip]
    extras = next(line for line in yml_pip if line.startswith("-e "))[len("-e "):]
    assert installs[-1] == f"-m pip install --quiet -e {extras}"  # environment.yml's extras
    # and environment.yml's torch: the same release, from the same CPU index
    assert f"-m pip install --quiet torch=={TORCH}+cpu --index-url {CPU_INDEX}" in installs
    assert f"torch=={TORCH}" in yml_pip and f"--extra-index-url {CPU_INDEX}" in yml_pip
    # exec: in the folder it was typed in, in the activated environment
    (root / "notebooks").mkdir()
    proc = subprocess.run(["../run_all.sh", "exec", "sh", "-c", 'echo "$CONDA_PREFIX"; pwd; command -v python'],
                          cwd=root / "notebooks", env={**env, "MEDQA_SKIP_SETUP": "1"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [prefix, str(root / "notebooks"), f"{prefix}/bin/python"]


def test_exec_runs_a_command_in_the_environment_in_the_folder_it_was_typed_in(tmp_path):
    """`./run_all.sh exec CMD ARGS` runs CMD with the environment's bin first on PATH, from the caller's folder,
    with its arguments as given, and exits with CMD's status. A real (empty) venv, not the one running this test."""
    root = tmp_path / "proj"
    (root / "notebooks").mkdir(parents=True)
    for name in ("run_all.sh", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "profiles", root / "profiles")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / ".venv")], check=True, timeout=120)
    env = {**os.environ, "MEDQA_USE_VENV": "1", "MEDQA_SKIP_SETUP": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["../run_all.sh", "exec", *args], cwd=root / "notebooks", env=env, capture_output=True, text=True,
                              timeout=60)

    proc = run("python", "-c", "import os, sys; print(sys.prefix); print(os.getcwd()); print(sys.argv[1:])", "a b", "c")
    assert proc.returncode == 0, proc.stderr
    prefix, cwd, argv = proc.stdout.splitlines()
    assert Path(prefix) == root / ".venv" and Path(prefix) != Path(sys.prefix)
    assert Path(cwd) == root / "notebooks" and argv == "['a b', 'c']"
    assert run("python", "-c", "raise SystemExit(3)").returncode == 3
    proc = run()
    assert proc.returncode != 0 and "exec needs a command" in proc.stderr
    shutil.rmtree(root / ".venv")  # no environment: it says so
    proc = run("python", "-c", "")
    assert proc.returncode != 0 and "no environment at" in proc.stderr


DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_docs_give_commands_that_work_in_venv_and_conda_alike():
    """No README/docs command names .venv/bin/ (there is no such folder in ./.conda): they go through
    `./run_all.sh exec`, and each program they run that way is one the environment installs."""
    venv_lines = [f"{p.relative_to(REPO)}:{i}" for p in DOCS
                  for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ".venv/bin" in line]
    assert not venv_lines
    programs = {m.group(1) for p in DOCS for m in re.finditer(r"run_all\.sh exec ([a-z][\w.-]*)",
                                                              p.read_text(encoding="utf-8"))}
    assert {"python", "jupyter", "papermill", "tensorboard", "trackio", "accelerate"} <= programs
    bin_dir = Path(sys.prefix) / "bin"
    assert not [p for p in programs if not (bin_dir / p).exists()]
    # nor does a command line of a bash block run one of the environment's programs bare (after VAR=value and
    # `cd x &&`): that works only in an activated environment
    env_program = r"(?:python3?|pip|accelerate|torchrun|jupyter|papermill|tensorboard|trackio)\s"
    bare = [f"{p.name}: {line}" for p in DOCS for block in re.findall(r"```bash\n(.*?)```", p.read_text(encoding="utf-8"), re.S)
            for line in block.splitlines() if re.match(rf"\s*(?:\w+=\S+\s+)*(?:cd \S+ && )?{env_program}", line)]
    assert not bare


def _wheel(index: Path, version: str) -> None:
    """An empty `torch` wheel of this version in a PEP 503 simple index (one stands for PyPI, one for PyTorch's)."""
    import zipfile

    (index / "torch").mkdir(parents=True)
    name, info = f"torch-{version}-py3-none-any.whl", f"torch-{version}.dist-info"
    with zipfile.ZipFile(index / "torch" / name, "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    (index / "torch" / "index.html").write_text(f'<html><body><a href="{name}">{name}</a></body></html>')


def test_environment_yml_takes_cpu_torch_from_pytorchs_index_else_from_the_configured_one(tmp_path):
    """conda's pip section (pip install -r of its lines): where PyTorch's CPU index answers, pip prefers its
    torch==X+cpu to the configured index's X (a local version sorts after its public one); where it cannot be
    reached, pip warns and takes X from the configured index. Real pip, dry run, two local indexes."""
    _, _, pip_lines = _environment_yml()
    reqs = [line for line in pip_lines if not line.startswith("-e ")]  # the project itself is not under test
    pypi, cpu = tmp_path / "pypi", tmp_path / "cpu"
    _wheel(pypi, TORCH)
    _wheel(cpu, f"{TORCH}+cpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip.conf (its mirrors, find-links) stays out
    for cpu_url, expected in ((cpu.as_uri(), f"{TORCH}+cpu"), ("https://download.pytorch.invalid/whl/cpu", TORCH)):
        (tmp_path / "req.txt").write_text("\n".join(line.replace(CPU_INDEX, cpu_url) for line in reqs) + "\n")
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
                               "--quiet", "--retries", "0", "--timeout", "5", "--index-url", pypi.as_uri(),
                               "-r", str(tmp_path / "req.txt"), "--report", str(tmp_path / "report.json")],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / "report.json").read_text())
        assert [i["metadata"]["version"] for i in report["install"]] == [expected], cpu_url
