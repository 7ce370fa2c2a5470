#!/usr/bin/env bash
# Set up the environment and run the notebook series, or the tests.
#
#   ./run_all.sh [--profile NAME] [--from NN | --only NN]   (NN: a notebook's number, 04b included)
#                                   run notebooks/NN_*.ipynb in order with papermill
#                                   (default profile: smoke), export each to HTML and
#                                   write outputs/<profile>/reports/index.html;
#                                   --from 06 resumes at 06, --only 09 runs just 09
#   ./run_all.sh test [PYTEST ARGS] run the test suite (installs the Debian package
#                                   chromium for the browser test when it is missing)
#   ./run_all.sh exec COMMAND [ARGS]
#                                   run COMMAND in this project's environment (.venv or
#                                   .conda, activated), in the folder you typed it in:
#                                   ./run_all.sh exec jupyter lab notebooks/
#
# Setup is idempotent: it makes ./.venv (python -m venv), or ./.conda when conda is
# on PATH (environment.yml's conda packages: python 3.11, pip, cxx-compiler), installs
# this project into it with pip (environment.yml's extras), and reinstalls only when
# pyproject.toml changed. Without a C++ compiler it leaves out the gguf extra (llama.cpp),
# says what that turns off, and goes on. On a machine without CUDA it installs torch 2.13.0, the version
# this project is tested with, as the CPU build from PyTorch's CPU index (Linux), else
# from pip's configured index. MEDQA_USE_VENV=1 ignores conda;
# MEDQA_SKIP_SETUP=1 uses the environment as it is (no install, e.g. offline). Where
# nvidia-smi sees a GPU, the gpu extra (vLLM) is installed too, and PyTorch must see the GPU:
# else the script stops and says which driver is needed (MEDQA_ALLOW_CPU=1 goes on anyway).
#
# Outputs of a run:  outputs/<profile>/runs/NN_*.ipynb     executed notebooks
#                    outputs/<profile>/reports/NN_*.html   their HTML reports
#                    outputs/<profile>/reports/index.html  all of them, wall times, results
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATE="$ROOT/lib/medqa_zh/report.html.j2"  # JupyterLab's HTML, without a require.js fetched from a CDN
GPU_LOCK="$ROOT/requirements/gpu-linux-py311.txt"  # what the gpu extra resolves to (constraints on CUDA machines)
# torch on a machine without CUDA: the release this project is tested with (the public index serves newer ones,
# 2.15 today, never run here), as PyTorch's CPU build: PyPI's Linux wheel is the CUDA one, with GBs of nvidia-* wheels
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
CONDA_PACKAGES=(python=3.11 pip cxx-compiler)  # environment.yml's dependencies, from conda-forge (a test compares)
CALLER_DIR=$PWD  # `exec` runs its command here
# paths in MEDQA_DIR / MEDQA_BASE_MODEL are relative to where you typed the command
for var in MEDQA_DIR MEDQA_BASE_MODEL; do
    if [ -n "${!var:-}" ] && [ -d "${!var}" ]; then export "$var=$(cd "${!var}" && pwd)"; fi
done
cd "$ROOT"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

log() { printf '\033[1m[run_all]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[run_all] error:\033[0m %s\n' "$*" >&2; exit 1; }

# --------------------------------------------------------------------------- setup
has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
# a C++ compiler that pip's cmake build of llama-cpp-python finds: $CXX, else c++, g++ or clang++ on PATH
has_cxx() { local c; for c in ${CXX:+"$CXX"} c++ g++ clang++; do command -v "$c" >/dev/null 2>&1 && return 0; done; return 1; }

# in ./.conda, what `conda activate` does: PATH, CONDA_PREFIX, and the packages' activation scripts
# (cxx-compiler's sets CXX/CC to conda's compiler, which pip's build of llama.cpp then uses)
conda_activate() {
    [ "$1" = "$ROOT/.conda" ] || return 0
    local code
    code=$(conda shell.bash activate "$1") || die "conda could not activate $1 (conda shell.bash activate $1)"
    set +eu; eval "$code"; set -eu  # activation scripts are not written for set -eu
}

