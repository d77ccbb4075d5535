#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh on the GPU machine (Python 3.12, manylinux x86_64, no network there).
# Usage: scripts/gpu_wheels.sh [DIR [NAME==VERSION ...]]   (DIR default .whl, ignored by git; carry it: run
#        with carry [".whl"]). Extra pins are fetched too, e.g. pyarrow==26.0.1 (45 MiB) should a run's JSON
#        show the image's pyarrow older than the 24.0 that datasets 5.2 needs.
#
# The device image already has torch 2.11, transformers 5.17, tokenizers 0.23.2, accelerate 1.15, peft,
# huggingface_hub 1.33, numpy, pandas, pyarrow, pillow, pyyaml, sympy, xxhash, fsspec, psutil, jinja2 (its
# package list). It lacks our pins below and, of their requirements (Requires-Dist, extras aside), only dill,
# multiprocess (datasets) and antlr4-python3-runtime (latex2sympy2_extended). transformers stays the image's
# 5.17: TRL 1.16 needs >= 4.56.2 and calibrl's tests pass against 5.17 (see the report of this script's
# check in the README), so the 10 MiB transformers wheel and a tokenizers wheel need not travel.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
[ $# -gt 0 ] && shift
extra=("$@")
py="${PYTHON:-python3}"
mkdir -p "$dir"
# pip matches each manylinux tag exactly: name every one a wheel of these may carry.
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$dir" \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 ${extra[@]+"${extra[@]}"}
# One version of each package: two would stop the install on the device.
dups=$(ls "$dir"/*.whl | xargs -n1 basename | cut -d- -f1 | tr '[:upper:]' '[:lower:]' | sort | uniq -d)
if [ -n "$dups" ]; then echo "gpu_wheels: more than one version of: $dups (in $dir)" >&2; exit 2; fi
ls -1 "$dir"/*.whl
du -ch "$dir"/*.whl | tail -1
