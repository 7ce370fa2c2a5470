#!/usr/bin/env bash
# Set up the environment and run the notebook series, or the tests.
#
#   ./run_all.sh [--profile NAME]   run notebooks/NN_*.ipynb in order with papermill
#                                   (default profile: smoke) and export each to HTML
#   ./run_all.sh test [PYTEST ARGS] run the test suite
#
# Setup is idempotent: it makes ./.venv (python -m venv), or ./.conda when conda is
# on PATH (python 3.11 + pip, as in environment.yml), installs this project into it
# with pip, and reinstalls only when pyproject.toml changed. On a machine without
# CUDA it pins torch==2.13.0 (CPU build). MEDQA_USE_VENV=1 ignores conda;
# MEDQA_SKIP_SETUP=1 uses the environment as it is (no install, e.g. offline).
#
# Outputs of a run:  outputs/<profile>/runs/NN_*.ipynb     executed notebooks
#                    outputs/<profile>/reports/NN_*.html   their HTML reports
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# paths in MEDQA_DIR / MEDQA_BASE_MODEL are relative to where you typed the command
for var in MEDQA_DIR MEDQA_BASE_MODEL; do
    if [ -n "${!var:-}" ] && [ -d "${!var}" ]; then export "$var=$(cd "${!var}" && pwd)"; fi
done
cd "$ROOT"

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

log() { printf '\033[1m[run_all]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[run_all] error:\033[0m %s\n' "$*" >&2; exit 1; }

# --------------------------------------------------------------------------- setup
has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
    local t0=$SECONDS extras="dev" env_dir stamp want
    if has_cuda; then extras="dev,gpu"; fi
    if command -v conda >/dev/null 2>&1 && [ "${MEDQA_USE_VENV:-0}" != 1 ]; then env_dir="$ROOT/.conda"; else env_dir="$ROOT/.venv"; fi
    PY="$env_dir/bin/python"
    export PATH="$env_dir/bin:$PATH"
    if [ "${MEDQA_SKIP_SETUP:-0}" = 1 ]; then
        [ -x "$PY" ] || die "MEDQA_SKIP_SETUP=1 but there is no environment at $env_dir: run once without it"
        return 0
    fi
    if [ ! -x "$PY" ] && [ "$env_dir" = "$ROOT/.conda" ]; then
        log "creating conda environment in $env_dir (python 3.11 + pip)"
        conda create --quiet --yes --prefix "$env_dir" python=3.11 pip
    elif [ ! -x "$PY" ]; then
        local py=${PYTHON:-python3}
        command -v "$py" >/dev/null 2>&1 || die "no $py on PATH: install Python 3.11 (or set PYTHON=/path/to/python3)"
        log "creating virtual environment in $env_dir ($($py --version 2>&1))"
        "$py" -m venv "$env_dir"
    fi

    stamp="$env_dir/.medqa-installed"
    want="$(cksum < pyproject.toml) extras=$extras"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    log "installing the project and its dependencies into $env_dir (extras: $extras)"
    "$PY" -m pip install --quiet --upgrade pip
    if ! has_cuda; then
        # the CPU build; a plain `torch` requirement would pull GBs of CUDA wheels
        "$PY" -m pip install --quiet "torch==2.13.0"
    fi
    "$PY" -m pip install --quiet -e ".[$extras]"
    "$PY" -m ipykernel install --sys-prefix --name medqa-zh --display-name "Python (medqa-zh)" >/dev/null
    echo "$want" > "$stamp"
    log "setup done in $((SECONDS - t0)) s"
}

# --------------------------------------------------------------------------- notebooks
run_notebooks() {
    local profile=$1 runs reports nb name out t0
    runs="outputs/$profile/runs"; reports="outputs/$profile/reports"
    mkdir -p "$runs" "$reports"
    if [ "$profile" = smoke ]; then
        log "SMOKE PROFILE: a tiny random model and synthetic data, built locally."
        log "It checks that the series runs; its numbers mean nothing. Real runs: --profile cpu or --profile gpu."
    fi
    for nb in notebooks/[0-9][0-9]_*.ipynb; do
        name=$(basename "$nb" .ipynb); out="$runs/$name.ipynb"; t0=$SECONDS
        rm -f "$out" "$reports/$name.html"  # no stale copy from an earlier run can pass for this one
        log "$name: running (profile $profile)"
        if ! (cd notebooks && papermill --kernel medqa-zh --log-level WARNING --progress-bar \
                "$name.ipynb" "$ROOT/$out" -p profile "$profile"); then
            if [ -f "$out" ]; then
                jupyter nbconvert --to html --log-level WARN --output-dir "$reports" "$out" >/dev/null 2>&1 || true
                die "$name failed after $((SECONDS - t0)) s. Executed copy (the failing cell is marked): $out; HTML: $reports/$name.html"
            fi
            die "$name failed before any cell ran (see papermill's error above); no executed copy was written"
        fi
        jupyter nbconvert --to html --log-level WARN --output-dir "$reports" "$out"
        log "$name: done in $((SECONDS - t0)) s -> $reports/$name.html"
    done
    log "all notebooks ran. Reports: $reports/"
}

# --------------------------------------------------------------------------- main
cmd=run; profile=${MEDQA_PROFILE:-smoke}
if [ "${1:-}" = test ]; then cmd=test; shift
else
    while [ $# -gt 0 ]; do
        case $1 in
            --profile) [ $# -ge 2 ] || die "--profile needs a name"; profile=$2; shift 2 ;;
            --profile=*) profile=${1#*=}; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage >&2; die "unknown argument '$1'" ;;
        esac
    done
fi

if [ $cmd = run ] && [ ! -f "profiles/$profile.yaml" ]; then
    die "no profile '$profile': choose one of $(ls profiles | sed 's/\.yaml$//' | tr '\n' ' ')"
fi
setup
case $cmd in
    test) exec "$PY" -m pytest "$@" ;;
    run) run_notebooks "$profile" ;;
esac
