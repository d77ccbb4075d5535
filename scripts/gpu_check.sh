#!/usr/bin/env bash
# GPU check: each method trains 20 steps on CUDA in bf16 (speed, peak GPU memory) and a few on the CPU.
# Usage: scripts/gpu_check.sh [--steps 20] [--cpu-steps 5] [--cpu-only] [--json out.json]   (see scripts/gpu_check.py)
# Python: $PYTHON if set, else the project's .venv, else python3; the package is taken from src/ if not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
if ! "$py" -c "import calibrl" 2>/dev/null; then export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$py" scripts/gpu_check.py "$@"