# torch $TORCH_VERSION on a machine without CUDA, before the project (whose `torch>=2.4` it then satisfies). Linux:
# the +cpu build from PyTorch's CPU index, where that index answers within 5 s; else (an offline mirror, a firewall)
# torch==$TORCH_VERSION from pip's configured index, which must carry it. macOS and Windows: PyPI's torch is the CPU build.
install_cpu_torch() {
    local probe='import sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1], method="HEAD"), timeout=5)'
    if [ "$(uname -s)" != Linux ]; then
        log "torch==$TORCH_VERSION from pip's configured index (off Linux, PyPI's torch is the CPU build)"
    elif "$PY" -c "$probe" "$TORCH_CPU_INDEX/torch/" >/dev/null 2>&1; then
        log "torch==$TORCH_VERSION+cpu from PyTorch's CPU index ($TORCH_CPU_INDEX)"
        "$PY" -m pip install --quiet "torch==$TORCH_VERSION+cpu" --index-url "$TORCH_CPU_INDEX" && return 0
        log "that failed: torch==$TORCH_VERSION from pip's configured index instead (from public PyPI: the CUDA build, GBs)"
    else
        log "torch==$TORCH_VERSION from pip's configured index: PyTorch's CPU index ($TORCH_CPU_INDEX) cannot be reached (from public PyPI: the CUDA build, GBs)"
    fi
    "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
}

setup() {
    local t0=$SECONDS extras="dev,gguf,watch" env_dir stamp want constraints=()
    if has_cuda; then extras="dev,gguf,watch,gpu"; fi
    if command -v conda >/dev/null 2>&1 && [ "${MEDQA_USE_VENV:-0}" != 1 ]; then env_dir="$ROOT/.conda"; else env_dir="$ROOT/.venv"; fi
    PY="$env_dir/bin/python"
    export PATH="$env_dir/bin:$PATH"
    if [ "${MEDQA_SKIP_SETUP:-0}" = 1 ]; then
        [ -x "$PY" ] || die "MEDQA_SKIP_SETUP=1 but there is no environment at $env_dir: run once without it"
        conda_activate "$env_dir"
        return 0
    fi
    if [ ! -x "$PY" ] && [ "$env_dir" = "$ROOT/.conda" ]; then
        log "creating conda environment in $env_dir (${CONDA_PACKAGES[*]}, from conda-forge, as environment.yml)"
        conda create --quiet --yes --prefix "$env_dir" -c conda-forge "${CONDA_PACKAGES[@]}"
    elif [ ! -x "$PY" ]; then
        local py=${PYTHON:-python3}
        command -v "$py" >/dev/null 2>&1 || die "no $py on PATH: install Python 3.11 (or set PYTHON=/path/to/python3)"
        "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || die "$py is Python $("$py" -c 'import platform; print(platform.python_version())'); this project needs 3.11 or newer (set PYTHON=/path/to/python3.11)"
        log "creating virtual environment in $env_dir ($($py --version 2>&1))"
        "$py" -m venv "$env_dir"
    fi
    conda_activate "$env_dir"
    # the gguf extra builds llama.cpp from source (llama-cpp-python), with a C++ compiler (cmake comes from PyPI;
    # conda's cxx-compiler sets CXX when activated). Without one, everything else is installed, and the stamp's
    # extras say so: a later run that finds a compiler adds the gguf extra
    local gguf=yes
    if ! has_cxx; then gguf=no; extras=${extras/gguf,/}; fi

    stamp="$env_dir/.medqa-installed"
    want="$(cksum < pyproject.toml) extras=$extras"
    if has_cuda; then
        # the recorded set around the pinned vLLM (scripts/lock_gpu.py), not whatever is newest today;
        # it was resolved for Python 3.11 on x86_64, elsewhere pip resolves afresh
        if [ "$("$PY" -c 'import platform, sys; print(sys.version_info[:2] == (3, 11) and platform.machine())')" = x86_64 ]; then
            constraints=(-c "$GPU_LOCK"); want="$want lock=$(cksum < "$GPU_LOCK")"
        else
            log "note: $GPU_LOCK is for Python 3.11 on x86_64; resolving the gpu extra afresh here"
        fi
    fi
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    if [ $gguf = no ]; then
        log "no C++ compiler (\$CXX, c++, g++ or clang++): installing without the gguf extra (llama-cpp-python builds llama.cpp from source), which turns off 04's GGUF export and its proofs, 07's llama.cpp evaluation and serve.backend llamacpp. To have them: install a compiler (Debian/Ubuntu: sudo apt install g++; conda: conda install -c conda-forge cxx-compiler), then ./run_all.sh again"
    fi
    log "installing the project and its dependencies into $env_dir (extras: $extras$([ $gguf = no ] || echo '; building llama.cpp takes a few minutes the first time'))"
    "$PY" -m pip install --quiet --upgrade pip
    if ! has_cuda; then install_cpu_torch; fi
    "$PY" -m pip install --quiet -e ".[$extras]" ${constraints[@]+"${constraints[@]}"}
    if [ $gguf = yes ]; then
        "$PY" -m medqa_zh.export install-tools  # llama.cpp's converter, from the same release's source (04)
    fi
    "$PY" -m ipykernel install --sys-prefix --name medqa-zh --display-name "Python (medqa-zh)" >/dev/null
    echo "$want" > "$stamp"
    log "setup done in $((SECONDS - t0)) s"
}

