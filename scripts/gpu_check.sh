#!/usr/bin/env bash
# GPU check (issue 14): every method in bf16 on CUDA, the expert log-prob check, CalibRL vs GRPO step time at
# realistic shapes; one JSON and a log in --out. See scripts/gpu_check.py for the parts and their options.
# Usage: scripts/gpu_check.sh --out DIR [--wheels DIR] [--budget-s 420] [--cpu-only] [gpu_check.py options]
#
# --wheels DIR (default .whl): where trl, datasets or math_verify cannot be imported (the GPU machine has no
# network), the wheels in DIR (scripts/gpu_wheels.sh makes them) are installed with pip --no-index --no-deps
# into $GPU_CHECK_SITE (default /tmp/calibrl-site), which goes on PYTHONPATH. $GPU_CHECK_NEEDS names the
# modules checked (default "trl datasets math_verify").
# Python: $PYTHON if set, else the project's .venv, else python3; the package is taken from src/ if not installed.
set -euo pipefail
here="$PWD"
repo="$(cd "$(dirname "$0")/.." && pwd)"
abs() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$here/$1" ;; esac; }  # paths as the caller meant them
wheels="$repo/.whl"
out=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels|--out) [ $# -ge 2 ] || { echo "gpu_check: error: $1 needs a folder" >&2; exit 2; }
                        if [ "$1" = --wheels ]; then wheels="$(abs "$2")"; else out="$(abs "$2")"; fi
                        shift 2 ;;
        --wheels=*) wheels="$(abs "${1#--wheels=}")"; shift ;;
        --out=*) out="$(abs "${1#--out=}")"; shift ;;
        --json) [ $# -ge 2 ] || { echo "gpu_check: error: --json needs a file" >&2; exit 2; }
                args+=(--json "$(abs "$2")"); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
[ -z "$out" ] || args+=(--out "$out")
cd "$repo"
if [ -n "$out" ]; then
    mkdir -p "$out"
    exec > >(tee "$out/gpu_check.log") 2>&1  # everything below, the install included, into the log too
    tee_pid=$!
fi
finish() {  # exit with $1 once tee has written the whole log
    if [ -n "$out" ]; then exec >&- 2>&-; wait "$tee_pid" 2>/dev/null || true; fi
    exit "$1"
}
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
if ! "$py" -c "import calibrl" 2>/dev/null; then export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
needs="${GPU_CHECK_NEEDS:-trl datasets math_verify}"
imports="import ${needs// /, }"
if ! "$py" -c "$imports" 2>/dev/null; then
    site="${GPU_CHECK_SITE:-/tmp/calibrl-site}"
    shopt -s nullglob
    whl=("$wheels"/*.whl)
    shopt -u nullglob
    if [ ${#whl[@]} -eq 0 ]; then
        echo "gpu_check: error: cannot import one of: $needs, and --wheels $wheels holds no .whl files" \
             "(make them with scripts/gpu_wheels.sh where pip can reach a registry)" >&2
        finish 2
    fi
    t0=$(date +%s)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${whl[@]}" \
        || { echo "gpu_check: error: pip could not install the wheels in $wheels into $site" >&2; finish 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed ${#whl[@]} wheels from $wheels into $site in $(( $(date +%s) - t0 )) s"
    if ! "$py" -c "$imports"; then
        echo "gpu_check: error: still cannot import one of: $needs after installing $wheels (see above)" >&2
        finish 2
    fi
fi
rc=0
"$py" scripts/gpu_check.py "${args[@]}" || rc=$?
finish "$rc"