# On a machine with an NVIDIA GPU, PyTorch must see it: else the gpu profile trains, serves and
# evaluates on the CPU (days), without a word. The usual cause is a driver older than the CUDA
# build of torch that pip installed (vllm==0.33.0 pins a CUDA 13 torch: driver >= 580).
check_gpu() {
    has_cuda || return 0
    [ "${MEDQA_ALLOW_CPU:-0}" = 1 ] && return 0
    local seen driver gpu
    seen=$("$PY" -c 'import torch; print(torch.cuda.is_available(), torch.__version__, torch.version.cuda)' 2>&1 | tail -1) || true
    [ "${seen%% *}" = True ] && return 0
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
    gpu=$(nvidia-smi -L 2>/dev/null | head -1)
    die "nvidia-smi sees a GPU (${gpu:-?}; driver ${driver:-unknown}) but PyTorch does not: torch.cuda.is_available() is False
  (torch, its version and CUDA build: ${seen:-none}). Everything would run on the CPU.
  torch built for CUDA 13.x needs NVIDIA driver >= 580; CUDA 12.x builds need >= 525.
  Fix: update the driver to >= 580 (what this project's pinned vllm==0.33.0 / torch set needs), or install a torch
  built for your driver into this environment, e.g. $PY -m pip install torch --index-url https://download.pytorch.org/whl/cu126
  (then vLLM 0.33 will not run: serve with --backend transformers). See docs/gpu.md, Running on a GPU.
  MEDQA_ALLOW_CPU=1 runs on the CPU anyway."
}

# --------------------------------------------------------------------------- notebooks
fmt_time() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

run_notebooks() {
    local profile=$1 from=$2 only=$3 runs reports nb name out t0 series_t0=$SECONDS ran=0 num
    runs="outputs/$profile/runs"; reports="outputs/$profile/reports"
    mkdir -p "$runs" "$reports"
    export MEDQA_ROOT="$ROOT"  # the notebooks write into this project's outputs/, wherever the lib is installed
    if [ "$profile" = smoke ]; then
        log "SMOKE PROFILE: a tiny random model and synthetic data, built locally."
        log "It checks that the series runs; its numbers mean nothing. Real runs: --profile cpu or --profile gpu."
    fi
    local series
    # NN_*.ipynb and NNx_*.ipynb, in byte order whatever the locale: 04_merge, 04b_grpo, 05_serve
    mapfile -t series < <(printf '%s\n' notebooks/[0-9][0-9]_*.ipynb notebooks/[0-9][0-9][a-z]_*.ipynb | LC_ALL=C sort)
    for nb in "${series[@]}"; do
        [ -f "$nb" ] || continue
        name=$(basename "$nb" .ipynb); num=${name%%_*}
        if [ -n "$only" ] && [ "$num" != "$only" ]; then continue; fi
        if [ -n "$from" ] && [ "$(printf '%s\n%s\n' "$num" "$from" | LC_ALL=C sort | head -1)" != "$from" ]; then continue; fi
        out="$runs/$name.ipynb"; t0=$SECONDS; ran=$((ran + 1))
        rm -f "$out" "$reports/$name.html"  # no stale copy from an earlier run can pass for this one
        log "$name: running (profile $profile)"
        if ! (cd notebooks && papermill --kernel medqa-zh --log-level WARNING --progress-bar \
                "$name.ipynb" "$ROOT/$out" -p profile "$profile"); then
            index "$profile" "$name" $((SECONDS - t0)) failed
            if [ -f "$out" ]; then
                jupyter nbconvert --to html --template-file "$TEMPLATE" --log-level WARN --output-dir "$reports" "$out" >/dev/null 2>&1 || true
                die "$name failed after $(fmt_time $((SECONDS - t0))). Executed copy (the failing cell is marked): $out; HTML: $reports/$name.html. Fix it, then resume with: ./run_all.sh --profile $profile --from $num"
            fi
            die "$name failed before any cell ran (see papermill's error above); no executed copy was written"
        fi
        jupyter nbconvert --to html --template-file "$TEMPLATE" --log-level WARN --output-dir "$reports" "$out"
        index "$profile" "$name" $((SECONDS - t0)) ok
        log "$name: done in $(fmt_time $((SECONDS - t0))) -> $reports/$name.html"
    done
    [ "$ran" -gt 0 ] || die "no notebook matches ${only:+--only $only}${from:+--from $from} (notebooks/NN_*.ipynb)"
    log "$ran notebook(s) ran in $(fmt_time $((SECONDS - series_t0))). Start here: $reports/index.html"
}

# the wall time of one notebook, then reports/index.html again
index() {
    "$PY" -m medqa_zh.report index "outputs/$1" --notebooks notebooks --timing "$2" "$3" "$4" >/dev/null \
        || log "warning: could not write outputs/$1/reports/index.html"
}

# the browser test needs Chromium; install the Debian package when it is missing and we may
ensure_chromium() {
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 && return 0
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        log "installing chromium (Debian package) for the browser test"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
            || log "could not install chromium: the browser test will be skipped"
    else
        log "no chromium and no root apt-get: the browser test will be skipped (install the chromium package)"
    fi
}

# --------------------------------------------------------------------------- main
cmd=run; profile=${MEDQA_PROFILE:-smoke}; from=""; only=""
if [ "${1:-}" = test ]; then cmd=test; shift
elif [ "${1:-}" = exec ]; then
    cmd=exec; shift
    [ $# -gt 0 ] || die "exec needs a command, e.g. ./run_all.sh exec python -m medqa_zh.serve --help"
else
    while [ $# -gt 0 ]; do
        case $1 in
            --profile) [ $# -ge 2 ] || die "--profile needs a name"; profile=$2; shift 2 ;;
            --profile=*) profile=${1#*=}; shift ;;
            --from|--only)
                [ $# -ge 2 ] && [[ $2 =~ ^[0-9]{1,2}[a-z]?$ ]] || die "$1 needs a notebook number, e.g. $1 06 (or 04b)"
                number=$(printf '%02d%s' "$((10#${2%%[a-z]}))" "${2##*[0-9]}")  # 4 -> 04, 4b -> 04b
                if [ "$1" = --from ]; then from=$number; else only=$number; fi
                shift 2 ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown argument '$1'" ;;
        esac
    done
fi

if [ $cmd = run ] && [ ! -f "profiles/$profile.yaml" ]; then
    die "no profile '$profile': choose one of $(cd profiles && ls -- *.yaml | sed 's/\.yaml$//' | grep -vx base | tr '\n' ' ')"
fi
if [ -n "$from" ] && [ -n "$only" ]; then die "--from and --only do not go together"; fi
setup
# exec skips the GPU check: it is also how you repair the environment (e.g. a torch built for your driver)
[ $cmd = exec ] || check_gpu
case $cmd in
    test) ensure_chromium; exec "$PY" -m pytest "$@" ;;
    run) run_notebooks "$profile" "$from" "$only" ;;
    exec) cd "$CALLER_DIR" && exec "$@" ;;
esac
